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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import math
import os
import re
import signal
import struct
import sys
import time
import zlib
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO
from urllib.parse import parse_qs

import orjson
import uvicorn

from tests.fakes import simcard, standin_routes

VLLM_VERSION: Final = "0.32.0"
DEFAULT_MAX_MODEL_LEN: Final = 8192
DEFAULT_MAX_TOKENS: Final = 16
MAX_LOGPROBS: Final = 20
EMBEDDING_DIM: Final = 32
KV_CAPACITY_SEQUENCES: Final = 16  # fake KV cache: room for this many full-length sequences

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
JSON = dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_PIECE_RE: Final = re.compile(r"[\x01-\x7f]{1,4}|[^\x01-\x7f]")
_MAX_CHAR_ID: Final = 0x10FFFF
_MIN_CHUNK_ID: Final = 0x01000000
_MAX_CHUNK_ID: Final = 0x7F7F7F7F


@functools.lru_cache(maxsize=1 << 16)
def _piece_id(piece: str) -> int:
    if len(piece) == 1 and not 0 < ord(piece) < 0x80:
        return ord(piece)
    return int.from_bytes(piece.encode("ascii").ljust(4, b"\0"), "big")


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the rule)."""
    return [_piece_id(piece) for piece in _PIECE_RE.findall(text)]


def token_text(token_id: int) -> str:
    """The text of one token id; ValueError when the id is not in the vocabulary."""
    if 0 <= token_id <= _MAX_CHAR_ID and not 0xD800 <= token_id <= 0xDFFF:
        return chr(token_id)
    if _MIN_CHUNK_ID <= token_id <= _MAX_CHUNK_ID:
        raw = token_id.to_bytes(4, "big").rstrip(b"\0")
        if all(0 < byte < 0x80 for byte in raw):
            return raw.decode("ascii")
    raise ValueError(f"Token id {token_id} is out of vocabulary")


def decode(token_ids: Sequence[int]) -> str:
    """Text of ``token_ids``; ValueError on an id outside the vocabulary."""
    return "".join(map(token_text, token_ids))


def render_chat(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The prompt text a chat request is tokenized as."""
    text = "".join(f"<|{m.get('role', 'user')}|>\n{_message_text(m.get('content'))}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def _message_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                parts.append(f"<{part['type']}>")
            else:
                raise _bad("Each content part must be an object with a `type`.", "messages")
        return "\n".join(parts)
    raise _bad("Message `content` must be a string or a list of parts.", "messages")


# --------------------------------------------------------------------------------------------------
# Deterministic fake generation
# --------------------------------------------------------------------------------------------------

WORDS: Final[tuple[str, ...]] = tuple(
    f" {a}{b}{c}" for a in "bdfghjklmnprstvz" for b in "aeiou" for c in "bdfghjklmnprstvz"
)
_WORD_JSON: Final = tuple(orjson.dumps(word) for word in WORDS)
_GOLDEN: Final = 0x9E3779B1


def _mix32(value: int) -> int:
    value &= 0xFFFFFFFF
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & 0xFFFFFFFF
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & 0xFFFFFFFF
    return value ^ (value >> 16)


def sequence_seed(model: str, prompt: str, index: int) -> int:
    """Seed of one output sequence: choice ``index`` of ``prompt`` answered by ``model``."""
    return zlib.crc32(f"{model}\0{index}\0{prompt}".encode("utf-8", "surrogatepass"))


def generate_words(seed: int, count: int) -> list[int]:
    """Indices into :data:`WORDS` of the first ``count`` output tokens of a sequence."""
    return [_mix32(seed + k * _GOLDEN) % len(WORDS) for k in range(count)]


def expected_text(model: str, prompt: str, max_tokens: int, index: int = 0) -> str:
    """What the engine answers: ``model`` is the first served name or the adapter name, ``prompt``
    the completion prompt or :func:`render_chat` of the messages, ``index`` the choice index."""
    return "".join(WORDS[w] for w in generate_words(sequence_seed(model, prompt, index), max_tokens))


def _logprob(seed: int, position: int) -> float:
    return -round((_mix32(seed ^ (position * 0x27D4EB2F) ^ 0x5BD1E995) % 2000) / 1000 + 0.001, 4)


def _top_logprobs(token: str, logprob: float, salt: int, count: int) -> dict[str, float]:
    top = {token: logprob}
    for j in range(1, count + 1):
        alternative = WORDS[(salt + j * 97) % len(WORDS)]
        if alternative not in top:
            top[alternative] = round(logprob - 0.5 * j, 4)
    return top


# --------------------------------------------------------------------------------------------------
# Configuration: knobs and command line
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """Fault and pacing settings; see the table in the module docstring."""

    start_delay: float = 0.0
    fail_start: str | None = None
    oom: bool = False
    crash_after_tokens: int | None = None
    die_in_batch: int | None = None
    hang_after: float | None = None
    ignore_sigterm: bool = False
    slow_health: float = 0.0
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    wake_delay: float = 0.0
    fail_wake: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Knobs:
        """Read the ``STANDIN_*`` variables; ValueError names a bad one."""

        def raw(name: str) -> str:
            return env.get(name, "").strip()

        def seconds(name: str) -> float | None:
            text = raw(name)
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {text!r}")
            return value

        def flag(name: str) -> bool:
            return raw(name).lower() in ("1", "true", "yes", "on")

        def message(name: str, default: str) -> str | None:
            text = raw(name)
            if not text or text.lower() in ("0", "false", "no", "off"):
                return None
            return default if text.lower() in ("1", "true", "yes", "on") else text

        crash_text = raw("STANDIN_CRASH_AFTER_TOKENS")
        if crash_text and not crash_text.isdigit():
            raise ValueError(f"STANDIN_CRASH_AFTER_TOKENS must be an integer >= 0, got {crash_text!r}")
        batch_text = raw("STANDIN_DIE_IN_BATCH")
        if batch_text and not (batch_text.isdigit() and int(batch_text) >= 1):
            raise ValueError(f"STANDIN_DIE_IN_BATCH must be an integer >= 1, got {batch_text!r}")
        return cls(
            start_delay=seconds("STANDIN_START_DELAY") or 0.0,
            fail_start=message("STANDIN_FAIL_START", "Engine core initialization failed (stand-in)."),
            oom=flag("STANDIN_OOM"),
            crash_after_tokens=int(crash_text) if crash_text else None,
            die_in_batch=int(batch_text) if batch_text else None,
            hang_after=seconds("STANDIN_HANG"),
            ignore_sigterm=flag("STANDIN_IGNORE_SIGTERM"),
            slow_health=seconds("STANDIN_SLOW_HEALTH") or 0.0,
            token_delay=seconds("STANDIN_TOKEN_DELAY") or 0.0,
            first_token_delay=seconds("STANDIN_FIRST_TOKEN_DELAY") or 0.0,
            wake_delay=seconds("STANDIN_WAKE_DELAY") or 0.0,
            fail_wake=message("STANDIN_FAIL_WAKE", "Failed to wake up the engine (stand-in)."),
        )


@dataclass(frozen=True)
class LoraModule:
    """One adapter: its served name, where it lives, and the base model it belongs to."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(frozen=True)
class ServeArgs:
    """The ``vllm serve`` arguments the stand-in honours, plus the ones it ignored."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    enable_lora: bool = False
    lora_modules: tuple[LoraModule, ...] = ()
    max_lora_rank: int = 16
    enable_sleep_mode: bool = False
    enable_log_requests: bool = False
    max_log_len: int | None = None
    ignored: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)


