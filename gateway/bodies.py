"""Request bodies: read with a cap, parsed once, and never on the event loop when they are large.

::

    body = await read_body(request, settings.max_body_bytes)
    parsed = await parser.prepare(body, served_name, served_names, usage=True)  # parser: BodyParser
    parsed.model, parsed.stream, parsed.payload      # payload: what the engine receives

Parsing a body costs CPU in proportion to its size and holds the GIL: 30 MiB of small numbers takes
orjson 0.4 s and Python's json 1 s, plus 1.5 s to write it again. A thread would not help (neither
parser releases the GIL), so bodies over ``inline_bytes`` are prepared in a worker process, and the
gateway's loop only copies bytes. Smaller ones (a few ms at most) are prepared inline.

Admin routes take small JSON bodies only: :class:`AdminBodyLimit` refuses anything larger before the
route reads it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, error_response


@dataclass(frozen=True)
class Parsed:
    """A request body read for forwarding: the model the client named, and the bytes to send on."""

    model: str
    stream: bool
    strip_usage: bool  # the gateway added include_usage; hide the usage event from the client
    payload: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes, declared or as it arrives; ClientDisconnect if
    the client leaves first. Read from the ASGI ``receive`` itself: Starlette's ``Request.stream()``, an
    async generator, costs more than the read of a small body, and nothing reads the body again."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    receive = request.receive
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_json_type(content_type: str | None) -> None:
    """Refuse a body that says it is not JSON, as vLLM does (vllm/entrypoints/serve/utils/api_utils.py,
    ``validate_json_request``: only ``application/json``). Those are also the types a web page may send
    cross-site without a preflight (``text/plain``, forms). A body with no Content-Type is taken as
    JSON, as the gateway always did (the engine is sent ``application/json``)."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(f"the request body must be JSON (Content-Type: application/json), "
                                   f"not {media[:100]!r}")


def parse_json(body: bytes) -> tuple[dict[str, Any], bool]:
    """The request's JSON object, and whether it took Python's lenient parser: what orjson refuses and
    vLLM's own parser takes (NaN, lone surrogates, integers past 64 bits) must reach the engine as sent."""
    if not body:
        raise BadRequest("the request body is empty; send a JSON object with at least 'model'")
    lenient = False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        lenient = True
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest("the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    return data, lenient


def prepare(body: bytes, served: Callable[[str], str | None], *, usage: bool, priority: int | None = None,
            keep_priority: bool = False) -> Parsed:
    """Parse ``body`` and rewrite what the gateway must: ``model`` to the engine's served name (when
    ``served`` knows the name), for a stream ``stream_options.include_usage`` when ``usage``, and vLLM's
    ``priority`` when given (the sender's class; a client's own value is kept only with ``keep_priority``).
    Everything else is sent as the client wrote it (the original bytes when nothing changed)."""
    data, lenient = parse_json(body)
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    stream = bool(stream)
    changed = False
    served_name = served(name)
    if served_name is not None and served_name != name:
        data["model"] = served_name
        changed = True
    strip_usage = False
    if stream and usage:
        opts = data.get("stream_options")
        if opts is None:
            data["stream_options"] = {"include_usage": True}
            strip_usage = changed = True
        elif isinstance(opts, dict) and not opts.get("include_usage") and not opts.get("continuous_usage_stats"):
            # With continuous_usage_stats set, include_usage would put usage on every chunk
            # (vllm/entrypoints/serve/utils/api_utils.py, should_include_usage): left as the client sent it.
            opts["include_usage"] = True
            strip_usage = changed = True
    # vLLM reads a missing priority as 0 (vllm/entrypoints/openai/completion/protocol.py, ``priority``)
    current = data.get("priority", 0)
    if priority is not None and not (keep_priority and "priority" in data) and (
            current != priority or isinstance(current, bool)):
        data["priority"] = priority
        changed = True
    payload = (json.dumps(data).encode() if lenient else orjson.dumps(data)) if changed else body
    return Parsed(model=name, stream=stream, strip_usage=strip_usage, payload=payload)


def _prepare_in_worker(body: bytes, served: dict[str, str], usage: bool, priority: int | None,
                       keep_priority: bool) -> Parsed | tuple[str, str | None]:
    """:func:`prepare` in the worker process; a refusal comes back as (message, param)."""
    try:
        return prepare(body, served.get, usage=usage, priority=priority, keep_priority=keep_priority)
    except BadRequest as e:
        return e.message, e.param


class BodyParser:
    """Prepares bodies: inline up to ``inline_bytes``, else in one worker process (started on first use,
    with ``spawn``: a fork would copy the gateway's threads and sockets)."""

    def __init__(self, inline_bytes: int) -> None:
        self.inline_bytes = inline_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def prepare(self, body: bytes, served: Callable[[str], str | None],
                      served_names: Callable[[], dict[str, str]], *, usage: bool, priority: int | None = None,
                      keep_priority: bool = False) -> Parsed:
        """``served`` maps one name; ``served_names`` gives every name (what the worker is sent)."""
        if len(body) <= self.inline_bytes:
            return prepare(body, served, usage=usage, priority=priority, keep_priority=keep_priority)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, _prepare_in_worker, body, served_names(), usage,
                                                priority, keep_priority)
        except BrokenProcessPool:
            self.close()
            raise BadRequest("the request body could not be parsed: the parser ran out of memory or was "
                             "killed; send a smaller body") from None
        if isinstance(result, tuple):
            raise BadRequest(result[0], param=result[1])
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class AdminBodyLimit:
    """Admin routes take small JSON bodies: one over ``limit`` bytes (declared, or as it arrives) is
    refused with 413 and the connection closed, before a route parses it; a smaller one is handed on
    whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/admin") or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(scope, receive, send)
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(PayloadTooLarge(f"admin request bodies are limited to {self.limit} bytes"))
        resp.headers["Connection"] = "close"
        await resp(scope, receive, send)
