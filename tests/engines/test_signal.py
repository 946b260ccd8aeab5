"""``engines.aio.Signal``: the owner loop's wake-up, set from anywhere on the loop, waited with a timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from engines.aio import Signal

pytestmark = pytest.mark.timeout(10)


async def test_a_set_wakes_the_waiter_at_once_and_a_timeout_returns_false() -> None:
    sig = Signal()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, sig.set)
    t0 = time.monotonic()
    assert await sig.wait(5.0) is True
    assert time.monotonic() - t0 < 1.0
    assert await sig.wait(5.0) is True  # still set: no wait at all
    sig.clear()
    t0 = time.monotonic()
    assert await sig.wait(0.05) is False
    assert 0.04 < time.monotonic() - t0 < 1.0


async def test_a_cancelled_wait_leaves_the_signal_usable() -> None:
    sig = Signal()
    waiter = asyncio.ensure_future(sig.wait(5.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    sig.set()  # nobody waits: only the flag
    assert sig.is_set() and await sig.wait(0.01) is True
