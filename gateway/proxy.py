"""Forward one request to an engine: status and headers first, then the bytes as they come.

::

    proxy = Proxy(client, metrics)                 # client: the app's shared gateway.engine_http.EngineClient
    response = await proxy.forward(call, upstream, release)   # call: what the handler parsed; upstream: the engine

The data path runs on :mod:`gateway.engine_http` (keep-alive connections read by llhttp through
httptools; see benchmarks/README.md for what it saves); the control plane (health, sleep/wake, LoRA,
metrics) keeps httpx. Streams are relayed event by event, never buffered; when the client goes away,
:class:`gateway.disconnect.RelayStream` cancels the relay and ``finally`` closes the upstream
connection, so the engine aborts the request too; a non-stream request whose client hangs up is closed
the same way. When the gateway
asked the engine for usage on its own account (to count tokens), the usage-only event is taken out again
and the fingerprint put back where the engine would have sent it (:mod:`gateway.usage_events`), so the
client receives exactly what it would have without the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.responses import Response

from engines.pool import Upstream
from gateway.disconnect import ClientGone, RelayStream
from gateway.engine_http import EngineClient, EngineResponse
from gateway.errors import error_response, sse_error_event
from gateway.metrics import Metrics
from gateway.usage_events import UsageFilter, usage_of

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server", b"te", b"trailer",
     b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The errors of a failed engine call: the connection's (gateway.engine_http's are ConnectionErrors) and
#: its timeouts.
UPSTREAM_ERRORS = (OSError, TimeoutError)
log = logging.getLogger(__name__)


@dataclass
class Call:
    """One parsed client request, ready to forward."""

    path: str
    body: bytes
    model: str  # the registry model (metrics label)
    stream: bool
    strip_usage: bool = False  # the gateway added include_usage; hide the usage event from the client
    extra_headers: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    method: str = "POST"
    content_type: str = "application/json"  # a multipart body keeps its own, with its boundary
    query: str = ""  # sent as the client sent it
    watch: Callable[[bytes], None] | None = None  # sees a 200 body, or each chunk of a stream
    progress: bool = False  # the client asked to see a wait for its model as reasoning (gateway.progress)
    requested: str = ""  # the name the client asked for (alias, adapter or model)
    user: str = "anonymous"  # who sent it (engines.people)
    klass: str = "batch"  # its class: interactive or batch
    queued_at: float | None = None  # perf_counter when it asked for an engine slot
    #: Told (prompt, completion) tokens once the engine's usage is read, for per-user accounting.
    on_tokens: Callable[[int, int], None] | None = None


@dataclass
class StreamStats:
    first_token_at: float | None = None
    last_token_at: float | None = None
    usage: dict[str, int] | None = None


def upstream_headers(upstream: EngineResponse, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The engine's response headers as sent (names lower-cased), less hop-by-hop ones and those that
    ``extra`` replaces, then ``extra``."""
    added = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    skip = HOP_BY_HOP.union(k for k, _ in added)
    return [(k.lower(), v) for k, v in upstream.raw_headers if k.lower() not in skip] + added


