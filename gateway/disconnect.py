"""Noticing that a client hung up while its request waits: in a queue, or for a non-stream answer.

Starlette watches for a disconnect only while it sends a streaming response. A handler that waits
for an engine slot, or for a whole non-stream answer, hears nothing of a client that hung up, so the
request would stay queued, and then be generated for nobody. :class:`DisconnectWatch` listens once the
body has been read (uvicorn then answers ``receive()`` only with ``http.disconnect``)::

    watch = DisconnectWatch(request.receive)
    try:
        upstream = await watch.race(reservation.ready())   # ClientGone if the client hangs up first
    finally:
        watch.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


class DisconnectWatch:
    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None

    @property
    def gone(self) -> asyncio.Future[None]:
        """Done once the client has hung up (the listening starts on first use)."""
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
