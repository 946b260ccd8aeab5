"""Engine supervision against the stand-in engine: start, ready, stop, and every fault path."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from engines.engine import Engine, RestartPolicy
from engines.errors import CrashLoop, EngineStartError
from engines.leftovers import StateFile
from engines.planner import plan_registry
from engines.registry import load_registry
from engines.state import EngineState
from engines.vllm import LaunchConfig
from tests.support import alive, standin_executable, standin_model, write_registry


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
        yield c


class FakeClock:
    """The engine's restart-policy clock: backoffs and crash-loop windows pass when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_engine(tmp_path: Path, client: httpx.AsyncClient, policy: RestartPolicy | None = None,
                clock: FakeClock | None = None, **model: Any) -> Engine:
    reg_path = write_registry(tmp_path / "reg.yaml", [standin_model("m", **model)],
                              executable=standin_executable(tmp_path))
    reg = load_registry(reg_path)
    plan = plan_registry(reg)
    launch = LaunchConfig(registry=reg, executable=reg.vllm.executable, platform=reg.gpu.platform,
                          budget_gib=plan.budget_gib, run_dir=tmp_path / "run")
    return Engine(reg.models[0], plan=plan.model("m"), launch=launch, client=client,
                  state_file=StateFile(tmp_path / "run" / "state" / "engines.json"), policy=policy,
                  clock=clock or time.monotonic)


def state(e: Engine) -> EngineState:
    """The engine's state now: read through a call, so that the type checker does not carry a state it
    narrowed before an ``await`` past it (the engine's own tasks move it meanwhile)."""
    return e.state


async def test_start_ready_serve_stop(tmp_path: Path, client: httpx.AsyncClient) -> None:
    e = make_engine(tmp_path, client)
    starts = [asyncio.create_task(e.ensure_ready()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert state(e) is EngineState.STARTING
    await asyncio.gather(*starts)  # the second and third caller joined the first start
    assert state(e) is EngineState.READY and len(e.start_seconds) == 1
    r = await client.post(f"{e.base_url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200
    pid = e.pid
    assert pid is not None and alive(pid)
    assert [rec.pid for rec in e.state_file.records()] == [pid]
    assert e.tmpdir is not None and e.tmpdir.is_dir()
    await e.stop()
    assert state(e) is EngineState.STOPPED and not alive(pid)
    assert e.state_file.records() == []
    assert not e.tmpdir.exists()  # the per-engine TMPDIR is removed
    assert "Starting vLLM API server" in (tmp_path / "run" / "logs" / "m.log").read_text()


async def test_start_timeout_fails_with_log_tail(tmp_path: Path, client: httpx.AsyncClient) -> None:
    e = make_engine(tmp_path, client, start_timeout_s=1.5, env={"STANDIN_START_DELAY": "30"})
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match="no healthy /health within 2 s"):
        await e.ensure_ready()
    assert time.monotonic() - t0 < 20
    assert state(e) is EngineState.FAILED
    assert e.pid is not None and not alive(e.pid)


async def test_crash_at_start_names_vllms_error(tmp_path: Path, client: httpx.AsyncClient) -> None:
    msg = "ValueError: unrecognized arguments: --bogus-flag"
    e = make_engine(tmp_path, client, env={"STANDIN_FAIL_START": msg})
    with pytest.raises(EngineStartError) as info:
        await e.ensure_ready()
    assert msg in info.value.message
    assert any(msg in line for line in info.value.log_tail)
    assert state(e) is EngineState.FAILED


async def test_crash_mid_request_then_restart(tmp_path: Path, client: httpx.AsyncClient) -> None:
    policy = RestartPolicy(base_backoff_s=0.2, loop_failures=3, loop_window_s=60)
    clock = FakeClock()
    # 5: the start's fingerprint probe (4 tokens) must pass; the 20-token request below crashes
    e = make_engine(tmp_path, client, policy, clock, env={"STANDIN_CRASH_AFTER_TOKENS": "5"})
    await e.ensure_ready()
    first_pid = e.pid
    with pytest.raises(httpx.HTTPError):
        async with client.stream("POST", f"{e.base_url}/v1/completions",
                                 json={"model": "m", "prompt": "hi", "max_tokens": 20, "stream": True}) as r:
            async for _ in r.aiter_raw():
                pass
    for _ in range(100):
        if state(e) is EngineState.FAILED:
            break
        await asyncio.sleep(0.05)
    assert state(e) is EngineState.FAILED
    assert e.last_error is not None and "exited" in e.last_error.message
    with pytest.raises(CrashLoop, match="restarts after a backoff"):
        await e.ensure_ready()  # inside the first backoff
    clock.advance(0.3)  # past it
    await e.ensure_ready()
    assert state(e) is EngineState.READY and e.pid != first_pid
    await e.stop()


async def test_hang_on_stop_takes_the_sigkill_path(tmp_path: Path, client: httpx.AsyncClient) -> None:
    policy = RestartPolicy(stop_grace_s=1.0, drain_timeout_s=0.5)
    e = make_engine(tmp_path, client, policy, env={"STANDIN_IGNORE_SIGTERM": "1"})
    await e.ensure_ready()
    pid = e.pid
    assert pid is not None
    t0 = time.monotonic()
    await e.stop()
    assert not alive(pid)
    assert 0.9 <= time.monotonic() - t0 < 10
    assert e.process is not None and e.process.returncode == -signal.SIGKILL


async def test_crash_loop_backs_off_then_refuses(tmp_path: Path, client: httpx.AsyncClient) -> None:
    policy = RestartPolicy(base_backoff_s=0.3, loop_failures=3, loop_window_s=60)
    clock = FakeClock()
    e = make_engine(tmp_path, client, policy, clock, env={"STANDIN_FAIL_START": "RuntimeError: CUDA error: boom"})
    with pytest.raises(EngineStartError):
        await e.ensure_ready()
    with pytest.raises(CrashLoop, match="restarts after a backoff") as backoff:
        await e.ensure_ready()  # immediately again: inside the backoff
    assert 0 < backoff.value.retry_after <= 1
    clock.advance(0.35)
    with pytest.raises(EngineStartError):
        await e.ensure_ready()
    with pytest.raises(CrashLoop, match="restarts after a backoff"):  # the second backoff is 0.6 s
        await e.ensure_ready()
    clock.advance(0.65)
    with pytest.raises(EngineStartError):
        await e.ensure_ready()
    with pytest.raises(CrashLoop, match="failed 3 times") as loop:
        await e.ensure_ready()
    assert "CUDA error: boom" in loop.value.message
    assert loop.value.retry_after > 50


async def test_reap_kills_leftovers_and_spares_strangers(tmp_path: Path, client: httpx.AsyncClient) -> None:
    e = make_engine(tmp_path, client)
    await e.ensure_ready()
    pid = e.pid
    assert pid is not None
    stranger = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    # A record of ours whose pid is now a stranger's: never touched (its environment lacks our id).
    state = StateFile(tmp_path / "run" / "state" / "engines.json")
    from engines.leftovers import EngineRecord

    state.add(EngineRecord(engine_id="not-ours", model="x", pid=stranger.pid, pgid=stranger.pid, port=1,
                           started_at=time.time(), tmpdir=str(tmp_path / "nothing")))
    e.process = None  # forget the engine, as a supervisor killed with -9 would
    killed = await asyncio.to_thread(state.reap)
    assert pid in killed and stranger.pid not in killed
    assert not alive(pid) and psutil.pid_exists(stranger.pid)
    assert state.records() == []
    os.kill(stranger.pid, signal.SIGKILL)
    await stranger.wait()