class Proxy:
    """Relays calls to engines over the app's shared :class:`EngineClient` (see
    :func:`gateway.app.make_session` for its limits and timeouts). Bodies go out as given and come
    back as the raw bytes the engine sent, never decoded or decompressed."""

    def __init__(self, session: EngineClient, metrics: Metrics) -> None:
        self.session = session
        self.metrics = metrics
        self._fingerprints: dict[str, tuple[str | None, str]] = {}  # model -> (engine id, its fingerprint)

    async def forward(self, call: Call, engine: Upstream, release: Callable[[], None], *,
                      gone: asyncio.Future[None] | None = None) -> Response:
        """Send ``call`` to ``engine``; ``release`` frees the engine slot once the response is over.

        ``gone`` (done when the client hangs up) ends a non-stream request early: the upstream request
        is closed, so the engine aborts the generation, and :class:`ClientGone` is raised. A stream needs
        none: :class:`gateway.disconnect.RelayStream` cancels its relay when the client goes."""
        if gone is None:
            return await self._forward(call, engine, release)
        # Cancel this task if the client hangs up meanwhile (a callback, not a second task: one task more
        # per request doubled the gateway's latency under uvloop). ``watching`` keeps a callback that was
        # already scheduled from cancelling anything once the answer is in.
        task = asyncio.current_task()
        assert task is not None
        watching = True

        def hung_up(_: asyncio.Future[None]) -> None:
            if watching:
                task.cancel()

        gone.add_done_callback(hung_up)
        try:
            return await self._forward(call, engine, release)
        except asyncio.CancelledError:
            if gone.done() and task.uncancel() == 0:  # our cancel, and nobody else's: the client left
                release()  # the upstream request is closed: cancelling it closed the connection
                raise ClientGone from None
            raise
        finally:
            watching = False
            gone.remove_done_callback(hung_up)

    async def _forward(self, call: Call, engine: Upstream, release: Callable[[], None]) -> Response:
        try:
            upstream = await self.session.request(call.method, engine.base_url, call.path, call.query,
                                                  body=call.body, content_type=call.content_type)
        except UPSTREAM_ERRORS as e:
            release()
            return await self._fail(call, engine, e)
        if not call.stream or upstream.status != 200 or not (upstream.header(b"content-type") or b"").startswith(
            b"text/event-stream"
        ):
            failure: Exception | None = None
            try:
                body = await upstream.read()
            except UPSTREAM_ERRORS as e:
                failure = e
            finally:
                upstream.release()  # pooled if read to its end; else closed, so the engine aborts
                release()
            if failure is None:
                failure = engine.dead_answer(upstream.status, body)
            if failure is not None:
                return await self._fail(call, engine, failure)
            self._account_body(call, upstream.status, body)
            if call.watch is not None and upstream.status == 200:
                call.watch(body)
            response = Response(body, status_code=upstream.status)
            response.raw_headers += upstream_headers(upstream, call.extra_headers)
            return response
        response = RelayStream(self.relay(call, engine, upstream, release), status_code=200)
        response.raw_headers += upstream_headers(upstream, {**SSE_HEADERS, **call.extra_headers})
        return response

    async def relay(
        self, call: Call, engine: Upstream, upstream: EngineResponse, release: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        """Yield the engine's SSE bytes as they arrive; account tokens; always close and release."""
        stats = StreamStats()
        known = self._fingerprints.get(engine.name)
        usage = UsageFilter(strip=call.strip_usage,
                            fingerprint=known[1] if known and known[0] == engine.engine_id else None)
        failure: Exception | None = None
        pending = b""
        try:
            try:
                async for chunk in upstream:  # the raw bytes, as they come
                    now = time.perf_counter()
                    if stats.first_token_at is None:
                        stats.first_token_at = now
                    stats.last_token_at = now
                    if call.watch is not None:
                        call.watch(chunk)
                    if pending or not chunk.endswith(b"\n\n") or usage.wants(chunk):
                        pending += chunk
                        *events, pending = pending.split(b"\n\n")
                        out = usage.feed(events)
                        if out:
                            yield out
                    else:
                        yield chunk
                pending = usage.flush() + pending
                if pending:
                    yield pending
            except UPSTREAM_ERRORS as e:
                failure = e
            finally:
                upstream.release()  # pooled if read to its end; else closed, so the engine aborts
                release()
            if failure is not None:
                held = usage.flush()  # complete events held back for a usage event that never came
                if held:
                    yield held  # the slot is free again while this waits on the engine's exit
                yield sse_error_event(await engine.explain(failure))
        finally:
            stats.usage = usage.usage
            if usage.seen_fingerprint is not None:
                self._fingerprints[engine.name] = (engine.engine_id, usage.seen_fingerprint)
            self._account_stream(call, 200 if failure is None else 502, stats)
            if failure is not None:
                self.metrics.observe_error(call.model, "engine_failed")

    def _account_body(self, call: Call, status: int, body: bytes) -> None:
        duration = time.perf_counter() - call.started
        self.metrics.observe_request(call.model, str(status), duration)
        if status == 200:
            usage = usage_of(body)
            if isinstance(usage, dict):
                if call.on_tokens is not None:
                    call.on_tokens(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
                self.metrics.observe_tokens(
                    call.model, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                    ttft_s=None, decode_s=None,
                )

    def _account_stream(self, call: Call, status: int, stats: StreamStats) -> None:
        duration = time.perf_counter() - call.started
        self.metrics.observe_request(call.model, str(status), duration)
        ttft = None if stats.first_token_at is None else stats.first_token_at - call.started
        decode = (
            None if stats.first_token_at is None or stats.last_token_at is None
            else stats.last_token_at - stats.first_token_at
        )
        usage = stats.usage or {}
        if call.on_tokens is not None and usage:
            call.on_tokens(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        self.metrics.observe_tokens(
            call.model, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            ttft_s=ttft, decode_s=decode,
        )

    async def _fail(self, call: Call, engine: Upstream, e: Exception) -> Response:
        """A 502 (OpenAI error JSON) naming why the engine failed this call."""
        err = await engine.explain(e)
        self.metrics.observe_request(call.model, "502", time.perf_counter() - call.started)
        self.metrics.observe_error(call.model, "engine_failed")
        return error_response(err)