def _human_int(text: str) -> int:
    if text.strip().lower() in ("auto", "-1"):
        return DEFAULT_MAX_MODEL_LEN
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}")
    number, suffix = match.groups()
    power = "kmg".find(suffix.lower()) + 1 if suffix else 0
    return int(float(number) * (1024 if suffix.isupper() else 1000) ** power)


def _lora_module(text: str) -> LoraModule:
    if text.lstrip().startswith("{"):
        try:
            spec = orjson.loads(text)
            return LoraModule(str(spec["name"]), str(spec["path"]), spec.get("base_model_name"))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON {text!r}: {exc}") from exc
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"--lora-modules wants name=path, got {text!r}")
    return LoraModule(name, path)


def parse_args(argv: Sequence[str]) -> ServeArgs:
    """Parse a ``vllm serve`` command line (after the program name); unknown flags are kept aside."""
    parser = argparse.ArgumentParser(prog="standin_engine", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", allow_abbrev=False, help="serve a fake model like `vllm serve`")
    serve.add_argument("model_tag", nargs="?", default=None)
    serve.add_argument("--model", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--max-model-len", type=_human_int, default=DEFAULT_MAX_MODEL_LEN)
    serve.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[])
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--max-log-len", type=int, default=None)
    ns, unknown = parser.parse_known_args(list(argv))
    model = ns.model_tag or ns.model
    if not model:
        parser.error("serve needs a model (positional MODEL or --model)")
    return ServeArgs(
        model=model,
        host=ns.host,
        port=ns.port,
        served_model_names=tuple(ns.served_model_name or ()),
        max_model_len=ns.max_model_len,
        enable_lora=ns.enable_lora,
        lora_modules=tuple(ns.lora_modules),
        max_lora_rank=ns.max_lora_rank,
        enable_sleep_mode=ns.enable_sleep_mode,
        enable_log_requests=ns.enable_log_requests,
        max_log_len=ns.max_log_len,
        ignored=tuple(unknown),
    )


# --------------------------------------------------------------------------------------------------
# Errors and small ASGI helpers
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer in vLLM's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return orjson.dumps({"error": error})


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


_JSON_TYPE: Final = b"application/json"
_SSE_START: Final[Message] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
_DONE: Final = b"data: [DONE]\n\n"
_NOT_FOUND: Final = b'{"detail":"Not Found"}'
_NOT_ALLOWED: Final = b'{"detail":"Method Not Allowed"}'


async def _respond(send: Send, status: int, body: bytes = b"", content_type: bytes | None = _JSON_TYPE) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _read_json(receive: Receive) -> JSON:
    body = await _read_body(receive)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    return data


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _query(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def _int_field(req: JSON, key: str, default: int | None, *, minimum: int = 0) -> int | None:
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"`{key}` must be an integer.", key)
    if value < minimum:
        raise _bad(f"`{key}` must be at least {minimum}, got {value}.", key)
    return value


def _log(level: str, where: str, message: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(f"{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}\n")
    out.flush()


def _random_id() -> str:
    return os.urandom(16).hex()


# --------------------------------------------------------------------------------------------------
# Engine state and metrics
# --------------------------------------------------------------------------------------------------

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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value))


# --------------------------------------------------------------------------------------------------
# One inference request
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    text: str
    ids: list[int]


@dataclass
class _Seq:
    index: int
    prompt: _Prompt
    seed: int
    words: list[int]


@dataclass
class _Job:
    request_id: str
    created: int
    model: str
    prompts: list[_Prompt]
    seqs: list[_Seq]
    max_tokens: int
    finish_reason: str
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False
    echo_text: str = ""  # chat: the last message's content, echoed when `echo` is set
    fingerprint: str | None = None

    def stamp(self, chunk: JSON, finish: str | None) -> None:
        """vLLM 0.32 stamps ``system_fingerprint`` on a stream's terminal chunks only when no usage chunk
        follows (``vllm/entrypoints/openai/chat_completion/serving.py`` and ``completion/serving.py``,
        the stream generators); otherwise the usage chunk carries it."""
        if finish is not None and not self.include_usage and self.fingerprint is not None:
            chunk["system_fingerprint"] = self.fingerprint

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return self.max_tokens * len(self.seqs)

    def usage(self) -> JSON:
        """Usage of the whole request (each prompt counted once, every choice's tokens)."""
        return _usage(self.prompt_tokens, self.completion_tokens)


def _usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


