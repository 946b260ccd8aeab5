"""The engine manager with stand-in engines: measured footprints, joins, queue order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from engines.gpu import GpuReading
from engines.manager import EngineManager
from engines.registry import load_registry
from engines.state import EngineState
from tests.support import FakeProbe, standin_executable, standin_model, write_registry


def every_engine_holds(ref: list[EngineManager], per_engine: int) -> FakeProbe:
    """A GPU on which every engine process holds ``per_engine`` bytes."""

    def read() -> list[GpuReading]:
        pids = [e.pid for e in ref[0].engines.values() if e.pid is not None]
        return [GpuReading(index=0, name="fake", process_memory_bytes=dict.fromkeys(pids, per_engine))]

    return FakeProbe(read)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
        yield c


async def test_measured_footprint_replaces_the_estimate(tmp_path: Path, client: httpx.AsyncClient) -> None:
    reg = load_registry(
        write_registry(
            tmp_path / "r.yaml",
            [standin_model("a"), standin_model("b")],
            executable=standin_executable(tmp_path),
            budget_gib=2.5,
        )
    )
    ref: list[EngineManager] = []
    manager = EngineManager(
        reg, client=client, run_dir=tmp_path / "run", gpu_probe=every_engine_holds(ref, per_engine=2 * 1024**3)
    )
    ref.append(manager)
    await manager.start()
    try:
        assert manager.plan.can_coreside({"a", "b"})  # planned at ~1 GiB each in 2.5
        await manager.load("a")
        assert manager.plan.model("a").measured_gib == pytest.approx(2.0)
        assert manager.engines["a"].plan.resident_gib == pytest.approx(2.0)
        assert not manager.plan.can_coreside({"a", "b"})  # measured: 2 + 1 > 2.5
        await manager.load("b")
        states = {n: e.state for n, e in manager.engines.items()}
        assert states == {"a": EngineState.STOPPED, "b": EngineState.READY}  # a swap, not co-residency
    finally:
        await manager.close()


async def test_concurrent_requests_join_one_start_and_keep_order(tmp_path: Path, client: httpx.AsyncClient) -> None:
    reg = load_registry(
        write_registry(
            tmp_path / "r.yaml",
            [standin_model("a", env={"STANDIN_START_DELAY": "0.5"})],
            executable=standin_executable(tmp_path),
        )
    )
    manager = EngineManager(reg, client=client, run_dir=tmp_path / "run")
    await manager.start()
    try:
        waiters = [manager.admission.enqueue("a") for _ in range(5)]
        assert [manager.admission.position("a", w) for w in waiters] == [1, 2, 3, 4, 5]
        engines = await asyncio.gather(*(manager.admission.wait("a", w) for w in waiters))
        assert len({id(e) for e in engines}) == 1 and engines[0].in_flight == 5
        assert len(engines[0].start_seconds) == 1  # five requests, one start
        for e in engines:
            manager.release(e)
        assert engines[0].in_flight == 0
    finally:
        await manager.close()


async def test_pinned_model_loads_at_start_and_check_warns_about_what_it_shuts_out(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    from engines.plan_text import check_plan

    reg = load_registry(
        write_registry(
            tmp_path / "r.yaml",
            [standin_model("p", pinned=True), standin_model("q")],
            executable=standin_executable(tmp_path),
            budget_gib=1.5,
        )
    )
    problems, warnings = check_plan(reg, EngineManager(reg, client=client, run_dir=tmp_path / "x").plan)
    assert problems == []
    assert any("pinned models hold" in w and "q can never be loaded" in w for w in warnings)
    manager = EngineManager(reg, client=client, run_dir=tmp_path / "run")
    await manager.start()
    try:
        for _ in range(100):
            if manager.engines["p"].state is EngineState.READY:
                break
            await asyncio.sleep(0.05)
        assert manager.engines["p"].state is EngineState.READY  # loaded with no request
    finally:
        await manager.close()


async def test_on_a_gpu_eviction_sleeps_and_the_swap_back_is_a_wake(tmp_path: Path, client: httpx.AsyncClient) -> None:
    """Residency tiers: where sleep frees memory, a victim sleeps (level 1 within the host-RAM allowance,
    else level 2) and coming back is a wake, not a cold start."""
    import yaml

    path = write_registry(
        tmp_path / "r.yaml",
        [standin_model("a", gib=2.0), standin_model("b", gib=2.0)],
        executable=standin_executable(tmp_path),
        budget_gib=3.0,
        platform="cuda",
    )
    data = yaml.safe_load(path.read_text())
    data["gpu"]["host_ram_for_sleep_gib"] = 0.0  # no room to keep weights in host RAM: level 2
    path.write_text(yaml.safe_dump(data))
    manager = EngineManager(load_registry(path), client=client, run_dir=tmp_path / "run")
    await manager.start()
    try:
        a, b = manager.engines["a"], manager.engines["b"]
        await manager.load("a")
        await manager.load("b")
        assert a.state is EngineState.SLEEPING and a.sleep_level == 2 and b.state is EngineState.READY
        stats = (await client.get(f"{a.base_url}/standin/stats")).json()
        assert stats["sleeping"] and stats["sleep_level"] == 2  # the engine itself was put to sleep
        await manager.load("a")
        assert (a.sm.state, b.sm.state) == (EngineState.READY, EngineState.SLEEPING)  # read after the await
        assert [s.kind for s in manager.swaps] == ["co_load", "cold", "wake"]
        assert len(a.wake_seconds) == 1 and len(a.start_seconds) == 1  # woken, not restarted
        assert "--enable-sleep-mode" in (a.process.argv if a.process else [])
    finally:
        await manager.close()


async def test_unloading_a_model_while_it_starts_fails_its_waiters_and_the_owner_lives_on(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    from engines.errors import EngineStartError

    models = [standin_model("a", env={"STANDIN_START_DELAY": "2"}), standin_model("b")]
    reg = load_registry(write_registry(tmp_path / "r.yaml", models, executable=standin_executable(tmp_path)))
    manager = EngineManager(reg, client=client, run_dir=tmp_path / "run")
    await manager.start()
    try:
        waiting = asyncio.create_task(manager.acquire("a"))
        for _ in range(100):
            if manager.engines["a"].state is EngineState.STARTING:
                break
            await asyncio.sleep(0.02)
        await manager.unload("a")
        with pytest.raises(EngineStartError, match="start was cancelled"):
            await asyncio.wait_for(waiting, timeout=10)
        engine = await asyncio.wait_for(manager.acquire("b"), timeout=10)  # the owner still decides
        manager.release(engine)
        assert manager._owner is not None and not manager._owner.done()
    finally:
        await manager.close()
