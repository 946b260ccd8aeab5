"""Two asyncio rules kept in one place: wait for a task without swallowing a cancellation aimed at the
waiter, and never hide an exception without a log line.

``contextlib.suppress(BaseException)`` around ``await task`` also swallows the ``CancelledError`` that
was meant for the caller (a request being cancelled, the gateway shutting down), so the caller carries
on as if nothing happened. :func:`settle` waits for ``task`` to end however it ends, and lets a
cancellation of the caller through::

    start_task.cancel()
    await settle(start_task, "the start of tiny")   # CancelledError here only if *we* are cancelled

>>> import asyncio
>>> async def boom() -> None:
...     raise RuntimeError("no")
>>> async def main() -> str:
...     task = asyncio.ensure_future(boom())
...     await settle(task, "boom")
...     return "still here"
>>> asyncio.run(main())
'still here'
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def settle(task: asyncio.Future[Any], what: str, *, logger: logging.Logger = log) -> None:
    """Wait until ``task`` is done; its exception, if any, is logged once (never raised) and a
    cancellation of ``task`` itself is quiet. If the caller is cancelled meanwhile, CancelledError
    propagates and ``task`` is left to finish on its own."""
    if not task.done():
        await asyncio.wait({task})  # raises CancelledError only when the caller is cancelled
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logged(exc, what, logger=logger)


def logged(exc: BaseException, what: str, *, logger: logging.Logger = log) -> None:
    """The one log line for an exception that is deliberately not raised further."""
    logger.warning("%s failed and is ignored: %s: %s", what, type(exc).__name__, exc)


class Signal:
    """A flag that one task waits on, with a timeout; :meth:`set` wakes it.

    The owner's loop waits on one per turn, and a request can set it, so a wait costs one future and
    one timer (an ``asyncio.Event`` waited with a timeout through ``engines.state.wait_event`` takes two
    tasks and two events). A cancellation of the waiter goes through as it came::

        kick = Signal()
        kick.set()                      # from anywhere on the loop
        woken = await kick.wait(1.0)    # True: set before or during the wait; False: timed out
        kick.clear()
    """

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self, seconds: float) -> bool:
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._flag


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
