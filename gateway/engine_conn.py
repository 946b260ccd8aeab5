"""One keep-alive HTTP/1.1 connection to an engine and the answer being read on it, for
:mod:`gateway.engine_http` (whose :class:`~gateway.engine_http.EngineClient` pools them).

An :class:`EngineConnection` is an ``asyncio.Protocol`` that feeds httptools' response parser; its
callbacks fill the :class:`EngineResponse` of the request in flight (head, body pieces, end, failure).
Reading pauses past :data:`HIGH_WATER` buffered bytes. One read timer per connection serves every wait
of every request on it (:meth:`EngineConnection.arm`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol
from urllib.parse import quote

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

    def __init__(self, conn: EngineConnection, read_timeout: float | None) -> None:
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


class EngineConnection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, client: Pool, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
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
        self.client.forget(self)
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
            self.client.put_back(self)
        else:
            self.abort()
            self.client.slot_free()

    def discard(self, resp: EngineResponse) -> None:
        """Close this connection under ``resp``, keeping the request's slot (it goes again elsewhere)."""
        resp._done = True
        self.response = None
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class Pool(Protocol):
    """What a connection tells its pool (:class:`gateway.engine_http.EngineClient`)."""

    def put_back(self, conn: EngineConnection) -> None: ...
    def slot_free(self) -> None: ...
    def forget(self, conn: EngineConnection) -> None: ...
