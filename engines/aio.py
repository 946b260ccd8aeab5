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