class _Run:
    """Pacing, sleep, disconnect and accounting of one inference request."""

    def __init__(self, engine: StandInEngine, receive: Receive, kv_tokens: int) -> None:
        self.engine = engine
        self.receive = receive
        self.kv_tokens = kv_tokens
        self.started = time.monotonic()
        self.watch: asyncio.Future[Message] | None = None
        self.waiting = False
        engine.stats.running += 1
        engine.stats.kv_tokens += kv_tokens

    def _watch(self) -> asyncio.Future[Message]:
        if self.watch is None:
            self.watch = asyncio.ensure_future(self.receive())
        return self.watch

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self.waiting:
            delta = 1 if waiting else -1
            self.engine.stats.waiting += delta
            self.engine.stats.running -= delta
            self.waiting = waiting

    async def _awake(self) -> bool:
        awake = self.engine.awake
        if awake.is_set():
            return True
        self._set_waiting(True)
        waiter = asyncio.ensure_future(awake.wait())
        done, _ = await asyncio.wait((waiter, self._watch()), return_when=asyncio.FIRST_COMPLETED)
        self._set_waiting(False)
        if waiter not in done:
            waiter.cancel()
            return False
        return True

    async def pause(self, delay: float) -> bool:
        """Let ``delay`` seconds pass (or yield once); False when the client went away."""
        watch = self._watch()
        if delay > 0:
            done, _ = await asyncio.wait((watch,), timeout=delay)
            return not done
        await asyncio.sleep(0)
        return not watch.done()

    async def prefill(self) -> bool:
        """Wait for an awake engine and the first-token delay; False when the client went away."""
        if not await self._awake():
            return False
        delay = self.engine.knobs.first_token_delay
        if delay > 0 and not (await self.pause(delay) and await self._awake()):
            return False
        self.engine.stats.ttft.observe(time.monotonic() - self.started)
        return True

    async def decode(self) -> bool:
        """Wait for the next token; False when the client went away."""
        return await self.pause(self.engine.knobs.token_delay) and await self._awake()

    def check_crash(self, produced: int) -> None:
        """Die as configured when a request that has ``produced`` tokens needs another."""
        limit = self.engine.knobs.crash_after_tokens
        if limit is not None and produced >= limit:
            _crash(f"stand-in: crashing after {produced} tokens (STANDIN_CRASH_AFTER_TOKENS={limit})")

    def close(self, *, completed: bool, tokens: int, finish_reason: str | None) -> None:
        stats = self.engine.stats
        if self.waiting:
            stats.waiting -= 1
        else:
            stats.running -= 1
        stats.kv_tokens -= self.kv_tokens
        if self.watch is not None:
            self.watch.cancel()
        stats.generation_tokens += tokens
        if completed:
            stats.completed += 1
            stats.e2e.observe(time.monotonic() - self.started)
            if finish_reason is not None:
                stats.finished[finish_reason] = stats.finished.get(finish_reason, 0) + 1
        else:
            stats.cancelled += 1


def _crash(reason: str) -> NoReturn:
    _log("ERROR", "core.py:1021", "EngineCore encountered a fatal error.", sys.stderr)
    _log("ERROR", "core.py:1021", reason, sys.stderr)
    _log("ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.", sys.stderr)
    _log("ERROR", "async_llm.py:480", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered "
         "an issue. See stack trace (above) for the root cause.", sys.stderr)
    sys.stdout.flush()
    os._exit(1)


#: vLLM's ``EngineDeadError`` message (``vllm/v1/engine/exceptions.py``), served as a 500 by
#: ``vllm/entrypoints/serve/exception_handling/handlers/vllm_error.py`` ``engine_error_handler``.
ENGINE_DEAD_MESSAGE: Final = "EngineCore encountered an issue. See stack trace (above) for the root cause."
#: The root cause the EngineCore prints under ``STANDIN_DIE_IN_BATCH`` (the real CPU LoRA crash's shape).
BATCH_DEATH_CAUSE: Final = ("RuntimeError: einsum(): subscript b has size {n} for operand 1 which does not "
                            "broadcast with previously seen size {tokens} (stand-in)")


