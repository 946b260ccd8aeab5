"""Fixtures for tests against the real vLLM engine on the CPU (slow: each engine start is ~20-30 s)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil
import pytest

from engines.cpu_setup import DemoModels, build_demo_models, default_home, setup_cpu_engine
from tests.support import GatewayProcess


@dataclass(frozen=True)
class RealVllm:
    executable: Path
    models: DemoModels


@pytest.fixture(scope="session")
def real_vllm() -> RealVllm:
    home = default_home()
    exe = setup_cpu_engine(home)
    models = build_demo_models(home / "demo-models")
    return RealVllm(exe, models)


def vllm_processes() -> list[psutil.Process]:
    """Every live vLLM engine process on the machine (API server, EngineCore or worker)."""
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if ("vllm serve" in cmd or "vllm-cpu/bin/vllm" in cmd or "EngineCore" in (p.info["name"] or "")) and (
            p.pid != os.getpid()
        ):
            found.append(p)
    return found


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[type[GatewayProcess]]:
    started: list[GatewayProcess] = []

    class Factory(GatewayProcess):
        def start(self, timeout: float = 60.0) -> Self:
            started.append(self)
            return super().start(timeout)

    yield Factory
    for g in started:
        g.stop()


@pytest.fixture(scope="module")
def demo_gateway(real_vllm: RealVllm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``onecard serve`` with the demo registry (two tiny models that cannot share the budget), per module."""
    from gateway.serve import demo_registry

    run_dir = tmp_path_factory.mktemp("demo-gateway")
    registry = demo_registry(run_dir / "registry.yaml", models_dir=real_vllm.models.base.parent,
                             executable=real_vllm.executable)
    gw = GatewayProcess(registry, run_dir)
    gw.start()
    yield gw
    gw.stop()
    deadline = time.monotonic() + 30
    while vllm_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_processes() == [], "the gateway left vLLM engines behind"
