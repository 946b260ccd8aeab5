"""Deadlines for requests waiting in a model's queue.

A queued request may wait :func:`engines.scheduler.queue_bound_s` seconds; then it is refused (503
with Retry-After) rather than held. Time its own model spends being made resident does not count: a
start has its own timeout, and failing a request a moment before its engine is ready helps nobody::

    await await_admission(waiter.future, since=waiter.since, bound_s=queue_bound_s(60),
                          becoming_resident=lambda: engine.state is EngineState.STARTING,
                          expired=lambda waited: CapacityError(f"waited {waited:.0f} s"))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from engines.errors import CapacityError, OnecardError
from engines.scheduler import queue_bound_s


async def await_admission(
    future: asyncio.Future[None],
    *,
    since: float,
    bound_s: float,
    becoming_resident: Callable[[], bool],
    expired: Callable[[float], OnecardError],
    clock: Callable[[], float] = time.monotonic,
    recheck_s: float = 1.0,
) -> None:
    """Wait for ``future`` (the owner task admits the request, or fails it) until ``since + bound_s``;
    past it, raise ``expired(seconds waited)`` unless the model is ``becoming_resident`` (then look
    again every ``recheck_s``). ``future`` itself is never cancelled here."""
    while not future.done():
        remaining = since + bound_s - clock()
        if remaining <= 0:
            if not becoming_resident():
                raise expired(clock() - since)
            remaining = recheck_s
        await asyncio.wait({future}, timeout=remaining)
    future.result()


def queue_expired(model: str, waited: float, *, max_wait_s: float, in_flight: dict[str, int]) -> CapacityError:
    """The 503 for a request that waited past its bound; ``in_flight``: the busy resident models."""
    busy = "".join(f"; {n} has {k} request(s) in flight" for n, k in sorted(in_flight.items()))
    return CapacityError(
        f"model {model}: waited {waited:.1f} s in the queue, past its bound of {queue_bound_s(max_wait_s):g} s "
        f"(scheduler.max_wait_s {max_wait_s:g} s to force a swap, as long again for the resident models to "
        f"finish){busy}; retry later",
        model=model, retry_after=max(1.0, max_wait_s))
