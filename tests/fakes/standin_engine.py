"""A stand-in for ``vllm serve``: the same command line and HTTP API, no model and no GPU.

It answers like vLLM 0.32 (JSON shapes, SSE chunk format, error JSON, ``/metrics`` series, sleep/wake
and runtime-LoRA endpoints) with deterministic fake text. Tests of orchestration and faults get a real
process that is ready in well under a second; benchmarks get an upstream that is never the bottleneck
(raw ASGI on uvicorn + uvloop + httptools, pre-encoded stream chunks, no pydantic).

Run it exactly like vLLM::

    VLLM_SERVER_DEV_MODE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
    python -m tests.fakes.standin_engine serve meta-llama/Llama-3.1-8B-Instruct \\
        --host 127.0.0.1 --port 8011 --served-model-name llama-8b candidate --max-model-len 4096 \\
        --enable-lora --max-lora-rank 16 --lora-modules domain=/adapters/domain --enable-sleep-mode \\
        --dtype float16 --gpu-memory-utilization 0.4        # unknown flags are accepted and ignored

Honoured flags: ``--host`` (default 127.0.0.1), ``--port`` (8000), ``--served-model-name`` (one or more;
default the model argument), ``--max-model-len`` (default 8192; ``4k`` = 4000, ``4K`` = 4096),
``--enable-lora``, ``--lora-modules`` (``name=path`` or vLLM's JSON form), ``--max-lora-rank`` (16),
``--enable-sleep-mode``, ``--enable-log-requests`` and ``--max-log-len`` (each inference request logs
vLLM's "Received request" line, and with ``VLLM_LOGGING_LEVEL=DEBUG`` its prompt too, written to stdout
from the serving loop as vLLM does: an engine whose output is not read blocks). The port opens only when
the engine is ready, as with vLLM.

As in vLLM, ``/sleep``, ``/wake_up`` and ``/is_sleeping`` exist only with ``VLLM_SERVER_DEV_MODE=1``,
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; other paths answer FastAPI's ``{"detail": "Not Found"}``.
While asleep, generation requests wait until ``/wake_up`` (``/health`` and ``/tokenize`` still answer).
Without ``--enable-sleep-mode``, ``/sleep`` still answers 200 and pauses generation (what vLLM does on
CPU) and logs that nothing was freed. Loading an adapter needs ``--enable-lora`` (else 500), an existing
path (else 404) and, when its ``adapter_config.json`` says, ``r <= --max-lora-rank`` (else 500).

Fault and pacing knobs, read from the environment at start:

=================================== ====================================================================
Variable (example)                  Effect
=================================== ====================================================================
``STANDIN_START_DELAY=2.5``         seconds of "loading" before the port opens (connection refused)
``STANDIN_FAIL_START=msg``          after the start delay, print ``msg`` as a vLLM ERROR line, exit 1
``STANDIN_OOM=1``                   after the start delay, print vLLM's CUDA out-of-memory error, exit 1
``STANDIN_CRASH_AFTER_TOKENS=5``    a request that has produced 5 tokens and needs a 6th kills the
                                    process with ``os._exit(1)`` (streams: 5 chunks reach the client)
``STANDIN_DIE_IN_BATCH=8``          when 8 non-streaming inference requests are in flight at once, the
                                    "EngineCore" dies as vLLM's does under a batch it cannot run: a
                                    traceback ending in ``RuntimeError: einsum(): ...`` then 250 lines of
                                    per-request tracebacks; every request in flight (and any later one)
                                    is answered 500 ``EngineCore encountered an issue. See stack trace
                                    (above) for the root cause.``; the process exits with code 0 a
                                    second later (``vllm/entrypoints/launchers/launcher.py``,
                                    ``terminate_if_errored``)
``STANDIN_HANG=0.5``                0.5 s after the port opens the process blocks for ever: no answer
                                    to anything (``/health`` too) and SIGTERM ignored; only SIGKILL
``STANDIN_IGNORE_SIGTERM=1``        SIGTERM does nothing, from the first instant
``STANDIN_SLOW_HEALTH=3``           every ``/health`` answer waits 3 s
``STANDIN_TOKEN_DELAY=0.01``        seconds between generated tokens (default 0: yield to the loop)
``STANDIN_FIRST_TOKEN_DELAY=0.2``   seconds before the first token (the "prefill")
``STANDIN_WAKE_DELAY=1``            seconds ``/wake_up`` takes
``STANDIN_FAIL_WAKE=msg``           ``/wake_up`` answers 500 with ``msg``; the engine stays asleep
``STANDIN_SIMCARD=/tmp/card.json``  GPU mode: the engine takes its memory from the simulated card in that
                                    ledger, by vLLM 0.32's rules (:mod:`tests.fakes.simcard`): start-up
                                    check, OOM, offload, sleep levels, quantization check; the model
                                    folder holds ``config.json`` and ``simcard.json`` (the plan's figures)
``STANDIN_SKIP_RELOAD=1``           GPU mode: ``/collective_rpc`` ``reload_weights`` answers 200 but
                                    reloads nothing, so a level-2 wake keeps answering garbage
=================================== ====================================================================

Sleep follows vLLM's pools: ``/wake_up?tags=weights`` and ``?tags=kv_cache`` wake one pool each, and
generation resumes only when none sleeps. In GPU mode a level-2 sleep discards the weights (and the LoRA
slots): answers differ until ``POST /collective_rpc {"method": "reload_weights"}`` (and, for an adapter,
a ``load_inplace`` reload). ``POST /reset_prefix_cache`` answers ``{"success": true}``.
``return_token_ids`` on a completion fills ``token_ids`` and ``prompt_token_ids`` as vLLM 0.32 does.

Tokenizer: ASCII text is cut into chunks of up to 4 characters (from the start of each ASCII run), each
other character (and NUL) is one token. A chunk's id is its bytes read as a big-endian int, zero-padded
on the right (``"Hell"`` -> 0x48656C6C); a lone character's id is its code point. So ids are int32,
``decode(encode(text)) == text``, and pure-ASCII text of L characters is ``ceil(L / 4)`` tokens.
Chat messages are rendered as ``"<|{role}|>\\n{content}\\n"`` each, plus ``"<|assistant|>\\n"``.

Generation: exactly ``max_tokens`` tokens (``max_completion_tokens`` first for chat); when the request
leaves it unset, 16 tokens (capped by ``--max-model-len``) with ``finish_reason="stop"``, else
``"length"``. Each token is a 4-character word like ``" kel"`` picked by hashing (model, prompt, choice
index, token index); the model is the first served name, or the adapter's name, so two engines, or an
adapter and its base, answer differently while aliases of one engine answer alike. ``model`` in every
answer is the first served name or the adapter name, as in vLLM. Logprobs are fake but stable, and the
chosen token always ranks first. :func:`expected_text` predicts an answer.

Test-only routes: ``GET /standin/stats`` -> ``{"requests", "cancelled", "in_flight", ...}`` (inference
requests received, clients that went away before the end, requests now in flight) and
``GET /standin/last_request`` -> ``{"path", "headers", "body"}`` of the last inference request.

This module is the process entry point (start-up, faults at start, serving) and the ASGI app's route
table; the parts live beside it: :mod:`~tests.fakes.standin_model` (tokenizer, fake generation),
:mod:`~tests.fakes.standin_config` (knobs, command line), :mod:`~tests.fakes.standin_asgi` (errors, ASGI
helpers), :mod:`~tests.fakes.standin_requests` (one request's pacing and accounting),
:mod:`~tests.fakes.standin_faults` (injected faults), :mod:`~tests.fakes.standin_base` (state, metrics
counters, admission), :mod:`~tests.fakes.standin_generation` (completions, chat, embeddings),
:mod:`~tests.fakes.standin_info` (health, models, metrics, tokenizer), :mod:`~tests.fakes.standin_lifecycle`
(sleep mode, runtime LoRA) and :mod:`~tests.fakes.standin_routes` (vLLM's other model routes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence

import uvicorn

from tests.fakes import simcard, standin_routes
from tests.fakes.standin_asgi import (
    JSON,
    NOT_ALLOWED,
    NOT_FOUND,
    ApiError,
    ClientGone,
    Handler,
    Message,
    Receive,
    Scope,
    Send,
    respond,
    vllm_log,
)
from tests.fakes.standin_config import Knobs, LoraModule, ServeArgs, parse_args
from tests.fakes.standin_faults import BATCH_DEATH_CAUSE, ENGINE_DEAD_MESSAGE, OOM_TEXT, hang_forever, refuse_start
from tests.fakes.standin_generation import GenerationRoutes
from tests.fakes.standin_info import InfoRoutes
from tests.fakes.standin_lifecycle import LifecycleRoutes, check_lora
from tests.fakes.standin_model import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_TOKENS,
    EMBEDDING_DIM,
    MAX_LOGPROBS,
    VLLM_VERSION,
    WORDS,
    decode,
    encode,
    expected_text,
    generate_words,
    render_chat,
    sequence_seed,
    token_text,
)

# The stand-in's public names (tests and benchmarks import them from this entry module).
__all__ = [
    "BATCH_DEATH_CAUSE", "DEFAULT_MAX_MODEL_LEN", "DEFAULT_MAX_TOKENS", "EMBEDDING_DIM", "ENGINE_DEAD_MESSAGE", "JSON",
    "MAX_LOGPROBS", "VLLM_VERSION", "WORDS", "ApiError", "Handler", "Knobs", "LoraModule", "Message", "Receive",
    "Scope", "Send", "ServeArgs", "StandInEngine", "decode", "encode", "expected_text", "generate_words", "main",
    "parse_args", "render_chat", "sequence_seed", "token_text",
]


class StandInEngine(GenerationRoutes, InfoRoutes, LifecycleRoutes):
    """vLLM's HTTP API over a fake, deterministic model, as a raw ASGI app."""

    def __init__(self, args: ServeArgs, knobs: Knobs, *, dev_mode: bool, runtime_lora: bool,
                 sim: simcard.SimEngine | None = None) -> None:
        super().__init__(args, knobs, sim=sim)
        self.routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self._health},
            "/ping": {"GET": self._health, "POST": self._health},
            "/version": {"GET": self._version},
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/tokenize": {"POST": self._tokenize},
            "/detokenize": {"POST": self._detokenize},
            "/metrics": {"GET": self._metrics},
            "/standin/stats": {"GET": self._stats},
            "/standin/last_request": {"GET": self._last_request},
            **standin_routes.routes(self),  # vLLM's other model routes, answered in its shapes
        }
        if dev_mode:
            self.routes["/sleep"] = {"POST": self._sleep}
            self.routes["/wake_up"] = {"POST": self._wake_up}
            self.routes["/is_sleeping"] = {"GET": self._is_sleeping}
            self.routes["/collective_rpc"] = {"POST": self._collective_rpc}
            self.routes["/reset_prefix_cache"] = {"POST": self._reset_prefix_cache}
        if runtime_lora:
            self.routes["/v1/load_lora_adapter"] = {"POST": self._load_lora}
            self.routes["/v1/unload_lora_adapter"] = {"POST": self._unload_lora}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        methods = self.routes.get(scope["path"]) or standin_routes.dynamic(self, scope["path"])
        handler = methods.get(scope["method"]) if methods is not None else None
        try:
            if handler is not None:
                await handler(scope, receive, send)
            elif methods is None:
                await respond(send, 404, NOT_FOUND)
            else:
                await respond(send, 405, NOT_ALLOWED)
        except ApiError as exc:
            await respond(send, exc.status, exc.body())
        except ClientGone:
            pass


