"""The stand-in engine's state and metrics counters, and what every inference route shares: admission,
length checks, building a job, running it (pacing, batch faults) and logging it as vLLM does.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from tests.fakes import simcard
from tests.fakes.standin_asgi import (
    JSON,
    ApiError,
    Receive,
    Scope,
    Send,
    bad_request,
    int_field,
    random_id,
    request_header,
    vllm_log,
)
from tests.fakes.standin_config import Knobs, LoraModule, ServeArgs
from tests.fakes.standin_faults import ENGINE_DEAD_MESSAGE, kill_core_in_batch
from tests.fakes.standin_model import DEFAULT_MAX_TOKENS, VLLM_VERSION, generate_words, sequence_seed
from tests.fakes.standin_requests import Job, Prompt, RequestRun, Seq

_TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                        7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS: Final = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                       120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class Stats:
    """What the engine has seen; ``GET /standin/stats`` shows it."""

    requests: int = 0
    rejected: int = 0
    completed: int = 0
    cancelled: int = 0
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    kv_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    #: The ``priority`` of each inference request, in arrival order, with the start of its prompt (the last
    #: 1000). vLLM reads a request without it as 0 (vllm/entrypoints/openai/completion/protocol.py).
    received: list[JSON] = field(default_factory=list)
    ttft: _Histogram = field(default_factory=lambda: _Histogram(_TTFT_BUCKETS))
    e2e: _Histogram = field(default_factory=lambda: _Histogram(_E2E_BUCKETS))


def prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prom_num(value: float) -> str:
    return repr(float(value))


class EngineBase:
    """The engine's state and the common parts of inference requests; the route groups extend it."""

    def __init__(self, args: ServeArgs, knobs: Knobs, *, sim: simcard.SimEngine | None = None) -> None:
        self.args = args
        self.sim = sim
        self.sleeping_tags: set[str] = set()
        self.knobs = knobs
        self.names = args.names
        self.base_name = self.names[0]
        self.loras: dict[str, LoraModule] = {m.name: m for m in args.lora_modules}
        self.stats = Stats()
        self.sleep_level = 0
        self.core_dead = False
        self.awake = asyncio.Event()
        self.awake.set()
        self.last_request: JSON = {}
        self.stored_responses: dict[str, JSON] = {}
        # vLLM's default ``--fingerprint-mode full``: ``vllm-<version>-<hash8 of the config>``
        # (``vllm/entrypoints/serve/utils/fingerprint.py``, ``build_system_fingerprint``).
        config = f"{args.model}|{args.max_model_len}|{args.enable_lora}|{args.max_lora_rank}"
        self.fingerprint = f"vllm-{VLLM_VERSION}-{zlib.crc32(config.encode()):08x}"

    # -- requests: common parts --------------------------------------------------------------------

    def _admit(self, scope: Scope, req: JSON) -> tuple[str, str]:
        """Count and record an inference request; return (answering name, generation seed name)."""
        self.stats.requests += 1
        self.last_request = {"path": scope["path"], "headers": scope["headers"], "body": req}
        text = req.get("prompt", req.get("messages", req.get("input", "")))
        self.stats.received.append({"priority": req.get("priority", 0), "prompt": str(text)[:80]})
        del self.stats.received[:-1000]
        name = req.get("model")
        if name is not None and not isinstance(name, str):
            raise bad_request("`model` must be a string.", "model")
        self.stats.by_model[name or ""] = self.stats.by_model.get(name or "", 0) + 1
        if not name or name in self.names:
            return self.base_name, self.base_name
        if name in self.loras:
            return name, name
        raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def _check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The number of tokens to generate, or a 400 like vLLM's when it does not fit."""
        limit = self.args.max_model_len
        if prompt_len > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your request has "
                              f"{prompt_len} input tokens. Please reduce the length of the input messages.", "messages")
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise bad_request(f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                              f"maximum context length is {limit} tokens and your request has {prompt_len} input "
                              f"tokens ({max_tokens} > {limit} - {prompt_len}).", "max_tokens")
        return max_tokens

    def _job(self, scope: Scope, req: JSON, *, kind: str, model: str, seed_name: str,
             prompts: list[Prompt], max_tokens: int | None) -> Job:
        n = int_field(req, "n", 1, minimum=1) or 1
        tokens = min(self._check_length(len(prompt.ids), max_tokens) for prompt in prompts)
        stream = bool(req.get("stream"))
        options = req.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("`stream_options` must be an object.", "stream_options")
        if options and not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        # StreamOptions.include_usage defaults to False (vllm/entrypoints/generate/base/protocol.py).
        include_usage = bool(options.get("include_usage")) if options else False
        if self.sim is not None and self.sim.garbage(seed_name):  # discarded weights answer something else
            seed_name += "\0discarded weights"
        seqs: list[Seq] = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seed = sequence_seed(seed_name, prompt.text, i)
                seqs.append(Seq(p * n + i, prompt, seed, generate_words(seed, tokens)))
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return Job(
            request_id=prefix + (request_header(scope, b"x-request-id") or random_id()),
            created=int(time.time()),
            model=model,
            prompts=prompts,
            seqs=seqs,
            max_tokens=tokens,
            finish_reason="stop" if max_tokens is None else "length",
            include_usage=include_usage,
            continuous_usage=include_usage and bool(options and options.get("continuous_usage_stats")),
            echo=bool(req.get("echo")),
            fingerprint=self.fingerprint,
        )

    async def _run(self, receive: Receive, send: Send, job: Job,
                   body: Callable[[RequestRun], Awaitable[bool]]) -> None:
        self.stats.prompt_tokens += job.prompt_tokens
        if self.args.enable_log_requests:
            self._log_request(job)
        kv = sum(len(seq.prompt.ids) + job.max_tokens for seq in job.seqs)
        run = RequestRun(self, receive, kv)
        completed = False
        try:
            completed = await body(run)
        finally:
            run.close(completed=completed, tokens=job.completion_tokens if completed else 0,
                      finish_reason=job.finish_reason)

    def _log_request(self, job: Job) -> None:
        """vLLM's request log, written synchronously from the serving loop
        (``vllm/entrypoints/serve/utils/request_logger.py``, ``RequestLogger.log_inputs``): the prompt
        at DEBUG (cut to ``--max-log-len``), then the "Received request" line at INFO."""
        where = "request_logger.py:65"
        if os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() == "DEBUG":
            for prompt in job.prompts:
                text = prompt.text if self.args.max_log_len is None else prompt.text[: self.args.max_log_len]
                vllm_log("DEBUG", "request_logger.py:55", f"Request {job.request_id} details: prompt: {text!r}, "
                         "prompt_token_ids: None, prompt_embeds shape: None.")
        vllm_log("INFO", where, f"Received request {job.request_id}: params: SamplingParams(n={len(job.seqs)}, "
                 f"temperature=1.0, max_tokens={job.max_tokens}), lora_request: None.")

    async def _generate_all(self, run: RequestRun, job: Job) -> bool:
        """Non-streaming: wait as long as generating every token takes; False if the client left."""
        if not await run.prefill():
            return False
        self._check_batch(job)
        limit = self.knobs.crash_after_tokens
        if limit is not None and job.max_tokens > limit:
            if limit > 1 and not await run.pause(self.knobs.token_delay * (limit - 1)):
                return False
            run.check_crash(limit)
        rest = self.knobs.token_delay * (job.max_tokens - 1)
        return rest <= 0 or await run.pause(rest)

    def _check_batch(self, job: Job) -> None:
        """``STANDIN_DIE_IN_BATCH``: die when the batch is full; once dead, fail every request."""
        limit = self.knobs.die_in_batch
        if limit is None:
            return
        if not self.core_dead and self.stats.running >= limit:
            self.core_dead = True
            kill_core_in_batch(self.stats.running, sum(len(seq.prompt.ids) for seq in job.seqs) * self.stats.running)
        if self.core_dead:
            raise ApiError(500, ENGINE_DEAD_MESSAGE, "InternalServerError")
