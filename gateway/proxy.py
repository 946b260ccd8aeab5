"""Forward one request to an engine: status and headers first, then the bytes as they come.

::

    proxy = Proxy(client, metrics)
    response = await proxy.forward(call, engine)   # call: what the handler parsed

Streams are relayed event by event, never buffered; when the client goes away, Starlette cancels
the relay and ``finally`` closes the upstream response, so the engine aborts the request too.
When the gateway asked the engine for usage on its own account (to count tokens), the usage-only
event is taken out again, so the client receives exactly what it would have without the gateway.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType

import anyio
import httpcore
import httpx
import orjson
from starlette.responses import Response, StreamingResponse

from engines.engine import Engine, last_error_line
from engines.errors import EngineCrashed, EngineError
from gateway.errors import error_response, sse_error_event
from gateway.metrics import Metrics

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "te", "trailer",
     "upgrade", "proxy-authenticate", "proxy-authorization"}
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


@dataclass
class StreamStats:
    first_token_at: float | None = None
    last_token_at: float | None = None
    usage: dict[str, int] | None = None


def upstream_headers(resp: httpx.Response, extra: dict[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.update(extra)
    return headers


class EnginePool:
    """An HTTP/1.1 connection pool for the engines that costs O(1) per request.

    httpcore's ``AsyncConnectionPool`` rescans every pooled connection on each request and on each
    response close (polling each idle socket, and counting idle connections once per idle connection),
    so its cost per request grows with the square of the connections held: 2-4 ms of CPU per request
    at 64 concurrent requests, far more after a burst of hundreds of streams. Here each origin keeps a
    stack of idle connections: a request pops the most recently used one (checking only that one for
    expiry or a close by the server, as httpcore does) or opens a new one, and closing the response
    pushes it back. ``max_connections`` bounds the connections in use (a request waits for a free one,
    as with httpx's ``pool=None``); at most ``max_keepalive`` idle ones are kept per origin.
    """

    def __init__(self, *, max_connections: int, max_keepalive: int, keepalive_expiry: float | None) -> None:
        self._idle: dict[tuple[bytes, bytes, int], deque[httpcore.AsyncHTTP11Connection]] = {}  # by origin
        self._slots = anyio.Semaphore(max_connections)
        self._max_keepalive = max_keepalive
        self._keepalive_expiry = keepalive_expiry
        self._backend = httpcore.AnyIOBackend()
        self._closed = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        origin = request.url.origin
        await self._slots.acquire()
        try:
            conn = await self._checkout(request)
            try:
                resp = await conn.handle_async_request(request)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()
                raise
        except BaseException:
            self._slots.release()
            raise
        assert isinstance(resp.stream, AsyncIterable)
        return httpcore.Response(status=resp.status, headers=resp.headers,
                                 content=_PooledStream(resp.stream, self, origin, conn), extensions=resp.extensions)

    async def _checkout(self, request: httpcore.Request) -> httpcore.AsyncHTTP11Connection:
        origin = request.url.origin
        idle = self._idle.get((origin.scheme, origin.host, origin.port))
        while idle:
            conn = idle.pop()
            if conn.is_idle() and not conn.has_expired():
                return conn
            await conn.aclose()
        if origin.scheme != b"http":
            raise httpcore.UnsupportedProtocol(f"the engine pool speaks plain HTTP only, not {origin.scheme!r}")
        timeouts = request.extensions.get("timeout", {})
        stream = await self._backend.connect_tcp(origin.host.decode("ascii"), origin.port,
                                                 timeout=timeouts.get("connect"))
        return httpcore.AsyncHTTP11Connection(origin=origin, stream=stream, keepalive_expiry=self._keepalive_expiry)

    async def _checkin(self, origin: httpcore.Origin, conn: httpcore.AsyncHTTP11Connection) -> None:
        """Called once per response, when it is closed (shielded from cancellation)."""
        self._slots.release()
        if self._closed or not conn.is_idle():
            await conn.aclose()
            return
        idle = self._idle.setdefault((origin.scheme, origin.host, origin.port), deque())
        # The oldest idle connection goes when over the limit, or when expired or closed by the engine
        # (checking one per call keeps this O(1) yet clears a stack left by a burst, or by a restart).
        if idle and (len(idle) >= self._max_keepalive or idle[0].has_expired()):
            await idle.popleft().aclose()
        idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    async def __aenter__(self) -> EnginePool:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None, exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        await self.aclose()


class _PooledStream:
    """The body of a pooled response: closing it hands the connection back to the pool."""

    def __init__(self, stream: AsyncIterable[bytes], pool: EnginePool, origin: httpcore.Origin,
                 conn: httpcore.AsyncHTTP11Connection) -> None:
        self._stream = stream
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                close = getattr(self._stream, "aclose", None)
                if close is not None:
                    await close()
            finally:
                await self._pool._checkin(self._origin, self._conn)


class EngineTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with :class:`EnginePool` in place of httpcore's pool (plain HTTP, no proxies)."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = EnginePool(  # type: ignore[assignment]
            max_connections=limits.max_connections or 1 << 30,
            max_keepalive=limits.max_keepalive_connections or 1 << 30,
            keepalive_expiry=limits.keepalive_expiry,
        )


class Proxy:
    """Relays calls to engines over the client's transport.

    Requests go straight to ``client``'s transport: ``AsyncClient.send`` would add a cookie jar (which
    would carry one engine's cookies into later requests), auth, redirect and event-hook bookkeeping
    and a log line, none of which an engine call wants, for 0.1-0.15 ms of CPU per request (measured
    with benchmarks/gateway_overhead.py). The client's headers and timeouts still apply (read once,
    here). Bodies are relayed as the raw bytes the engine sent (``response.stream``), not decoded.
    """

    def __init__(self, client: httpx.AsyncClient, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self._transport: httpx.AsyncBaseTransport = client._transport
        headers = httpx.Headers(client.headers)
        headers.update({"content-type": "application/json", "accept": "*/*"})
        self._headers = headers.raw
        self._extensions = {"timeout": client.timeout.as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    def _request(self, engine: Engine, call: Call) -> httpx.Request:
        target = engine.base_url + call.path
        url = self._urls.get(target)
        if url is None:
            if len(self._urls) > 4096:  # engines move ports as they restart; keep the cache small
                self._urls.clear()
            url = self._urls[target] = httpx.URL(target)
        return httpx.Request("POST", url, headers=self._headers, content=call.body, extensions=self._extensions)

    async def forward(self, call: Call, engine: Engine, release: Callable[[], None]) -> Response:
        """Send ``call`` to ``engine``; ``release`` frees the engine slot once the response is over."""
        request = self._request(engine, call)
        try:
            upstream = await self._transport.handle_async_request(request)
        except httpx.HTTPError as e:
            release()
            return self._fail(call, engine, e)
        upstream.request = request
        if not call.stream or upstream.status_code != 200 or not upstream.headers.get(
            "content-type", ""
        ).startswith("text/event-stream"):
            try:
                body = b"".join([part async for part in upstream.stream])  # type: ignore[union-attr]
            except httpx.HTTPError as e:
                return self._fail(call, engine, e)
            finally:
                await upstream.aclose()
                release()
            self._account_body(call, upstream.status_code, body)
            return Response(body, status_code=upstream.status_code,
                            headers=upstream_headers(upstream, call.extra_headers))
        return StreamingResponse(
            self.relay(call, engine, upstream, release),
            status_code=200,
            headers=upstream_headers(upstream, {**SSE_HEADERS, **call.extra_headers}),
        )

    async def relay(
        self, call: Call, engine: Engine, upstream: httpx.Response, release: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        """Yield the engine's SSE bytes as they arrive; account tokens; always close and release."""
        stats = StreamStats()
        status = 200
        pending = b""
        try:
            async for chunk in upstream.stream:  # type: ignore[union-attr]  # the raw bytes, as they come
                now = time.perf_counter()
                if stats.first_token_at is None:
                    stats.first_token_at = now
                stats.last_token_at = now
                if pending or not chunk.endswith(b"\n\n") or b'"usage"' in chunk:
                    pending += chunk
                    out, pending = self._events(pending, call, stats)
                    if out:
                        yield out
                else:
                    yield chunk
            if pending:
                yield pending
        except httpx.HTTPError as e:
            status = 502
            yield sse_error_event(self._engine_error(engine, e))
        finally:
            await upstream.aclose()
            release()
            self._account_stream(call, status, stats)

    def _events(self, buf: bytes, call: Call, stats: StreamStats) -> tuple[bytes, bytes]:
        """Split complete SSE events off ``buf``; read (and maybe hide) the usage event."""
        *events, rest = buf.split(b"\n\n")
        out = bytearray()
        for ev in events:
            if b'"usage"' in ev and ev.startswith(b"data: {"):
                try:
                    data = orjson.loads(ev[6:])
                except orjson.JSONDecodeError:
                    data = None
                if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                    stats.usage = data["usage"]
                    if call.strip_usage and not data.get("choices"):
                        continue
            out += ev + b"\n\n"
        return bytes(out), rest

    def _account_body(self, call: Call, status: int, body: bytes) -> None:
        duration = time.perf_counter() - call.started
        self.metrics.observe_request(call.model, str(status), duration)
        if status == 200 and b'"usage"' in body:
            try:
                usage = orjson.loads(body).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                usage = None
            if isinstance(usage, dict):
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
        self.metrics.observe_tokens(
            call.model, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            ttft_s=ttft, decode_s=decode,
        )

    def _engine_error(self, engine: Engine, e: httpx.HTTPError) -> EngineError:
        alive = engine.process is not None and engine.process.returncode is None
        tail = engine.log_tail(30)
        if not alive:
            return EngineCrashed(
                f"model {engine.name}: the engine exited while serving this request"
                + (f"; last log line: {last_error_line(tail)}" if tail else ""),
                model=engine.name, log_tail=tail,
            )
        if isinstance(e, httpx.TimeoutException):
            return EngineError(f"model {engine.name}: the engine did not answer in time ({type(e).__name__})",
                               model=engine.name)
        return EngineError(f"model {engine.name}: the connection to the engine failed: {type(e).__name__}: {e}",
                           model=engine.name)

    def _fail(self, call: Call, engine: Engine, e: httpx.HTTPError) -> Response:
        err = self._engine_error(engine, e)
        self.metrics.observe_request(call.model, "502", time.perf_counter() - call.started)
        return error_response(err)
