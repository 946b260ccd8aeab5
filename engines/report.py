"""Frozen views of the engines for everything that reports on them: ``/admin/engines``, ``onecard ps``,
``/v1/models``, the console and the metrics. Nothing here can change an engine::

    snap = pool.snapshot()
    snap.engine("tiny").state          # EngineState.READY
    engine_rows(snap)                  # the rows of GET /admin/engines
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engines.adapters import FoundAdapter
from engines.engine_args import engine_args
from engines.leases import Lease
from engines.planner import ModelPlan, Plan
from engines.registry import ModelSpec, Platform
from engines.state import EngineState

if TYPE_CHECKING:
    from engines.engine import Engine
    from engines.vllm import LaunchConfig


@dataclass(frozen=True)
class SwapRecord:
    at: float
    model: str
    kind: str
    evicted: tuple[str, ...]
    seconds: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "model": self.model, "kind": self.kind, "evicted": self.evicted,
                "seconds": self.seconds, "reason": self.reason}


@dataclass(frozen=True)
class EngineInfo:
    """One engine as it is now."""

    name: str
    spec: ModelSpec
    plan: ModelPlan
    state: EngineState
    pid: int | None
    port: int | None
    engine_id: str | None
    in_flight: int
    queued: int
    oldest_wait_s: float | None
    uptime_s: float | None
    sleep_level: int
    adapters: tuple[str, ...]
    last_error: str | None
    start_seconds: tuple[float, ...]
    wake_seconds: tuple[float, ...]
    vllm_version: str | None
    #: The vLLM flags (host and port left out): of the running process, or what a start would use now
    #: (only in a snapshot taken with ``planned_args``).
    engine_args: tuple[str, ...]
    engine_args_source: str  # "running" or "planned"
    argv: tuple[str, ...] = ()  # the running process's whole command line


@dataclass(frozen=True)
class Snapshot:
    engines: tuple[EngineInfo, ...]
    plan: Plan
    platform: Platform
    sleep_frees_memory: bool
    reserved_gib: float
    lease: Lease | None
    swaps: tuple[SwapRecord, ...]
    last_reason: str
    discovered: tuple[FoundAdapter, ...]
    adapter_problems: tuple[tuple[str, str], ...]
    taken_at: float = field(default_factory=time.time)

    def engine(self, name: str) -> EngineInfo:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def draining(self) -> frozenset[str]:
        return frozenset(e.name for e in self.engines if e.state is EngineState.DRAINING)


def without_host_port(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--host", "--port"):
            skip = True
        else:
            out.append(arg)
    return out


def engine_info(e: Engine, *, queued: int, oldest_since: float | None, launch: LaunchConfig, now: float,
                planned_args: bool = False) -> EngineInfo:
    """``planned_args``: also work out the flags a stopped engine would start with (this reads a local
    checkpoint's config.json for its quantization); otherwise a stopped engine's ``engine_args`` is empty."""
    running = e.process is not None and e.state is not EngineState.STOPPED
    argv = tuple(e.process.argv) if running and e.process is not None else ()
    if running:
        args, source = without_host_port(list(argv)[2:]), "running"
    elif not planned_args:
        args, source = [], "planned"
    else:
        args = engine_args(launch.registry, e.spec, e.plan, platform=launch.platform, budget_gib=launch.budget_gib,
                           card_total_gib=launch.card_total_gib)
        source = "planned"
    live = e.state is not EngineState.STOPPED
    return EngineInfo(
        name=e.name, spec=e.spec, plan=e.plan, state=e.state,
        pid=e.pid if live else None, port=e.port if live else None, engine_id=e.engine_id,
        in_flight=e.in_flight, queued=queued,
        oldest_wait_s=None if oldest_since is None else now - oldest_since,
        uptime_s=None if e.ready_since is None else now - e.ready_since,
        sleep_level=e.sleep_level, adapters=tuple(sorted(e.adapters)),
        last_error=e.last_error.message if e.last_error and e.state is EngineState.FAILED else None,
        start_seconds=tuple(e.start_seconds[-5:]), wake_seconds=tuple(e.wake_seconds[-5:]),
        vllm_version=e.vllm_version, engine_args=tuple(args), engine_args_source=source, argv=argv,
    )


def engine_rows(snap: Snapshot) -> list[dict[str, object]]:
    """The rows of ``GET /admin/engines`` (and ``onecard ps``)."""
    return [
        {
            "model": e.name,
            "state": e.state.value,
            "pid": e.pid,
            "port": e.port,
            "uptime_s": None if e.uptime_s is None else round(e.uptime_s, 1),
            "in_flight": e.in_flight,
            "queued": e.queued,
            "oldest_wait_s": None if e.oldest_wait_s is None else round(e.oldest_wait_s, 2),
            "draining": e.state is EngineState.DRAINING,
            "footprint_gib": round(e.plan.resident_gib, 2),
            "verdict": e.plan.verdict.value,
            "pinned": e.spec.pinned,
            "adapters": list(e.adapters),
            "last_error": e.last_error,
            "start_seconds": [round(s, 2) for s in e.start_seconds],
            "wake_seconds": [round(s, 2) for s in e.wake_seconds],
        }
        for e in snap.engines
    ]