async def _serve(server: uvicorn.Server, knobs: Knobs) -> None:
    task = asyncio.create_task(server.serve())
    await asyncio.sleep(0)  # uvicorn installs its signal handlers as soon as serve() starts
    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers no "started" event
        await asyncio.sleep(0.005)
    if knobs.hang_after is not None and server.started:
        asyncio.get_running_loop().call_later(knobs.hang_after, hang_forever)
    await task


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.fakes.standin_engine serve MODEL [vllm serve flags]``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        knobs = Knobs.from_env(os.environ)
    except ValueError as exc:
        print(f"standin_engine: {exc}", file=sys.stderr)
        return 2
    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    vllm_log("INFO", "api_server.py:1885", f"vLLM API server version {VLLM_VERSION} (stand-in engine)")
    vllm_log("INFO", "utils.py:328", f"non-default args: {{'model': {args.model!r}, 'host': {args.host!r}, "
             f"'port': {args.port}, 'served_model_name': {list(args.names)!r}, 'max_model_len': "
             f"{args.max_model_len}, 'enable_lora': {args.enable_lora}, 'enable_sleep_mode': "
             f"{args.enable_sleep_mode}}}")
    if args.ignored:
        vllm_log("INFO", "standin_engine", f"ignored flags: {' '.join(args.ignored)}")
    vllm_log("INFO", "gpu_model_runner.py:2000", f"Starting to load model {args.model}...")
    if knobs.start_delay > 0:
        time.sleep(knobs.start_delay)
    if knobs.oom:
        return refuse_start("Traceback (most recent call last):",
                            '  File "vllm/v1/worker/gpu_model_runner.py", line 2620, in load_model', OOM_TEXT)
    if knobs.fail_start is not None:
        return refuse_start(knobs.fail_start)
    for module in args.lora_modules:
        error = check_lora(args, module)
        if error is not None:
            return refuse_start(f"ValueError: {error.message}")
    sim = None
    if os.environ.get(simcard.ENV_LEDGER):
        try:
            sim = simcard.SimEngine.start(
                simcard.Ledger(os.environ[simcard.ENV_LEDGER]), model_dir=args.model, flags=args.ignored,
                served_name=args.names[0], skip_reload=os.environ.get(simcard.ENV_SKIP_RELOAD) == "1")
        except simcard.StartRefused as exc:
            return refuse_start(*exc.lines)
    vllm_log("INFO", "gpu_model_runner.py:2100",
             f"Model loading took 0.0000 GiB and {knobs.start_delay:.6f} seconds")
    for module in args.lora_modules:
        vllm_log("INFO", "serving_models.py:200",
                 f"Loaded new LoRA adapter: name '{module.name}', path '{module.path}'")
    engine = StandInEngine(
        args, knobs,
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip() == "1",
        runtime_lora=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true"),
        sim=sim,
    )
    vllm_log("INFO", "api_server.py:1971", f"Starting vLLM API server 0 on http://{args.host}:{args.port}")
    config = uvicorn.Config(engine, host=args.host, port=args.port, loop="uvloop", http="httptools",
                            lifespan="on", access_log=False, log_level="info", timeout_graceful_shutdown=1,
                            backlog=4096)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(uvicorn.Server(config), knobs))
    return 0


if __name__ == "__main__":  # run the importable module, so that standin_routes shares its classes
    from tests.fakes import standin_engine

    sys.exit(standin_engine.main())
