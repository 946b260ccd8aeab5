"""Engine supervision with the real CPU vLLM: two engines side by side, and vLLM's own start errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engines.engine import Engine
from engines.errors import EngineStartError
from engines.leftovers import StateFile
from engines.planner import plan_registry
from engines.registry import load_registry
from engines.state import EngineState
from engines.vllm import LaunchConfig
from tests.real.conftest import RealVllm, vllm_processes
from tests.support import write_registry

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=120) as c:
        yield c


def engines_for(
    tmp_path: Path, real: RealVllm, client: httpx.AsyncClient, models: list[dict[str, Any]]
) -> list[Engine]:
    reg = load_registry(write_registry(tmp_path / "reg.yaml", models, executable=real.executable, budget_gib=4))
    plan = plan_registry(reg)
    launch = LaunchConfig(
        registry=reg,
        executable=reg.vllm.executable,
        platform=reg.gpu.platform,
        budget_gib=plan.budget_gib,
        run_dir=tmp_path / "run",
    )
    state = StateFile(tmp_path / "run" / "state" / "engines.json")
    return [Engine(m, plan=plan.model(m.name), launch=launch, client=client, state_file=state) for m in reg.models]


def tiny(name: str, source: Path, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(source), "dtype": "float32", "max_model_len": 512, "start_timeout_s": 240, **kw}


def state(e: Engine) -> EngineState:
    """The engine's state now: read through a call, so that the type checker does not carry a state it
    narrowed before an ``await`` past it (the engine's own tasks move it meanwhile)."""
    return e.state


async def test_two_engines_side_by_side(real_vllm: RealVllm, tmp_path: Path, client: httpx.AsyncClient) -> None:
    a, b = engines_for(
        tmp_path, real_vllm, client, [tiny("a", real_vllm.models.base), tiny("b", real_vllm.models.other)]
    )
    await a.ensure_ready()
    await b.ensure_ready()  # one at a time: two starting together miscount each other's memory
    try:
        assert a.state is b.state is EngineState.READY and a.port != b.port
        answers = []
        for e in (a, b):
            r = await client.post(
                f"{e.base_url}/v1/chat/completions",
                json={
                    "model": e.name,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["message"]["content"])
        assert answers[0] != answers[1]  # two different models answered
        print(f"start seconds: a={a.start_seconds} b={b.start_seconds}")
    finally:
        await asyncio.gather(a.stop(), b.stop())
    assert state(a) is state(b) is EngineState.STOPPED
    assert vllm_processes() == []


async def test_runtime_lora_load_and_answer(real_vllm: RealVllm, tmp_path: Path, client: httpx.AsyncClient) -> None:
    (e,) = engines_for(
        tmp_path, real_vllm, client, [tiny("base", real_vllm.models.base, lora={"enabled": True, "max_rank": 8})]
    )
    await e.ensure_ready()
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        base = (await client.post(f"{e.base_url}/v1/completions", json={**body, "model": "base"})).json()
        await e.ensure_adapter("my-lora", str(real_vllm.models.lora))
        await e.ensure_adapter("my-lora", str(real_vllm.models.lora))  # idempotent
        lora = (await client.post(f"{e.base_url}/v1/completions", json={**body, "model": "my-lora"})).json()
        assert lora["model"] == "my-lora"
        assert lora["choices"][0]["text"] != base["choices"][0]["text"]
    finally:
        await e.stop()


async def test_bad_vllm_flag_fails_with_vllms_own_error(
    real_vllm: RealVllm, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    (e,) = engines_for(
        tmp_path, real_vllm, client, [tiny("bad", real_vllm.models.base, extra_args=["--no-such-flag-for-vllm"])]
    )
    with pytest.raises(EngineStartError) as info:
        await e.ensure_ready()
    assert e.state is EngineState.FAILED
    assert "--no-such-flag-for-vllm" in info.value.message  # vLLM's argparse line, quoted in our message
    assert "unrecognized arguments" in info.value.message
    assert vllm_processes() == []
