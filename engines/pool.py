"""The one door into the engines. The gateway imports this module, ``engines.errors`` and
``engines.registry``, and nothing else of ``engines`` (``tests/test_boundary.py`` checks it).

A request reserves a slot on its model's engine; the reservation is granted at once when the engine is
ready, or waits in the model's queue while the owner task makes it resident. ``ready()`` gives an
:class:`~engines.upstream.Upstream`: where to send, its adapters, and how to explain a failure::

    pool = EnginePool(registry, client=client, run_dir=Path(".onecard"))
    await pool.start()
    reservation = pool.reserve("judge", user="ana", klass="interactive")   # CapacityError: refused now
    try:
        upstream = await reservation.ready()        # waits (bounded) through a swap
        ... send the request to upstream.base_url ...
    finally:
        reservation.release()                       # the slot, or the place in the queue
    pool.snapshot()                                 # a frozen view: admin, /v1/models, ps, metrics
    await pool.submit(Unload("judge"))              # admin actions and leases go to the owner
    await pool.close()
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

# The values the gateway may use of the engines, besides the pool: re-exported here so that this module
# is the one import of ``engines`` internals in the gateway.
from engines.commands import Command, GrantLease, HeartbeatLease, Load, ReleaseLease, Sleep, Unload, Wake
from engines.cpu_setup import build_demo_models, default_home, setup_cpu_engine
from engines.engine import Engine, RestartPolicy
from engines.engine_args import engine_args, format_quantization, plan_report
from engines.events import ManagerEvents
from engines.gpu import (
    CLOCK_EVENT_REASONS,
    GpuProbe,
    GpuReading,
    NvmlProbe,
    ThermalGuard,
    card_total_gib,
    engine_gpu_bytes,
)
from engines.lease_owner import holder_refusal, peer_uid
from engines.leases import MAX_TTL_S, MIN_TTL_S, Lease
from engines.manager import EngineManager
from engines.people import (
    ADMIN,
    ADMIN_USER,
    ANONYMOUS,
    ANONYMOUS_USER,
    CLASS_PRIORITY,
    User,
    UserClass,
    Users,
    UsersError,
    add_user,
    load_users,
    request_class,
)
from engines.plan_text import check_plan, check_registry, format_plan
from engines.planner import Plan, Verdict, detect_budget_gib, plan_registry
from engines.provenance import engine_record, header_value, source_record, vllm_version_of
from engines.registry import Registry, Target
from engines.report import EngineInfo, Snapshot, SwapRecord, engine_info, engine_rows
from engines.state import EngineState
from engines.upstream import EngineDead, EngineUpstream, Upstream

__all__ = [
    "ADMIN", "ADMIN_USER", "ANONYMOUS", "ANONYMOUS_USER", "CLASS_PRIORITY", "CLOCK_EVENT_REASONS", "MAX_TTL_S",
    "MIN_TTL_S", "Command", "EngineDead", "EngineInfo", "EnginePool", "EngineState", "GpuProbe", "GpuReading",
    "GrantLease", "HeartbeatLease", "Lease", "Load", "ManagerEvents", "NvmlProbe", "Plan", "ReleaseLease",
    "Reservation", "RestartPolicy", "Sleep", "Snapshot", "SwapRecord", "ThermalGuard", "Unload", "Upstream", "User",
    "UserClass", "Users", "UsersError", "Verdict", "Wake", "add_user", "build_demo_models", "card_total_gib",
    "check_plan", "check_registry", "default_home", "detect_budget_gib", "engine_args", "engine_gpu_bytes",
    "engine_rows", "format_plan", "format_quantization", "header_value", "holder_refusal", "load_users", "peer_uid",
    "plan_registry", "plan_report", "request_class", "setup_cpu_engine", "source_record", "vllm_version_of",
]

#: Bytes read from the end of a log file per step when looking for its last lines.
_TAIL_BLOCK = 64 * 1024


class Reservation:
    """One request's claim on a model's engine: granted, or waiting in its queue."""

    __slots__ = ("_done", "_engine", "_owner", "_upstream", "_waiter", "model", "user")

    def __init__(self, owner: EngineManager, model: str, user: str, engine: Engine | None, upstream: Upstream,
                 waiter: Any = None) -> None:
        self.model = model
        self.user = user
        self._owner = owner
        self._engine = engine  # set once granted
        self._waiter = waiter
        self._upstream = upstream
        self._done = False

    @property
    def granted(self) -> bool:
        return self._engine is not None

    @property
    def upstream(self) -> Upstream:
        """The engine, once granted (see :meth:`ready`)."""
        assert self._engine is not None, "not granted yet: await ready()"
        return self._upstream

    @property
    def position(self) -> int:
        """The place in the model's queue (1: next); 0 once granted or failed."""
        return 0 if self._waiter is None else self._owner.admission.position(self.model, self._waiter)

    async def ready(self) -> Upstream:
        """Wait until granted (bounded: CapacityError past the queue's bound; the engine's error if it
        cannot be made resident). Cancelled, the reservation gives up its place."""
        if self._engine is None:
            self._engine = await self._owner.admission.wait(self.model, self._waiter)
        return self._upstream

    def release(self) -> None:
        """Give back the slot, or the place in the queue (and a slot granted meanwhile). Idempotent."""
        if self._done:
            return
        self._done = True
        if self._engine is not None:
            self._owner.admission.release(self._engine, self.user)
        elif self._waiter is not None:
            self._owner.admission.leave(self.model, self._waiter)


