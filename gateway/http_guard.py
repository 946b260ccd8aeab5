"""Bounded HTTP reading and writing, below the app: uvicorn's httptools protocol with limits.

uvicorn's httptools protocol puts no cap on a request head (llhttp and the protocol keep every header
byte they are sent), no deadline on it, and none on a client that stops reading a response. This
subclass adds them where they cost nothing per byte: a counter per read, a counter per header, and one
timer per request::

    limits = ClientLimits(max_head_bytes=65536, max_headers=100, timeout_s=30.0)
    uvicorn.Config(app, http=guarded_protocol(limits), loop="uvloop")

- **Head size and count**: a request head over ``max_head_bytes`` (counted per read, so at most one
  read past it is ever held) or with more than ``max_headers`` headers is answered ``431`` and the
  connection closed; nothing reaches the app.
- **Head deadline**: a connection must deliver a whole request head within ``timeout_s`` of opening
  (or of its first byte, for later requests on a keep-alive connection), however it dribbles it;
  otherwise ``408`` (or a silent close when it sent nothing) and the connection is closed. One timer
  per connection serves every request on it: a request moves the deadline, and the timer, when it
  fires early, sets itself again for what is left (a timer made and cancelled per request cost more
  than the rest of this class).
- **Body progress**: while a request body is being received, ``timeout_s`` without a byte closes the
  connection (the app sees a disconnect).
- **Hang-ups, told**: every request's scope carries the connection's ``gone`` future (done when the
  client's connection is lost) as the ASGI extension :data:`GONE`, so that the relay cancels a request
  whose client left without a task per request listening on ``receive()`` (:mod:`gateway.disconnect`).
- **Stalled reader**: a client that leaves the response unread, so the socket's buffers fill and
  writing pauses, for ``timeout_s`` is disconnected (the socket is aborted): a stream's relay stops,
  its upstream request is closed and the engine slot is given back.

Keep-alive between requests stays uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import error_body

#: The scope extension holding the connection's future that is done once the client hangs up.
GONE = "onecard.gone"


@dataclass(frozen=True)
class ClientLimits:
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    timeout_s: float = 30.0


def refusal(status: int, message: str, code: str) -> bytes:
    """A complete ``Connection: close`` response with an OpenAI-shaped error body."""
    body = error_body(message, type_="invalid_request_error", code=code)
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with :class:`ClientLimits` (set on the subclass that
    :func:`guarded_protocol` makes)."""

    limits: ClientLimits = ClientLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._head_bytes = 0
        self._last_data = 0.0
        self._head_due = 0.0  # loop time by which the head being received must be complete
        self._served = False  # a request on this connection has been received whole
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] = self.loop.create_future()

    # --- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_due = self.loop.time() + self.limits.timeout_s
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._deadline, self._stall):
            if timer is not None:
                timer.cancel()
        self._deadline = self._stall = None
        if not self._gone.done():
            self._gone.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431, f"the request head is over {self.limits.max_head_bytes} bytes",
                             "request_header_fields_too_large")
            elif len(self.headers or ()) > self.limits.max_headers:  # uvicorn's list of this request's headers
                self._refuse(431, f"the request has more than {self.limits.max_headers} headers",
                             "request_header_fields_too_large")

    # --- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]  # uvicorn types its scope narrowly
        scope["extensions"] = {GONE: self._gone}
        self._in_head = True
        self._head_bytes = 0
        if self._served:
            self._head_due = self.loop.time() + self.limits.timeout_s
        if self._deadline is None:
            self._arm(self._head_due - self.loop.time())

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._served = True  # the timer, if still set, lapses when it finds nothing in progress
        super().on_message_complete()

    # --- writing ------------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.timeout_s, self._on_stall)

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().resume_writing()

    # --- limits -------------------------------------------------------------------------------------

    def _arm(self, delay: float | None = None) -> None:
        self._deadline = self.loop.call_later(self.limits.timeout_s if delay is None else delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._in_head:
            left = self._head_due - self.loop.time()
            if left > 0:  # set for an earlier request's deadline
                self._arm(left)
                return
            if self._head_bytes:
                self.transport.write(refusal(408, f"the request head did not arrive within {self.limits.timeout_s:g} s",
                                             "request_timeout"))
            self.transport.close()
            return
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete or self.flow.read_paused:
            return  # the request is in; or the app is not reading its body, which is not the client's fault
        idle = self.loop.time() - self._last_data
        if idle < self.limits.timeout_s:
            self._arm(self.limits.timeout_s - idle)
            return
        self.logger.info("closing a connection whose request body stalled for %.0f s", idle)
        self.transport.abort()

    def _on_stall(self) -> None:
        self._stall = None
        if self.flow is not None and self.flow.write_paused and not self.transport.is_closing():
            self.logger.info("closing a connection that left its response unread for %.0f s", self.limits.timeout_s)
            self.transport.abort()

    def _refuse(self, status: int, message: str, code: str) -> None:
        if self.transport.is_closing():
            return
        self.logger.info("refused a request head: %s", message)
        self._in_head = False
        self.transport.write(refusal(status, message, code))
        self.transport.close()


def guarded_protocol(limits: ClientLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
