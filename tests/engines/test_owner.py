"""The owner loop never waits on an engine: while a stand-in engine takes 30 s to start, the rest of the
gateway's engine work goes on. Each test ends long before the start would (closing the pool stops it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engines.commands import GrantLease, Load, Unload
from engines.errors import CapacityError, EngineError
from engines.events import ManagerEvents
from engines.pool import EnginePool, Reservation
from engines.registry import load_registry
from engines.state import EngineState
from tests.support import standin_executable, standin_model, write_registry

SLOW_START_S = 30.0


def slow(name: str = "slow", **fields: Any) -> dict[str, Any]:
    """A model whose engine takes 30 s to become ready."""
    return standin_model(name, env={"STANDIN_START_DELAY": str(SLOW_START_S)}, start_timeout_s=120, **fields)


class Recorder(ManagerEvents):
    def __init__(self) -> None:
        self.start_failures: list[str] = []

    def start_failed(self, model: str, error: EngineError) -> None:
        self.start_failures.append(model)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
        yield c


async def eventually(cond: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)


async def start_slow(pool: EnginePool) -> Reservation:
    """Ask for the slow model and wait until its engine is starting (the owner's swap task runs)."""
    res = pool.reserve("slow")
    await eventually(lambda: pool.state("slow") is EngineState.STARTING, 15, "slow to be starting")
    return res


def make_pool(tmp_path: Path, client: httpx.AsyncClient, models: list[dict[str, Any]], *,
              budget_gib: float = 4.0, events: ManagerEvents | None = None) -> EnginePool:
    reg = load_registry(write_registry(tmp_path / "r.yaml", models, executable=standin_executable(tmp_path),
                                       budget_gib=budget_gib))
    return EnginePool(reg, client=client, run_dir=tmp_path / "run", tick_s=0.2, events=events)


async def test_a_lease_holders_death_is_noticed_during_a_slow_start(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    pool = make_pool(tmp_path, client, [slow()])
    await pool.start()
    holder = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        res = await start_slow(pool)
        lease = await asyncio.wait_for(pool.submit(GrantLease(gib=1.0, holder_pid=holder.pid, label="train")), 10)
        assert pool.snapshot().lease == lease
        holder.kill()
        await eventually(lambda: pool.snapshot().lease is None, 10, "the dead holder's lease to end")
        assert pool.state("slow") is EngineState.STARTING  # all of this while the start goes on
        res.release()
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        await pool.close()


async def test_an_idle_engine_expires_during_a_slow_start(tmp_path: Path, client: httpx.AsyncClient) -> None:
    pool = make_pool(tmp_path, client, [slow(), standin_model("idle", idle_ttl_s=1.0)])
    await pool.start()
    try:
        await asyncio.wait_for(pool.submit(Load("idle")), 30)
        assert pool.state("idle") is EngineState.READY
        res = await start_slow(pool)
        await eventually(lambda: pool.state("idle") is EngineState.STOPPED, 15, "the idle engine to expire")
        assert pool.state("slow") is EngineState.STARTING
        res.release()
    finally:
        await pool.close()


async def test_an_admin_unload_of_another_model_completes_during_a_slow_start(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    pool = make_pool(tmp_path, client, [slow(), standin_model("other")])
    await pool.start()
    try:
        await asyncio.wait_for(pool.submit(Load("other")), 30)
        res = await start_slow(pool)
        t0 = time.monotonic()
        await asyncio.wait_for(pool.submit(Unload("other")), 15)
        assert pool.state("other") is EngineState.STOPPED and time.monotonic() - t0 < 5  # not after the start
        assert pool.state("slow") is EngineState.STARTING
        res.release()
    finally:
        await pool.close()


async def test_a_blocked_waiter_gets_its_error_during_a_slow_start(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """A lease leaves too little of the card for ``big`` even alone: its waiter is told so at once, not
    after the slow start."""
    pool = make_pool(tmp_path, client, [slow(), standin_model("big", gib=3.0)])
    await pool.start()
    holder = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        res = await start_slow(pool)
        await asyncio.wait_for(pool.submit(GrantLease(gib=2.0, holder_pid=holder.pid)), 10)
        assert pool.state("slow") is EngineState.STARTING  # 1 GiB starting + 2 leased fit in 4
        waiter = pool.reserve("big")
        t0 = time.monotonic()
        with pytest.raises(CapacityError, match="cannot be made resident now"):
            await asyncio.wait_for(waiter.ready(), 15)
        assert time.monotonic() - t0 < 5 and pool.state("slow") is EngineState.STARTING  # at once
        res.release()
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        await pool.close()


async def test_a_stop_during_a_start_ends_stopped_and_is_no_start_failure(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    events = Recorder()
    pool = make_pool(tmp_path, client, [slow()], events=events)
    await pool.start()
    try:
        res = await start_slow(pool)
        seen: list[tuple[str, str]] = []
        pool.owner.engines["slow"].sm.subscribe(lambda _, old, new: seen.append((old.value, new.value)))
        await asyncio.wait_for(pool.submit(Unload("slow")), 15)
        with pytest.raises(EngineError, match="start was cancelled"):
            await asyncio.wait_for(res.ready(), 10)
        assert pool.state("slow") is EngineState.STOPPED
        assert seen == [("starting", "stopping"), ("stopping", "stopped")]
        assert events.start_failures == [] and not pool.owner.engines["slow"].restarts.failures
        assert pool.owner._owner is not None and not pool.owner._owner.done()  # the owner lives on
    finally:
        await pool.close()