class EnginePool:
    """Every engine of the registry behind one door; the owner task inside decides what is resident."""

    def __init__(self, registry: Registry, *, client: httpx.AsyncClient, run_dir: Path, executable: str | None = None,
                 budget_gib: float | None = None, restart: RestartPolicy | None = None,
                 events: ManagerEvents | None = None, tick_s: float = 1.0, gpu_probe: GpuProbe | None = None,
                 card_total_gib: float | None = None) -> None:
        self.registry = registry
        self.client = client
        self.gpu_probe = gpu_probe
        self.owner = EngineManager(registry, client=client, run_dir=run_dir, executable=executable,
                                   budget_gib=budget_gib, restart=restart, events=events, tick_s=tick_s,
                                   gpu_probe=gpu_probe, card_total_gib=card_total_gib)
        self._upstreams: dict[str, Upstream] = {
            name: EngineUpstream(engine, self._adapter_path) for name, engine in self.owner.engines.items()}
        self._admission = self.owner.admission

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Lock the run folder, reap an earlier run's engines (their pids returned), start the owner."""
        return await self.owner.start()

    async def close(self) -> None:
        """Fail every waiter, stop every engine, unlock the run folder."""
        await self.owner.close()

    # --- names --------------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        return self.owner.plan

    @property
    def executable(self) -> str:
        """The vLLM command every engine is started with."""
        return self.owner.launch.executable

    def resolve(self, name: str) -> Target | None:
        """A registry name, alias or adapter, else a discovered adapter, else None."""
        return self.owner.catalogue.resolve(name)

    def model_names(self) -> list[str]:
        return self.owner.catalogue.names()

    def _adapter_path(self, model: str, adapter: str) -> str:
        target = self.resolve(adapter)
        if target is None or target.model.name != model:
            raise KeyError(f"adapter {adapter!r} of {model} is not known")
        return self.owner.catalogue.path(target)

    # --- requests -----------------------------------------------------------------------------------

    def reserve(self, model: str, *, user: str = ANONYMOUS, klass: str = UserClass.BATCH.value) -> Reservation:
        """A slot on ``model``'s engine: granted now, or queued (QueueFull, UserLimit or CapacityError when
        the queue refuses it)."""
        engine = self._admission.try_acquire(model, user)
        if engine is not None:
            return Reservation(self.owner, model, user, engine, self._upstreams[model])
        waiter = self._admission.enqueue(model, user=user, klass=klass)
        return Reservation(self.owner, model, user, None, self._upstreams[model], waiter)

    # --- commands -----------------------------------------------------------------------------------

    async def submit(self, command: Command) -> Any:
        """Carry out an admin action or a lease call through the owner; its outcome, or its OnecardError."""
        return await self.owner.submit(command)

    def set_share_limits(self, in_flight: dict[str, int], queued: dict[str, int] | None = None) -> None:
        """Each user's in-flight and queued request limits (from the users file)."""
        self.owner.shares.set_limits(in_flight, queued)

    # --- views --------------------------------------------------------------------------------------

    def snapshot(self, *, planned_args: bool = False) -> Snapshot:
        """A frozen view of every engine. ``planned_args``: include the flags a stopped engine would start
        with (worked out anew each time: for the console, not for every request)."""
        owner, now = self.owner, time.monotonic()
        queues = owner.admission.queues
        return Snapshot(
            engines=tuple(engine_info(e, queued=len(queues[n]), oldest_since=queues[n][0].since if queues[n] else None,
                                      launch=owner.launch, now=now, planned_args=planned_args)
                         for n, e in owner.engines.items()),
            plan=owner.plan, platform=owner.platform, sleep_frees_memory=owner.launch.sleep_supported,
            reserved_gib=owner.leases.reserved_gib, lease=owner.leases.lease, swaps=tuple(owner.swaps[-1000:]),
            last_reason=owner.last_reason, discovered=tuple(owner.catalogue.discovered.values()),
            adapter_problems=tuple(owner.catalogue.problems.items()))

    def state(self, model: str) -> EngineState:
        return self.owner.engines[model].state

    def engine_id(self, model: str) -> str | None:
        """The running process's id (changes with each start), for caching what depends on it."""
        return self.owner.engines[model].engine_id

    def engine_record(self, model: str) -> dict[str, Any]:
        """The provenance of the running engine: its flags and the vLLM version it reports."""
        e = self.owner.engines[model]
        return engine_record(tuple(e.process.argv) if e.process else (), e.vllm_version)

    def model_of_pid(self, pid: int) -> str | None:
        """Which model an engine process (by pid) belongs to, for per-process GPU memory."""
        for name, engine in self.owner.engines.items():
            if engine.pid == pid:
                return name
        return None

    async def metrics_text(self, model: str) -> str | None:
        """A ready or sleeping engine's own ``/metrics`` text; None when it has none to give now."""
        engine = self.owner.engines[model]
        if engine.state not in (EngineState.READY, EngineState.DRAINING, EngineState.SLEEPING):
            return None
        try:
            return await engine.api.metrics_text()
        except httpx.HTTPError:
            return None

    async def log_tail(self, model: str, lines: int) -> tuple[str, ...]:
        """The last ``lines`` lines of the engine's log: from memory while it runs, else from its log
        file (read from the end, off the event loop)."""
        engine = self.owner.engines[model]
        tail = engine.log_tail(lines)
        if tail:
            return tail
        path = self.owner.run_dir / "logs" / f"{model}.log"
        return await asyncio.to_thread(last_lines, path, lines)


def last_lines(path: Path, n: int) -> tuple[str, ...]:
    """The last ``n`` lines of a text file, reading blocks from its end (never the whole file)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return ()
    with f:
        end = f.seek(0, 2)
        blocks: deque[bytes] = deque()
        newlines = 0
        while end > 0 and newlines <= n:
            start = max(0, end - _TAIL_BLOCK)
            f.seek(start)
            block = f.read(end - start)
            blocks.appendleft(block)
            newlines += block.count(b"\n")
            end = start
    text = b"".join(blocks).decode(errors="replace")
    return tuple(text.splitlines()[-n:])
