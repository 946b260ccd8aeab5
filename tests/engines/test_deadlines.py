"""The queue deadline: a waiter past its bound is refused, unless its own model is being made resident."""

from __future__ import annotations

import asyncio

import pytest

from engines.deadlines import await_admission, queue_expired
from engines.errors import CapacityError
from engines.scheduler import queue_bound_s


def test_the_bound_is_twice_max_wait() -> None:
    assert queue_bound_s(60) == 120 and queue_bound_s(0.5) == 1.0


async def test_a_waiter_past_its_bound_is_refused_and_its_future_left_alone() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    now = [100.0]
    with pytest.raises(CapacityError) as info:
        await await_admission(future, since=0.0, bound_s=2.0, becoming_resident=lambda: False,
                              expired=lambda waited: queue_expired("b", waited, max_wait_s=1.0, in_flight={"a": 1}),
                              clock=lambda: now[0])
    assert "waited 100.0 s" in info.value.message and "a has 1 request(s) in flight" in info.value.message
    assert "scheduler.max_wait_s 1 s" in info.value.message and info.value.retry_after == 1.0
    assert not future.done()


async def test_a_waiter_whose_model_is_starting_waits_on_past_its_bound() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    now = [100.0]
    looks: list[float] = []

    def starting() -> bool:
        looks.append(now[0])
        now[0] += 1.0  # a recheck later
        if len(looks) == 3:
            future.set_result(None)  # the engine is ready and the owner admits the request
        return True

    await await_admission(future, since=0.0, bound_s=2.0, becoming_resident=starting,
                          expired=lambda waited: CapacityError("expired"), clock=lambda: now[0], recheck_s=0.0)
    assert future.done() and looks == [100.0, 101.0, 102.0]  # looked again past its bound, never refused


async def test_an_admitted_or_failed_waiter_returns_or_raises_at_once() -> None:
    loop = asyncio.get_running_loop()
    ok: asyncio.Future[None] = loop.create_future()
    ok.set_result(None)
    await await_admission(ok, since=0.0, bound_s=0.0, becoming_resident=lambda: False,
                          expired=lambda waited: CapacityError("expired"))
    failed: asyncio.Future[None] = loop.create_future()
    failed.set_exception(CapacityError("start failed"))
    with pytest.raises(CapacityError, match="start failed"):
        await await_admission(failed, since=0.0, bound_s=0.0, becoming_resident=lambda: False,
                              expired=lambda waited: CapacityError("expired"))
