"""The data path's HTTP/1.1 client to the engines: keep-alive connections read by httptools' parser.

::

    async with EngineClient(limit=512, connect_timeout=10.0, read_timeout=600.0, keepalive_s=4.0) as client:
        resp = await client.request("POST", "http://127.0.0.1:8001", "/v1/completions", body=b"{...}")
        resp.status, resp.raw_headers          # the head, as the engine sent it
        body = await resp.read()               # or: async for data in resp: ... (the bytes as they come)
        resp.release()                         # back to the pool if read to its end, else closed

Why not aiohttp's client: relaying one small answer through it cost about 330 us of CPU on the
machines here, against about 100 us for this client on the same parser uvicorn uses for the gateway's
own side (llhttp, through httptools), measured with the same uvicorn app and engine. It does only what the
relay needs: one request at a time per connection, bodies sent as given and read as raw bytes (no
decoding, no decompression, no cookies, no redirects, no proxies from the environment).

- **Limits**: at most ``limit`` connections in use over all engines; a request waits for one (first come,
  first served). An idle connection is reused for ``keepalive_s`` (below the engines' own keep-alive, so
  the engine does not close one as it is being reused), and forgotten as soon as the engine closes it.
- **Timeouts**: ``connect_timeout`` to open a connection; ``read_timeout`` for each wait on the engine
  (the head, then every piece of the body), counted from the wait's start or the last bytes received,
  so a stream lasts as long as the engine keeps sending. One timer per connection serves every wait
  of every request on it: it is set when a wait finds none, and when it fires early it sets itself
  again for what is left (a timer made and cancelled per request cost more than the rest of a read).
- **Failures**: :class:`EngineConnectError` (cannot connect), :class:`EngineDisconnected` (closed or
  garbled mid-answer), :class:`TimeoutError`. A reused connection that closes before any byte of an
  answer was closed by the engine as it was taken: the request goes once more, on a new connection.
  A request cancelled mid-way closes its connection, which is how the engine learns that nobody
  listens any more (it aborts the request).
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from urllib.parse import urlsplit

from gateway.engine_conn import (
    HIGH_WATER,
    EngineConnectError,
    EngineConnection,
    EngineDisconnected,
    EngineResponse,
    target,
)

__all__ = ["HIGH_WATER", "EngineClient", "EngineConnectError", "EngineDisconnected", "EngineResponse", "target"]


class EngineClient:
    """Pooled keep-alive connections to the engines (see the module's docstring)."""

    def __init__(self, *, limit: int | None, connect_timeout: float | None, read_timeout: float | None,
                 keepalive_s: float) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.closed = False
        self._idle: dict[tuple[str, int], list[EngineConnection]] = {}
        self._all: set[EngineConnection] = set()
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._bases: dict[str, tuple[tuple[str, int], bytes]] = {}  # base URL -> (host, port), Host header

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.closed = True
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(EngineConnectError("the gateway is shutting down"))
        await asyncio.sleep(0)  # let the transports' connection_lost run

    @property
    def in_use(self) -> int:
        return self._in_use

    async def request(self, method: str, base_url: str, path: str, query: str = "", *, body: bytes = b"",
                      content_type: str = "application/json") -> EngineResponse:
        """Send one request and return once the answer's head is in."""
        if self.closed:
            raise EngineConnectError("the gateway's engine client is closed")
        key, host = self._base(base_url)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nAccept: */*\r\n" % (
            method.encode("ascii"), target(path, query), host, content_type.encode("latin-1"))
        if body or method != "GET":
            head += b"Content-Length: %d\r\n" % len(body)
        await self._take_slot()
        resp: EngineResponse | None = None
        try:
            for fresh in (False, True):
                conn = None if fresh else self._idle_conn(key)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(key)
                resp = EngineResponse(conn, self.read_timeout)
                conn.send(head + b"\r\n" + body if len(body) < 65536 else head + b"\r\n", resp)
                if len(body) >= 65536 and conn.transport is not None:
                    conn.transport.write(body)  # a large body (audio, say) is not copied again
                try:
                    await resp._head_in()
                    return resp
                except EngineDisconnected:
                    if not reused or resp.began:
                        raise
                # The engine closed the idle connection as it was taken (its keep-alive ran out): it never
                # read the request, so it goes once more, on a new connection.
                conn.discard(resp)
                resp = None
            raise AssertionError("unreachable: the second attempt returns or raises")
        except BaseException:
            if resp is not None:
                resp.close()  # closes the connection and frees the slot
            else:
                self.slot_free()
            raise

    # --- the pool -----------------------------------------------------------------------------------

    def _base(self, base_url: str) -> tuple[tuple[str, int], bytes]:
        known = self._bases.get(base_url)
        if known is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise EngineConnectError(f"cannot relay to {base_url!r}: only http://host:port engines are supported")
            port = parts.port or 80
            known = self._bases[base_url] = ((parts.hostname, port), parts.netloc.encode("idna"))
        return known

    async def _take_slot(self) -> None:
        if self.limit is not None and (self._in_use >= self.limit or self._waiters):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self.slot_free()  # granted as it was cancelled: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            return  # the slot was handed over by _slot_free, already counted
        self._in_use += 1

    def slot_free(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; _in_use stays
                return
        self._in_use -= 1

    def _idle_conn(self, key: tuple[str, int]) -> EngineConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        loop = idle[-1].loop
        while idle:
            conn = idle.pop()
            if not conn.closed and loop.time() - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    async def _connect(self, key: tuple[str, int]) -> EngineConnection:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: EngineConnection(self, key, loop), host, port)
        except TimeoutError:
            raise TimeoutError(f"no connection to {host}:{port} within {self.connect_timeout:g} s") from None
        except OSError as e:
            raise EngineConnectError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
        self._all.add(conn)
        return conn

    def put_back(self, conn: EngineConnection) -> None:
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self.slot_free()

    def forget(self, conn: EngineConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
