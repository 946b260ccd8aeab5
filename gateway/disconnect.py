"""Noticing that a client hung up: while its request waits in a queue, for a non-stream answer, or
while its stream is relayed.

A handler that waits for an engine slot, or for a whole non-stream answer, hears nothing of a client
that hung up, so the request would stay queued, and then be generated for nobody. :class:`DisconnectWatch`
gives a future that is done once the client has gone: the connection's own, from the gateway's HTTP
protocol (:data:`gateway.http_guard.GONE`), or else (another server, a test transport) a task listening
on ``receive()`` once the body has been read (uvicorn then answers it only with ``http.disconnect``)::

    watch = DisconnectWatch(request.receive, request.scope)
    try:
        upstream = await watch.race(reservation.ready())   # ClientGone if the client hangs up first
    finally:
        watch.close()

:class:`RelayStream` is Starlette's ``StreamingResponse`` that, given the connection's future, needs
neither a task group nor a listening task per stream: the hang-up cancels the relay directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.http_guard import GONE

T = TypeVar("T")


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


def gone_of(scope: Scope) -> asyncio.Future[None] | None:
    """The connection's hang-up future, when the server gives one."""
    extensions = scope.get("extensions")
    return extensions.get(GONE) if extensions else None


class DisconnectWatch:
    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        self._receive = receive
        self._given = gone_of(scope) if scope is not None else None
        self._task: asyncio.Task[None] | None = None

    @property
    def gone(self) -> asyncio.Future[None]:
        """Done once the client has hung up (without the connection's own, the listening starts on
        first use)."""
        if self._given is not None:
            return self._given
        if self._task is None:
            self._task = asyncio.ensure_future(self._listen())
        return self._task

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def race(self, aw: Awaitable[T], *, undo: Callable[[T], None] | None = None) -> T:
        """The result of ``aw``, or :class:`ClientGone` (``aw`` cancelled) if the client hangs up first.
        ``undo`` gives back what ``aw`` obtained if it finished just as it was being cancelled."""
        task = asyncio.ensure_future(aw)

        def abandon() -> None:
            task.cancel()
            if undo is not None:
                task.add_done_callback(lambda t: undo(t.result()) if not t.cancelled() and t.exception() is None
                                       else None)

        both: set[asyncio.Future[Any]] = {task, self.gone}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            abandon()
            raise
        if task.done():
            return task.result()
        abandon()
        raise ClientGone

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class RelayStream(StreamingResponse):
    """A streaming response that stops (closing its body iterator, so the relay lets go of the engine)
    when the connection's hang-up future fires; without one, Starlette's own way."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = gone_of(scope)
        task = asyncio.current_task()
        if gone is None or task is None:
            await super().__call__(scope, receive, send)
            return
        watching = True

        def hung_up(_: asyncio.Future[None]) -> None:
            if watching:
                task.cancel()

        gone.add_done_callback(hung_up)
        body = self.body_iterator
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in body:
                if not isinstance(chunk, (bytes, memoryview)):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (gone.done() and task.uncancel() == 0):
                raise  # not the hang-up: someone else's cancellation
        finally:
            watching = False
            gone.remove_done_callback(hung_up)
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
