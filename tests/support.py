"""Test support: registries for the stand-in engine, and a real gateway on a real socket in a thread."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI

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