def _die_in_batch(running: int, tokens: int) -> None:
    """Print what vLLM prints when its EngineCore dies in a step, then exit 0 a second later."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    core, api = f"(EngineCore pid={os.getpid()}) ERROR {stamp} [core.py:1512] ", f"(APIServer pid={os.getpid()}) "
    lines = [f"{core}EngineCore encountered a fatal error.",
             f"{core}Traceback (most recent call last):",
             f'{core}  File "vllm/lora/ops/torch_ops/lora_ops.py", line 78, in bgmv_shrink',
             f'{core}    outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)',
             core + BATCH_DEATH_CAUSE.format(n=running, tokens=tokens),
             f"{api}ERROR {stamp} [async_llm.py:906] AsyncLLM output_handler failed.",
             f"{api}ERROR {stamp} [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: {ENGINE_DEAD_MESSAGE}"]
    for request in range(running):  # vLLM logs a traceback per failed request: the cause scrolls far up
        lines.append(f"{api}ERROR {stamp} [vllm_error.py:54] Engine Exception caught. Request id: cmpl-{request}")
        lines += [f'{api}ERROR {stamp} [vllm_error.py:54]   File "fastapi/routing.py", line {n}, in app'
                  for n in range(250 // max(1, running))]
    lines.append("  warnings.warn('resource_tracker: There appear to be %d '")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    asyncio.get_running_loop().call_later(1.0, os._exit, 0)


def _template(chunk: JSON, sentinel: str) -> tuple[bytes, bytes]:
    """Split an SSE chunk around the JSON string ``sentinel`` to splice pre-encoded text in."""
    head, found, tail = (b"data: " + orjson.dumps(chunk) + b"\n\n").partition(orjson.dumps(sentinel))
    assert found, sentinel
    return head, tail


_TEXT: Final = "\x01standin-text\x01"


# --------------------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------------------


class StandInEngine:
    """vLLM's HTTP API over a fake, deterministic model, as a raw ASGI app."""

    def __init__(self, args: ServeArgs, knobs: Knobs, *, dev_mode: bool, runtime_lora: bool,
                 sim: simcard.SimEngine | None = None) -> None:
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
                await _respond(send, 404, _NOT_FOUND)
            else:
                await _respond(send, 405, _NOT_ALLOWED)
        except ApiError as exc:
            await _respond(send, exc.status, exc.body())
        except _ClientGone:
            pass

    # -- plain endpoints ---------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.knobs.slow_health > 0:
            await asyncio.sleep(self.knobs.slow_health)
        await _respond(send, 200, content_type=None)

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, orjson.dumps({"version": VLLM_VERSION}))

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = int(time.time())

        def card(name: str, root: str, parent: str | None, max_model_len: int | None) -> JSON:
            permission = {
                "id": f"modelperm-{_random_id()}", "object": "model_permission", "created": now,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }
            return {"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": root,
                    "parent": parent, "max_model_len": max_model_len, "permission": [permission]}

        data = [card(name, self.args.model, None, self.args.max_model_len) for name in self.names]
        data += [card(m.name, m.path, m.base_model_name or self.base_name, None) for m in self.loras.values()]
        await _respond(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.stats
        body = {
            "requests": s.requests, "cancelled": s.cancelled, "in_flight": s.running + s.waiting,
            "completed": s.completed, "rejected": s.rejected, "running": s.running, "waiting": s.waiting,
            "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
            "by_model": s.by_model, "sleeping": not self.awake.is_set(), "sleep_level": self.sleep_level,
            "loras": sorted(self.loras), "pid": os.getpid(), "received": s.received,
        }
        await _respond(send, 200, orjson.dumps(body))

    async def _last_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        last = dict(self.last_request)
        if "headers" in last:
            last["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in last["headers"]}
        await _respond(send, 200, orjson.dumps(last))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self.metrics_text().encode(), b"text/plain; version=0.0.4; charset=utf-8")

    def metrics_text(self) -> str:
        """Prometheus text with the ``vllm:*`` series gateways read, labelled like vLLM's."""
        s = self.stats
        model = _label(self.base_name)
        labels = f'engine="0",model_name="{model}"'
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

        def sample(name: str, value: float, extra: str = "") -> None:
            out.append(f"{name}{{{labels}{extra}}} {_num(value)}\n")

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        sample("vllm:num_requests_running", s.running)
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        sample("vllm:num_requests_waiting", s.waiting)
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        capacity = KV_CAPACITY_SEQUENCES * self.args.max_model_len
        sample("vllm:kv_cache_usage_perc", min(1.0, s.kv_tokens / capacity))
        family("vllm:engine_sleep_state", "gauge",
               "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
               "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.")
        for state, on in (("awake", self.sleep_level == 0), ("weights_offloaded", self.sleep_level == 1),
                          ("discard_all", self.sleep_level == 2)):
            out.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {_num(on)}\n')
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        sample("vllm:prompt_tokens_total", s.prompt_tokens)
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        sample("vllm:generation_tokens_total", s.generation_tokens)
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason in ("abort", "length", "stop"):
            out.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{model}"}} '
                       f"{_num(s.finished.get(reason, 0))}\n")
        for name, text, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.e2e),
        ):
            family(name, "histogram", text)
            cumulative = 0
            for bound, count in zip((*hist.buckets, math.inf), hist.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else _num(bound)
                out.append(f'{name}_bucket{{engine="0",le="{le}",model_name="{model}"}} {_num(cumulative)}\n')
            sample(f"{name}_count", hist.count)
            sample(f"{name}_sum", hist.total)
        return "".join(out)

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
            raise _bad("`model` must be a string.", "model")
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
            raise _bad(f"This model's maximum context length is {limit} tokens. However, your request has "
                       f"{prompt_len} input tokens. Please reduce the length of the input messages.", "messages")
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise _bad(f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                       f"maximum context length is {limit} tokens and your request has {prompt_len} input "
                       f"tokens ({max_tokens} > {limit} - {prompt_len}).", "max_tokens")
        return max_tokens

    def _job(self, scope: Scope, req: JSON, *, kind: str, model: str, seed_name: str,
             prompts: list[_Prompt], max_tokens: int | None) -> _Job:
        n = _int_field(req, "n", 1, minimum=1) or 1
        tokens = min(self._check_length(len(prompt.ids), max_tokens) for prompt in prompts)
        stream = bool(req.get("stream"))
        options = req.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("`stream_options` must be an object.", "stream_options")
        if options and not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        # StreamOptions.include_usage defaults to False (vllm/entrypoints/generate/base/protocol.py).
        include_usage = bool(options.get("include_usage")) if options else False
        if self.sim is not None and self.sim.garbage(seed_name):  # discarded weights answer something else
            seed_name += "\0discarded weights"
        seqs: list[_Seq] = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seed = sequence_seed(seed_name, prompt.text, i)
                seqs.append(_Seq(p * n + i, prompt, seed, generate_words(seed, tokens)))
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return _Job(
            request_id=prefix + (_header(scope, b"x-request-id") or _random_id()),
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

    async def _run(self, receive: Receive, send: Send, job: _Job,
                   body: Callable[[_Run], Awaitable[bool]]) -> None:
        self.stats.prompt_tokens += job.prompt_tokens
        if self.args.enable_log_requests:
            self._log_request(job)
        kv = sum(len(seq.prompt.ids) + job.max_tokens for seq in job.seqs)
        run = _Run(self, receive, kv)
        completed = False
        try:
            completed = await body(run)
        finally:
            run.close(completed=completed, tokens=job.completion_tokens if completed else 0,
                      finish_reason=job.finish_reason)

    def _log_request(self, job: _Job) -> None:
        """vLLM's request log, written synchronously from the serving loop
        (``vllm/entrypoints/serve/utils/request_logger.py``, ``RequestLogger.log_inputs``): the prompt
        at DEBUG (cut to ``--max-log-len``), then the "Received request" line at INFO."""
        where = "request_logger.py:65"
        if os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() == "DEBUG":
            for prompt in job.prompts:
                text = prompt.text if self.args.max_log_len is None else prompt.text[: self.args.max_log_len]
                _log("DEBUG", "request_logger.py:55", f"Request {job.request_id} details: prompt: {text!r}, "
                     "prompt_token_ids: None, prompt_embeds shape: None.")
        _log("INFO", where, f"Received request {job.request_id}: params: SamplingParams(n={len(job.seqs)}, "
             f"temperature=1.0, max_tokens={job.max_tokens}), lora_request: None.")

    async def _generate_all(self, run: _Run, job: _Job) -> bool:
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

    def _check_batch(self, job: _Job) -> None:
        """``STANDIN_DIE_IN_BATCH``: die when the batch is full; once dead, fail every request."""
        limit = self.knobs.die_in_batch
        if limit is None:
            return
        if not self.core_dead and self.stats.running >= limit:
            self.core_dead = True
            _die_in_batch(self.stats.running, sum(len(seq.prompt.ids) for seq in job.seqs) * self.stats.running)
        if self.core_dead:
            raise ApiError(500, ENGINE_DEAD_MESSAGE, "InternalServerError")

    # -- completions -------------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            prompts = _completion_prompts(req.get("prompt"))
            job = self._job(scope, req, kind="completion", model=model, seed_name=seed_name, prompts=prompts,
                            max_tokens=_int_field(req, "max_tokens", None))
            job.logprobs = _int_field(req, "logprobs", None)
            job.return_token_ids = bool(req.get("return_token_ids"))
            if job.logprobs is not None and job.logprobs > MAX_LOGPROBS:
                raise _bad(f"Requested sample logprobs of {job.logprobs}, which is greater than max allowed: "
                           f"{MAX_LOGPROBS}", "logprobs")
        except ApiError:
            self.stats.rejected += 1
            raise
        if req.get("stream"):
            await self._run(receive, send, job, lambda run: self._stream_completion(run, send, job))
        else:
            await self._run(receive, send, job, lambda run: self._complete(run, send, job))

    def _completion_logprobs(self, job: _Job, seq: _Seq, start: int, stop: int, *, with_prompt: bool,
                             offset: int = 0) -> JSON:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        k = job.logprobs or 0
        if with_prompt:
            for position, token_id in enumerate(seq.prompt.ids):
                text = token_text(token_id)
                tokens.append(text)
                if position == 0:
                    token_logprobs.append(None)
                    top.append(None)
                else:
                    lp = _logprob(token_id, position)
                    token_logprobs.append(lp)
                    top.append(_top_logprobs(text, lp, token_id + position, k))
        for position in range(start, stop):
            word = WORDS[seq.words[position]]
            lp = _logprob(seq.seed, position)
            tokens.append(word)
            token_logprobs.append(lp)
            top.append(_top_logprobs(word, lp, seq.seed + position, k))
        offsets: list[int] = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}

    async def _complete(self, run: _Run, send: Send, job: _Job) -> bool:
        if not await self._generate_all(run, job):
            return False
        choices = []
        for seq in job.seqs:
            text = "".join(WORDS[w] for w in seq.words)
            logprobs = None
            if job.logprobs is not None:
                logprobs = self._completion_logprobs(job, seq, 0, job.max_tokens, with_prompt=job.echo)
            choices.append({
                "index": seq.index, "text": seq.prompt.text + text if job.echo else text, "logprobs": logprobs,
                "finish_reason": job.finish_reason, "stop_reason": None,
                "token_ids": [encode(WORDS[w])[0] for w in seq.words] if job.return_token_ids else None,
                "prompt_logprobs": None, "prompt_token_ids": seq.prompt.ids if job.return_token_ids else None,
            })
        body = {
            "id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "service_tier": None, "system_fingerprint": job.fingerprint,
            "usage": {**job.usage(), "prompt_tokens_details": None}, "kv_transfer_params": None,
        }
        await _respond(send, 200, orjson.dumps(body))
        return True

    def _completion_chunk(self, job: _Job, index: int, text: str, *, logprobs: JSON | None = None,
                          finish: str | None = None, usage: JSON | None = None) -> JSON:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                  "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
        chunk: JSON = {"id": job.request_id, "object": "text_completion", "created": job.created,
                       "model": job.model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        job.stamp(chunk, finish)
        return chunk

    async def _stream_completion(self, run: _Run, send: Send, job: _Job) -> bool:
        await send(_SSE_START)
        if not await run.prefill():
            return False
        plain = not (job.echo or job.logprobs is not None or job.continuous_usage)
        templates = [
            (_template(self._completion_chunk(job, seq.index, _TEXT), _TEXT),
             _template(self._completion_chunk(job, seq.index, _TEXT, finish=job.finish_reason), _TEXT))
            for seq in job.seqs
        ] if plain else []
        offsets = [0] * len(job.seqs)
        for k in range(job.max_tokens):
            if k > 0 and not await run.decode():
                return False
            run.check_crash(k)
            last = k == job.max_tokens - 1
            for s, seq in enumerate(job.seqs):
                word = seq.words[k]
                if plain:
                    head, tail = templates[s][last]
                    await _chunk(send, head + _WORD_JSON[word] + tail)
                    continue
                echo = job.echo and k == 0
                text = seq.prompt.text + WORDS[word] if echo else WORDS[word]
                logprobs = None
                if job.logprobs is not None:
                    logprobs = self._completion_logprobs(job, seq, k, k + 1, with_prompt=echo, offset=offsets[s])
                offsets[s] += len(text)
                usage = _usage(len(seq.prompt.ids), k + 1) if job.continuous_usage else None
                chunk = self._completion_chunk(job, seq.index, text, logprobs=logprobs,
                                               finish=job.finish_reason if last else None, usage=usage)
                await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.max_tokens == 0 and job.echo:
            for seq in job.seqs:
                logprobs = None
                if job.logprobs is not None:
                    logprobs = self._completion_logprobs(job, seq, 0, 0, with_prompt=True)
                usage = _usage(len(seq.prompt.ids), 0) if job.continuous_usage else None
                chunk = self._completion_chunk(job, seq.index, seq.prompt.text, logprobs=logprobs,
                                               finish=job.finish_reason, usage=usage)
                await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        await self._finish_stream(send, job, "text_completion")
        return True

    async def _finish_stream(self, send: Send, job: _Job, kind: str) -> None:
        if job.include_usage:
            final = {"id": job.request_id, "object": kind, "created": job.created, "model": job.model,
                     "choices": [], "usage": job.usage(), "system_fingerprint": job.fingerprint}
            await _chunk(send, b"data: " + orjson.dumps(final) + b"\n\n")
        await send({"type": "http.response.body", "body": _DONE})

    # -- chat --------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise _bad("`messages` must be a non-empty list of objects.", "messages")
            add_generation_prompt = req.get("add_generation_prompt", True) is not False
            text = render_chat(messages, add_generation_prompt=add_generation_prompt)
            max_tokens = _int_field(req, "max_completion_tokens", None)
            if max_tokens is None:
                max_tokens = _int_field(req, "max_tokens", None)
            job = self._job(scope, req, kind="chat", model=model, seed_name=seed_name,
                            prompts=[_Prompt(text, encode(text))], max_tokens=max_tokens)
            top = _int_field(req, "top_logprobs", 0) or 0
            if top > MAX_LOGPROBS:
                raise _bad(f"`top_logprobs` must be at most {MAX_LOGPROBS}.", "top_logprobs")
            if req.get("logprobs"):
                job.logprobs = top
            elif top:
                raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            role = "assistant" if add_generation_prompt else str(messages[-1].get("role", "assistant"))
            if job.echo and messages[-1].get("role") == role:
                job.echo_text = _message_text(messages[-1].get("content"))
        except ApiError:
            self.stats.rejected += 1
            raise
        if req.get("stream"):
            await self._run(receive, send, job, lambda run: self._stream_chat(run, send, job))
        else:
            await self._run(receive, send, job, lambda run: self._chat_complete(run, send, job))

    def _chat_logprobs(self, job: _Job, seq: _Seq, start: int, stop: int) -> JSON:
        content = []
        for position in range(start, stop):
            word = WORDS[seq.words[position]]
            lp = _logprob(seq.seed, position)
            top = list(_top_logprobs(word, lp, seq.seed + position, job.logprobs or 0).items())
            content.append({
                "token": word, "logprob": lp, "bytes": list(word.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                 for t, v in top[: job.logprobs or 0]],
            })
        return {"content": content}

    async def _chat_complete(self, run: _Run, send: Send, job: _Job) -> bool:
        if not await self._generate_all(run, job):
            return False
        choices = []
        for seq in job.seqs:
            message = {"role": "assistant", "content": job.echo_text + "".join(WORDS[w] for w in seq.words),
                       "refusal": None, "annotations": None, "audio": None, "function_call": None,
                       "reasoning": None}
            logprobs = self._chat_logprobs(job, seq, 0, job.max_tokens) if job.logprobs is not None else None
            choices.append({"index": seq.index, "message": message, "logprobs": logprobs,
                            "finish_reason": job.finish_reason, "stop_reason": None, "token_ids": None})
        body = {
            "id": job.request_id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "service_tier": None, "system_fingerprint": job.fingerprint,
            "usage": {**job.usage(), "prompt_tokens_details": None}, "prompt_logprobs": None,
            "prompt_token_ids": None, "kv_transfer_params": None,
        }
        await _respond(send, 200, orjson.dumps(body))
        return True

    def _chat_chunk(self, job: _Job, index: int, delta: JSON, *, logprobs: JSON | None = None,
                    finish: str | None = None, token_ids: bool = True, usage: JSON | None = None) -> JSON:
        choice: JSON = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        if token_ids:
            choice["token_ids"] = None
        chunk: JSON = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created,
                       "model": job.model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        job.stamp(chunk, finish)
        return chunk

    async def _stream_chat(self, run: _Run, send: Send, job: _Job) -> bool:
        await send(_SSE_START)
        if not await run.prefill():
            return False
        for seq in job.seqs:
            chunk = self._chat_chunk(job, seq.index, {"role": "assistant", "content": ""}, token_ids=False,
                                     usage=_usage(len(seq.prompt.ids), 0) if job.continuous_usage else None)
            chunk["prompt_token_ids"] = None
            await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.echo_text:
            for seq in job.seqs:
                chunk = self._chat_chunk(job, seq.index, {"content": job.echo_text}, token_ids=False,
                                         usage=_usage(len(seq.prompt.ids), 0) if job.continuous_usage else None)
                await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        plain = not (job.logprobs is not None or job.continuous_usage)
        templates = [
            (_template(self._chat_chunk(job, seq.index, {"content": _TEXT}), _TEXT),
             _template(self._chat_chunk(job, seq.index, {"content": _TEXT}, finish=job.finish_reason), _TEXT))
            for seq in job.seqs
        ] if plain else []
        for k in range(job.max_tokens):
            if k > 0 and not await run.decode():
                return False
            run.check_crash(k)
            last = k == job.max_tokens - 1
            for s, seq in enumerate(job.seqs):
                word = seq.words[k]
                if plain:
                    head, tail = templates[s][last]
                    await _chunk(send, head + _WORD_JSON[word] + tail)
                    continue
                logprobs = self._chat_logprobs(job, seq, k, k + 1) if job.logprobs is not None else None
                chunk = self._chat_chunk(job, seq.index, {"content": WORDS[word]}, logprobs=logprobs,
                                         finish=job.finish_reason if last else None,
                                         usage=_usage(len(seq.prompt.ids), k + 1) if job.continuous_usage else None)
                await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.max_tokens == 0:
            for seq in job.seqs:
                chunk = self._chat_chunk(job, seq.index, {"content": ""}, finish=job.finish_reason)
                await _chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        await self._finish_stream(send, job, "chat.completion.chunk")
        return True

    # -- embeddings, tokenizer ---------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            prompts = _completion_prompts(req.get("input"), param="input")
            for prompt in prompts:
                self._check_length(len(prompt.ids), 0)
            dims = _int_field(req, "dimensions", EMBEDDING_DIM, minimum=1) or EMBEDDING_DIM
            encoding = req.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise _bad("`encoding_format` must be 'float' or 'base64'.", "encoding_format")
        except ApiError:
            self.stats.rejected += 1
            raise
        prompt_tokens = sum(len(p.ids) for p in prompts)
        self.stats.prompt_tokens += prompt_tokens
        run = _Run(self, receive, prompt_tokens)
        completed = False
        try:
            if not await run.prefill():
                return
            data = []
            for index, prompt in enumerate(prompts):
                vector = _embedding(sequence_seed(seed_name, prompt.text, 0), dims)
                value: list[float] | str = vector
                if encoding == "base64":
                    value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                data.append({"index": index, "object": "embedding", "embedding": value})
            body = {"id": f"embd-{_random_id()}", "object": "list", "created": int(time.time()), "model": model,
                    "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                            "completion_tokens": 0, "prompt_tokens_details": None}}
            await _respond(send, 200, orjson.dumps(body))
            completed = True
        finally:
            run.close(completed=completed, tokens=0, finish_reason=None)

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        self._admit_tokenizer(scope, req)
        if "messages" in req:
            messages = req["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise _bad("`messages` must be a list of objects.", "messages")
            text = render_chat(messages, add_generation_prompt=req.get("add_generation_prompt", True) is not False)
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                raise _bad("`prompt` must be a string.", "prompt")
            text = prompt
        ids = encode(text)
        strs = [token_text(i) for i in ids] if req.get("return_token_strs") else None
        body = {"count": len(ids), "max_model_len": self.args.max_model_len, "tokens": ids, "token_strs": strs}
        await _respond(send, 200, orjson.dumps(body))

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        self._admit_tokenizer(scope, req)
        tokens = req.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _bad("`tokens` must be a list of integers.", "tokens")
        try:
            text = decode(tokens)
        except ValueError as exc:
            raise _bad(str(exc), "tokens") from exc
        await _respond(send, 200, orjson.dumps({"prompt": text}))

    def _admit_tokenizer(self, scope: Scope, req: JSON) -> None:
        name = req.get("model")
        if name and name not in self.names and name not in self.loras:
            raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    # -- sleep mode --------------------------------------------------------------------------------

    async def _sleep(self, scope: Scope, receive: Receive, send: Send) -> None:
        level_text = _query(scope, "level") or "1"
        if level_text not in ("1", "2"):
            raise _bad(f"Sleep level must be 1 or 2, got {level_text!r}.", "level")
        if not self.args.enable_sleep_mode:
            _log("WARNING", "gpu_worker.py:118",
                 "Sleep mode was not enabled (--enable-sleep-mode): sleeping frees no memory.")
        self.sleep_level = int(level_text)
        self.awake.clear()
        self.sleeping_tags = set(simcard.SLEEP_TAGS)
        if self.sim is not None and self.args.enable_sleep_mode:
            freed, used = self.sim.sleep(self.sleep_level, adapters=sorted(self.loras))
            _log("INFO", "gpu_worker.py:330", f"Sleep mode freed {simcard.format_gib(freed)} GiB memory, "
                 f"{simcard.format_gib(used)} GiB memory is still in use.")
        _log("INFO", "gpu_worker.py:124", f"Sleep level {level_text}: it took 0.000001 seconds to fall asleep.")
        await _respond(send, 200, orjson.dumps({"status": "sleeping", "level": self.sleep_level}))

    async def _wake_up(self, scope: Scope, receive: Receive, send: Send) -> None:
        tags = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("tags") or None
        if self.sleep_level:
            if self.knobs.wake_delay > 0:
                await asyncio.sleep(self.knobs.wake_delay)
            if self.knobs.fail_wake is not None:
                _log("ERROR", "gpu_worker.py:140", self.knobs.fail_wake, sys.stderr)
                raise ApiError(500, self.knobs.fail_wake, "InternalServerError")
            if self.sim is not None and self.args.enable_sleep_mode:
                try:
                    self.sim.wake(tags)
                except simcard.CudaOutOfMemory as exc:
                    _log("ERROR", "cumem.py:300", str(exc), sys.stderr)
                    raise ApiError(500, str(exc), "InternalServerError") from exc
            self.sleeping_tags -= set(tags) if tags else self.sleeping_tags
            if not self.sleeping_tags:  # vllm/v1/engine/core.py EngineCore.wake_up: only when fully awake
                self.sleep_level = 0
                self.awake.set()
            _log("INFO", "gpu_worker.py:150", f"Woke up tags {tags} in {self.knobs.wake_delay:.3f} seconds.")
        fully = self.awake.is_set()
        await _respond(send, 200, orjson.dumps({"status": "awake" if fully else "sleeping", "tags": tags}))

    async def _collective_rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        method = req.get("method")
        if method is None:
            raise ApiError(400, "Missing 'method' in request body", "BadRequestError")
        if method != "reload_weights":
            raise ApiError(500, f"Method {method!r} is not supported by the stand-in", "InternalServerError")
        if self.sim is not None:
            try:
                self.sim.reload_weights()
            except RuntimeError as exc:
                raise ApiError(500, str(exc), "InternalServerError") from exc
        _log("INFO", "gpu_model_runner.py:2700", "Reloading weights inplace...")
        await _respond(send, 200, orjson.dumps({"results": [None]}))

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        _log("INFO", "api_router.py:39", "Resetting prefix cache...")
        await _respond(send, 200, orjson.dumps({"success": True}))

    async def _is_sleeping(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, orjson.dumps({"is_sleeping": not self.awake.is_set()}))

    # -- runtime LoRA ------------------------------------------------------------------------------

    async def _load_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        name, path = req.get("lora_name"), req.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.loras and not req.get("load_inplace"):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                           "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        error = _check_lora(self.args, LoraModule(name, path))
        if error is not None:
            raise error
        self.loras[name] = LoraModule(name, path, None)
        if self.sim is not None:
            self.sim.adapter_reloaded(name)
        _log("INFO", "serving_models.py:200", f"Loaded new LoRA adapter: name '{name}', path '{path}'")
        body = f"Success: LoRA adapter '{name}' added successfully.".encode()
        await _respond(send, 200, body, b"text/plain; charset=utf-8")

    async def _unload_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await _read_json(receive)
        name = req.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if name not in self.loras:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loras[name]
        _log("INFO", "serving_models.py:230", f"Removed LoRA adapter: name '{name}'")
        body = f"Success: LoRA adapter '{name}' removed successfully.".encode()
        await _respond(send, 200, body, b"text/plain; charset=utf-8")


def _completion_prompts(prompt: object, *, param: str = "prompt") -> list[_Prompt]:
    """vLLM's prompt forms: a string, a list of strings, token ids, or a list of token-id lists."""

    def is_ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    def from_ids(ids: list[int]) -> _Prompt:
        try:
            return _Prompt(decode(ids), ids)
        except ValueError as exc:
            raise _bad(str(exc), param) from exc

    if isinstance(prompt, str) and prompt:
        return [_Prompt(prompt, encode(prompt))]
    if is_ids(prompt):
        assert isinstance(prompt, list)
        return [from_ids(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) and p for p in prompt):
            return [_Prompt(p, encode(p)) for p in prompt]
        if all(is_ids(p) for p in prompt):
            return [from_ids(p) for p in prompt]
    raise _bad(f"`{param}` must be a non-empty string, a list of strings, a list of token ids or a list of "
               "token-id lists.", param)


def _embedding(seed: int, dims: int) -> list[float]:
    raw = [_mix32(seed + i * _GOLDEN) / 0x7FFFFFFF - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _check_lora(args: ServeArgs, module: LoraModule) -> ApiError | None:
    """The error vLLM gives when this adapter cannot be loaded, else None."""
    if not args.enable_lora:
        return ApiError(500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", "InternalServerError")
    path = Path(module.path)
    if not path.exists():
        return ApiError(404, f"Loading lora {module.name} failed: No adapter found for {module.path}",
                        "NotFoundError")
    config = path / "adapter_config.json"
    if config.is_file():
        try:
            rank = orjson.loads(config.read_bytes()).get("r")
        except (orjson.JSONDecodeError, AttributeError, OSError):
            rank = None
        if isinstance(rank, int) and rank > args.max_lora_rank:
            return ApiError(500, f"LoRA rank {rank} is greater than max_lora_rank {args.max_lora_rank}.",
                            "InternalServerError")
    return None


# --------------------------------------------------------------------------------------------------
# Process: start-up, faults, serving
# --------------------------------------------------------------------------------------------------

_OOM_TEXT: Final = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of "
    "23.55 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in "
    "use. Of the allocated memory 21.95 GiB is allocated by PyTorch, and 84.50 MiB is reserved by PyTorch "
    "but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


def _fail_start(*lines: str) -> int:
    where = "core.py:708"
    _log("ERROR", where, "EngineCore failed to start.", sys.stderr)
    for line in lines:
        _log("ERROR", where, line, sys.stderr)
    sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above. "
                     "Failed core proc(s): {}\n")
    sys.stderr.flush()
    return 1


def _hang_forever() -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _log("WARNING", "standin_engine", "STANDIN_HANG: blocking for ever; only SIGKILL stops this process",
         sys.stderr)
    while True:
        time.sleep(3600)


async def _serve(server: uvicorn.Server, knobs: Knobs) -> None:
    task = asyncio.create_task(server.serve())
    await asyncio.sleep(0)  # uvicorn installs its signal handlers as soon as serve() starts
    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers no "started" event
        await asyncio.sleep(0.005)
    if knobs.hang_after is not None and server.started:
        asyncio.get_running_loop().call_later(knobs.hang_after, _hang_forever)
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
    _log("INFO", "api_server.py:1885", f"vLLM API server version {VLLM_VERSION} (stand-in engine)")
    _log("INFO", "utils.py:328", f"non-default args: {{'model': {args.model!r}, 'host': {args.host!r}, "
         f"'port': {args.port}, 'served_model_name': {list(args.names)!r}, 'max_model_len': "
         f"{args.max_model_len}, 'enable_lora': {args.enable_lora}, 'enable_sleep_mode': "
         f"{args.enable_sleep_mode}}}")
    if args.ignored:
        _log("INFO", "standin_engine", f"ignored flags: {' '.join(args.ignored)}")
    _log("INFO", "gpu_model_runner.py:2000", f"Starting to load model {args.model}...")
    if knobs.start_delay > 0:
        time.sleep(knobs.start_delay)
    if knobs.oom:
        return _fail_start("Traceback (most recent call last):",
                           '  File "vllm/v1/worker/gpu_model_runner.py", line 2620, in load_model', _OOM_TEXT)
    if knobs.fail_start is not None:
        return _fail_start(knobs.fail_start)
    for module in args.lora_modules:
        error = _check_lora(args, module)
        if error is not None:
            return _fail_start(f"ValueError: {error.message}")
    sim = None
    if os.environ.get(simcard.ENV_LEDGER):
        try:
            sim = simcard.SimEngine.start(
                simcard.Ledger(os.environ[simcard.ENV_LEDGER]), model_dir=args.model, flags=args.ignored,
                served_name=args.names[0], skip_reload=os.environ.get(simcard.ENV_SKIP_RELOAD) == "1")
        except simcard.StartRefused as exc:
            return _fail_start(*exc.lines)
    _log("INFO", "gpu_model_runner.py:2100",
         f"Model loading took 0.0000 GiB and {knobs.start_delay:.6f} seconds")
    for module in args.lora_modules:
        _log("INFO", "serving_models.py:200", f"Loaded new LoRA adapter: name '{module.name}', path '{module.path}'")
    engine = StandInEngine(
        args, knobs,
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip() == "1",
        runtime_lora=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true"),
        sim=sim,
    )
    _log("INFO", "api_server.py:1971", f"Starting vLLM API server 0 on http://{args.host}:{args.port}")
    config = uvicorn.Config(engine, host=args.host, port=args.port, loop="uvloop", http="httptools",
                            lifespan="on", access_log=False, log_level="info", timeout_graceful_shutdown=1,
                            backlog=4096)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(uvicorn.Server(config), knobs))
    return 0


if __name__ == "__main__":  # run the importable module, so that standin_routes shares its classes
    from tests.fakes import standin_engine

    sys.exit(standin_engine.main())
