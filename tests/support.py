"""Test support: registries for the stand-in engine, a real gateway on a real socket in a thread,
``onecard serve`` as a subprocess, a scripted GPU probe, and polling helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import uvicorn
import yaml
from fastapi import FastAPI

from engines.gpu import GpuReading
from gateway.app import create_app
from gateway.context import Gateway
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def standin_executable(folder: Path) -> Path:
    """A ``vllm``-shaped executable that runs the stand-in engine."""
    exe = folder / "standin-vllm"
    exe.write_text(
        f"#!/bin/sh\nexport PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f"exec {sys.executable} -m tests.fakes.standin_engine \"$@\"\n"
    )
    exe.chmod(0o755)
    return exe


def standin_model(name: str, *, gib: float = 1.0, **fields: Any) -> dict[str, Any]:
    """A registry entry the planner sizes at about ``gib`` GiB on the CPU platform (1 GiB is runtime)."""
    params_b = max(0.001, (gib - 1.0) * (1024**3) / 4 / 1e9)
    entry: dict[str, Any] = {
        "name": name,
        "source": f"standin/{name}",
        "params_b": params_b,
        "dtype": "float32",
        "max_model_len": 512,
        "start_timeout_s": 30,
    }
    entry.update(fields)
    return entry


def write_registry(
    path: Path,
    models: list[dict[str, Any]],
    *,
    executable: Path | str,
    budget_gib: float = 2.5,
    scheduler: dict[str, Any] | None = None,
    platform: str = "cpu",
) -> Path:
    data: dict[str, Any] = {
        "gpu": {"budget_gib": budget_gib, "headroom_gib": 0.0, "platform": platform},
        "vllm": {"executable": str(executable)},
        "models": models,
    }
    if scheduler:
        data["scheduler"] = scheduler
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                     timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gw(self) -> Gateway:
        gw: Gateway = self.app.state.gw
        return gw

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (to reach the manager) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextmanager
def running_gateway(registry: Path, run_dir: Path, **settings: Any) -> Iterator[ServerThread]:
    s = Settings(registry_path=registry, run_dir=run_dir, **settings)
    server = ServerThread(create_app(s))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def engine_pids(server: ServerThread) -> list[int]:
    return [e.pid for e in server.gw.pool.owner.engines.values() if e.pid is not None]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def until(cond: Callable[[], bool], timeout: float = 10.0, poll_s: float = 0.1) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms; fail the test if it does not hold within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """Exited (a zombie that nobody reaped counts as gone: it holds no memory and serves nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class GatewayProcess:
    """``onecard serve`` as a subprocess (so it can be signalled or killed with -9), its output in a file.

    :meth:`stop` ends it gracefully (SIGTERM, then SIGKILL after 60 s); :meth:`close` kills it and every
    descendant it was seen with (engines it leaves behind).
    """

    def __init__(self, registry: Path, run_dir: Path, port: int | None = None, *, log_level: str = "info",
                 env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.registry = registry
        self.run_dir = run_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = run_dir.parent / f"gateway-{self.port}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.argv = [sys.executable, "-m", "gateway.cli", "serve", "--registry", str(registry), "--port",
                     str(self.port), "--run-dir", str(run_dir), "--log-level", log_level, *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()  # every descendant pid we have observed, for clean-up

    def start(self, timeout: float = 60.0) -> Self:
        """Start it and wait until ``/health`` answers 200; fails with its log if it exits or stays silent."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer /health:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> set[int]:
        try:
            found = {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            found = set()
        self.seen |= found
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        self.descendants()
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and wait for the gateway's own shutdown; SIGKILL if it takes over 60 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """SIGKILL the gateway and every descendant seen, at once (test clean-up)."""
        self.descendants()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.seen:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


class FakeProbe:
    """A GPU probe that answers ``readings`` (a fixed list, or a function of nothing) and counts its reads."""

    def __init__(self, readings: list[GpuReading] | Callable[[], list[GpuReading]]) -> None:
        self.readings = readings
        self.reads = 0

    def read(self) -> list[GpuReading]:
        self.reads += 1
        return self.readings() if callable(self.readings) else self.readings
