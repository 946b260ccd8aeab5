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
import re
from collections import deque
from types import TracebackType
from urllib.parse import quote, urlsplit

import httptools

#: Bytes buffered from an engine before reading pauses until the relay catches up.
HIGH_WATER = 256 * 1024
#: A request target sent as given; anything else is percent-encoded first (as aiohttp's yarl would).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9/._~!$&'()*+,;=:@%-]*")


class EngineConnectError(ConnectionError):
    """The connection to the engine could not be opened."""


class EngineDisconnected(ConnectionError):
    """The engine closed the connection, or sent what is not HTTP, before its answer was complete."""


def target(path: str, query: str = "") -> bytes:
    """The request target for ``path`` and a raw query string."""
    if not _PLAIN_TARGET.fullmatch(path):
        path = quote(path, safe="/%:@!$&'()*+,;=")
    return (path + "?" + query if query else path).encode("latin-1", "replace")


class EngineResponse:
    """One answer being read: the head is in; the body comes through :meth:`read` or ``async for``."""

    def __init__(self, conn: _Connection, read_timeout: float | None) -> None:
        self._conn = conn
        self._loop = conn.loop
        self._read_timeout = read_timeout
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []  # (name, value) as sent
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._head = False
        self.began = False  # the engine has started an answer (its first bytes parsed)
        self._waiter: asyncio.Future[None] | None = None
        self._since = 0.0  # loop time of the current wait's start, or of the last bytes received
        self._done = False  # released or closed

    # --- reading ------------------------------------------------------------------------------------

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header ``name`` (lower case), or None."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None

    @property
    def at_eof(self) -> bool:
        """Whether the whole body has been received and handed out."""
        return self._eof and not self._chunks

    async def read(self) -> bytes:
        """The whole body."""
        while not self._eof:
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def __aiter__(self) -> EngineResponse:
        return self

    async def __anext__(self) -> bytes:
        """The bytes received since the last call, waiting for some if none are."""
        while not self._chunks:
            if self._eof:
                raise StopAsyncIteration
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > HIGH_WATER and not self._eof:
            self._conn.resume()
        self._size = 0
        return data

    async def _head_in(self) -> None:
        while not self._head:
            await self._wait()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        timeout = self._read_timeout
        if timeout is not None:
            self._since = self._loop.time()
            self._conn.arm(self._since + timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_timeout(self) -> float | None:
        """From the connection's timer: fail a wait that is overdue; else when to look again (None: not
        waiting, so no need)."""
        if self._done or self._eof or self._error is not None or self._waiter is None:
            return None
        assert self._read_timeout is not None
        due = self._since + self._read_timeout
        if self._loop.time() < due:  # bytes came meanwhile
            return due
        self._fail(TimeoutError(f"the engine sent nothing for {self._read_timeout:g} s"))
        self._conn.abort()
        return None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._error is not None:
                waiter.set_exception(self._error)
            else:
                waiter.set_result(None)

    # --- from the connection ------------------------------------------------------------------------

    def _on_head(self, status: int) -> None:
        self.status = status
        self._head = True
        self._wake()

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._read_timeout is not None:
            self._since = self._loop.time()
        if self._size > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _on_complete(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._eof or self._error is not None:
            return
        self._error = error
        self._wake()

    # --- the end ------------------------------------------------------------------------------------

    def release(self) -> None:
        """Hand the connection back to the pool when the body was read to its end; otherwise close it."""
        if self._done:
            return
        self._done = True
        self._conn.finished(reuse=self._eof and self._error is None)

    def close(self) -> None:
        """Close the connection (the engine sees the request abandoned)."""
        if self._done:
            return
        self._done = True
        self._conn.finished(reuse=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, client: EngineClient, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: EngineResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._lost(EngineDisconnected(f"the engine's answer is not valid HTTP: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client._forget(self)
        resp = self.response
        if resp is not None and resp._head and not resp._eof and self._until_close():
            resp._on_complete()  # a body delimited by the connection's end
        else:
            self._lost(EngineDisconnected("the engine closed the connection before its answer was complete"
                                          + (f" ({exc})" if exc else "")))

    def _until_close(self) -> bool:
        resp = self.response
        assert resp is not None
        return resp.header(b"content-length") is None and resp.header(b"transfer-encoding") is None

    def _lost(self, error: BaseException) -> None:
        if self.response is not None:
            self.response._fail(error)

    # --- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is None:  # bytes nobody asked for
            self.abort()
        else:
            self.response.began = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response._on_head(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._on_body(body)

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is not None:
            if not self.parser.should_keep_alive():
                self.closed = True  # not reused; closed when the response is released
            resp._on_complete()

    # --- use ----------------------------------------------------------------------------------------

    def send(self, request: bytes, resp: EngineResponse) -> None:
        assert self.transport is not None
        self.response = resp
        self.transport.write(request)

    def arm(self, due: float) -> None:
        """Have the read timer look at the response by ``due`` (loop time) at the latest."""
        if self._timer is None:
            self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        again = self.response._check_timeout() if self.response is not None else None
        if again is not None and not self.closed:
            self._timer = self.loop.call_at(again, self._on_timer)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def finished(self, *, reuse: bool) -> None:
        self.response = None
        self.resume()
        if reuse and not self.closed:
            self.client._put_back(self)
        else:
            self.abort()
            self.client._slot_free()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class EngineClient:
    """Pooled keep-alive connections to the engines (see the module's docstring)."""

    def __init__(self, *, limit: int | None, connect_timeout: float | None, read_timeout: float | None,
                 keepalive_s: float) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.closed = False
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
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
                resp._done = True
                conn.response = None
                conn.abort()
                resp = None
            raise AssertionError("unreachable: the second attempt returns or raises")
        except BaseException:
            if resp is not None:
                resp.close()  # closes the connection and frees the slot
            else:
                self._slot_free()
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
                    self._slot_free()  # granted as it was cancelled: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            return  # the slot was handed over by _slot_free, already counted
        self._in_use += 1

    def _slot_free(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; _in_use stays
                return
        self._in_use -= 1

    def _idle_conn(self, key: tuple[str, int]) -> _Connection | None:
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

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, key, loop), host, port)
        except TimeoutError:
            raise TimeoutError(f"no connection to {host}:{port} within {self.connect_timeout:g} s") from None
        except OSError as e:
            raise EngineConnectError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
        self._all.add(conn)
        return conn

    def _put_back(self, conn: _Connection) -> None:
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self._slot_free()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
