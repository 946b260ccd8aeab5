"""The engine owner: all engines, and the one task that decides what is resident.

The owner loop never waits on an engine. Each turn it ends a lease that is due, carries out the commands
it was sent (:mod:`engines.commands`), asks the swap policy (:func:`engines.scheduler.decide`) what to do,
admits and fails waiters, and starts the slow work as tasks it keeps: one swap at a time (evict, then
start or wake), and per-model operations (stop, sleep). When a task ends the loop runs again. So while a
70B model takes minutes to start, leases are still checked, idle engines still expire, blocked waiters
still get their error and an admin can still unload another model::

    owner = EngineManager(registry, client=client, run_dir=Path(".onecard"))
    await owner.start()
    async with owner.slot("judge") as engine:     # waits (bounded) while a swap happens
        ... send the request to engine.base_url ...
    await owner.close()                          # stops every engine

The gateway reaches it only through :mod:`engines.pool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from engines.admission import Admission, Waiter
from engines.aio import Signal, settle
from engines.catalogue import AdapterCatalogue
from engines.commands import Command, GrantLease, HeartbeatLease, Load, ReleaseLease, Sleep, Unload, Wake
from engines.engine import Engine, RestartPolicy
from engines.errors import CapacityError, CrashLoop, EngineError, LeaseError, OnecardError, StartCancelled
from engines.events import ManagerEvents
from engines.gpu import GpuProbe, engine_gpu_bytes
from engines.lease_book import LeaseBook
from engines.leases import Lease
from engines.leftovers import RunLock, StateFile
from engines.ops import ModelOps, forward
from engines.people import ANONYMOUS, UserClass
from engines.planner import Plan, plan_registry
from engines.registry import Registry
from engines.report import SwapRecord
from engines.scheduler import POLICIES, Decision, EngineView, idle_expired, victims_for_room
from engines.shares import Shares
from engines.state import EngineState, wait_event
from engines.vllm import LaunchConfig

__all__ = ["EngineManager", "ManagerEvents", "Waiter", "engine_gpu_bytes"]

log = logging.getLogger(__name__)


class EngineManager:
    """Owns every engine; the only place that decides and performs swaps."""

    def __init__(
        self,
        registry: Registry,
        *,
        client: httpx.AsyncClient,
        run_dir: Path,
        executable: str | None = None,
        budget_gib: float | None = None,
        restart: RestartPolicy | None = None,
        events: ManagerEvents | None = None,
        tick_s: float = 1.0,
        gpu_probe: GpuProbe | None = None,
        card_total_gib: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.run_dir = run_dir
        self.events = events or ManagerEvents()
        self.plan: Plan = plan_registry(registry, budget_gib=budget_gib)
        self._budget_override = budget_gib
        self.gpu_probe = gpu_probe
        self.measured_gib: dict[str, float] = {}
        self.platform = registry.gpu.platform
        self.launch = LaunchConfig(registry=registry, executable=executable or registry.vllm.executable,
                                   platform=self.platform, budget_gib=self.plan.budget_gib, run_dir=run_dir,
                                   card_total_gib=card_total_gib)
        self.run_lock = RunLock(run_dir)
        self.state_file = StateFile(run_dir / "state" / "engines.json")
        self.engines: dict[str, Engine] = {
            m.name: Engine(m, plan=self.plan.model(m.name), launch=self.launch, client=client,
                           state_file=self.state_file, policy=restart, on_state=self.events.state_changed)
            for m in registry.models
        }
        self.swaps: list[SwapRecord] = []
        self.last_reason = ""
        self.max_wait_s = registry.scheduler.max_wait_s
        self.policy = POLICIES[registry.scheduler.policy]
        #: Each request class's wait bound in the swap policy: interactive requests force a swap sooner.
        self.wait_bounds = {UserClass.BATCH.value: self.max_wait_s, UserClass.INTERACTIVE.value: min(
            self.max_wait_s, registry.scheduler.interactive_max_wait_s)}
        self.shares = Shares()
        self.admission = Admission(self.engines, shares=self.shares, events=self.events,
                                   max_queue=registry.scheduler.max_queue, max_wait_s=self.max_wait_s,
                                   becoming_resident=self._becoming_resident, kick=self.kick)
        self.leases = LeaseBook(self.state_file, self.events, wall_clock=wall_clock)
        self.catalogue = AdapterCatalogue(registry)
        self._tick_s = tick_s
        self._kick = Signal()
        self._commands: deque[tuple[Command, asyncio.Future[Any]]] = deque()
        self._owner: asyncio.Task[None] | None = None
        self._swap: asyncio.Task[None] | None = None
        self._target: str | None = None  # the model the swap makes resident
        self._swap_models: frozenset[str] = frozenset()  # its target and its victims
        self.ops = ModelOps(kick=self.kick)  # per model: a stop or a sleep in progress
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False  # everything else the owner started (loads, grants, watch)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Lock the run folder, kill leftovers of an earlier run, restore a live lease, start the owner task.
        Returns pids killed. Raises RunFolderBusy (and kills nothing) while another gateway uses the folder."""
        try:
            self.run_lock.acquire()
        except OnecardError as e:
            log.error("%s", e.message)
            raise
        killed = await asyncio.to_thread(self.state_file.reap)
        await self.leases.restore()
        try:
            await self.catalogue.rescan(self._unload_adapter)
        except Exception:  # discovery never stops start-up; the watcher retries
            log.exception("adapter scan failed")
        self._owner = asyncio.create_task(self._run(), name="engine-owner")
        for spec in self.registry.models:
            if spec.pinned:  # pinned models are meant to be there: load them now, not at first request
                self._spawn(self._load_logged(spec.name), f"preload-{spec.name}")
        if self.catalogue.watching:
            self._spawn(self.catalogue.watch(self._unload_adapter), "adapter-watch")
        return killed

    async def _load_logged(self, model: str) -> None:
        try:
            await self.load(model)
        except OnecardError as e:
            log.error("pinned model %s could not be loaded: %s", model, e.message)

    async def close(self) -> None:
        self._closed = True
        for task in (self._owner, self._swap, *self.ops.running.values(), *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._owner, self._swap, *self.ops.running.values(), *self._tasks):
            if task is not None:
                await settle(task, f"task {task.get_name()}", logger=log)
        for command, fut in self._commands:
            if not fut.done():
                fut.set_exception(CapacityError(f"the gateway is shutting down; {command} was not carried out"))
        for name in self.engines:
            self.admission.fail_all(name, CapacityError(f"the gateway is shutting down; {name} is unavailable",
                                                        model=name))
        await asyncio.gather(*(e.stop(drain_timeout_s=10) for e in self.engines.values()), return_exceptions=True)
        self.state_file.flush()
        self.run_lock.release()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), OnecardError):
            log.error("engine owner: task %s failed", task.get_name(), exc_info=task.exception())
        self._kick.set()

    # --- requests (the pool's door leads here) -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[Engine]:
        """Hold one in-flight slot on ``model``'s engine, waiting for it to become resident."""
        engine = await self.acquire(model)
        try:
            yield engine
        finally:
            self.release(engine)

    async def acquire(self, model: str, user: str = ANONYMOUS) -> Engine:
        engine = self.admission.try_acquire(model, user)
        if engine is not None:
            return engine
        return await self.admission.wait(model, self.admission.enqueue(model, user=user))

    def release(self, engine: Engine, user: str = ANONYMOUS) -> None:
        self.admission.release(engine, user)

    def _becoming_resident(self, model: str) -> bool:
        return self.engines[model].state is EngineState.STARTING or (self._swap is not None and self._target == model)

    def kick(self) -> None:
        self._kick.set()

    # --- commands -----------------------------------------------------------------------------------

    def submit(self, command: Command) -> asyncio.Future[Any]:
        """Hand ``command`` to the owner task; the future gives its outcome (or its OnecardError)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(CapacityError(f"the gateway is shutting down; {command} was not carried out"))
            return fut
        self._commands.append((command, fut))
        self._kick.set()
        return fut

    async def load(self, model: str) -> None:
        await self.submit(Load(model))

    async def unload(self, model: str) -> None:
        await self.submit(Unload(model))

    def _carry_out(self, command: Command, fut: asyncio.Future[Any]) -> None:
        """Start ``command`` (a task for anything that waits on an engine); ``fut`` gets its outcome."""
        match command:
            case Load(model) | Wake(model):
                forward(self._spawn(self._hold_once(model), f"load-{model}"), fut)
            case Unload(model):
                forward(self.ops.run(model, self.engines[model].stop()), fut)
            case Sleep(model, level):
                if not self.launch.sleep_supported:
                    log.info("sleep on %s: the platform has no sleep mode that frees memory; the engine keeps "
                             "its memory", model)
                forward(self.ops.run(model, self.engines[model].sleep(level)), fut)
            case GrantLease():
                forward(self._spawn(self._grant(command), "grant-lease"), fut)
            case ReleaseLease(lease_id, reason):
                fut.set_result(self.leases.release(lease_id, reason=reason))
            case HeartbeatLease(lease_id):
                fut.set_result(self.leases.heartbeat(lease_id))

    async def _hold_once(self, model: str) -> None:
        async with self.slot(model):
            pass

    async def _grant(self, req: GrantLease) -> Lease:
        """Reserve memory for a lease, evicting what must go; with ``wait``, first wait for the active one."""
        usable = self.plan.usable_gib
        pinned = {e.name: e.plan.resident_gib for e in self.engines.values()
                  if e.spec.pinned and e.state is not EngineState.STOPPED}
        want = LeaseBook.check(gib=req.gib, usable_gib=usable, budget_gib=self.plan.budget_gib,
                               headroom_gib=self.plan.headroom_gib, pinned=pinned)
        deadline = time.monotonic() + req.wait_timeout_s
        while self.leases.lease is not None:
            if not req.wait:
                raise self.leases.busy()
            await wait_event(self.leases.freed, max(0.1, deadline - time.monotonic()))
            if self.leases.lease is not None and time.monotonic() >= deadline:
                raise LeaseError("timed out waiting for the active lease to end")
        if self.leases.lease is not None:
            raise LeaseError(f"lease {self.leases.lease.lease_id} was granted first; retry after it ends")
        lease = Lease.new(gib=want, holder_pid=req.holder_pid, label=req.label, ttl_s=req.ttl_s or self.leases.ttl_s,
                          now=self.leases.wall_clock(), user=req.user)
        self.leases.reserved_gib = want
        # A swap under way keeps its target: counted as resident (it may still be stopped or asleep), never evicted.
        target = self._target if self._swap is not None else None
        views = [dataclasses.replace(v, occupies_memory=True, pinned=True) if v.name == target else v
                 for v in self.views()]
        victims = victims_for_room(views, self.fits)
        if victims is None:  # never leave a half-granted lease
            self.leases.reserved_gib = 0.0
            raise LeaseError("no set of unpinned engines frees enough memory for this lease" +
                             (f" while {target} is being made resident; retry after" if target else ""))
        self.leases.reserve(lease)
        for v in victims:
            log.info("lease %s: evicting %s to free memory", lease.lease_id, v)
        try:
            await asyncio.gather(*(self.ops.run(v, self.engines[v].stop()) for v in victims))
        except BaseException:
            if self.leases.lease is lease:  # never leave a half-granted lease holding memory
                self.leases.release(lease.lease_id, reason="its evictions failed")
            raise
        if self.leases.lease is not lease:
            raise LeaseError(f"lease {lease.lease_id} ended while its evictions ran (its holder is gone)")
        return self.leases.granted(tuple(victims))

    async def _unload_adapter(self, model: str, adapter: str) -> None:
        engine = self.engines[model]
        if adapter in engine.adapters and engine.state is EngineState.READY:
            await engine.unload_adapter(adapter)

    # --- the owner loop -----------------------------------------------------------------------------

    def fits(self, names: frozenset[str]) -> bool:
        if not names:
            return True
        if self.leases.reserved_gib <= 0:
            return self.plan.can_coreside(set(names))
        total = sum(self.plan.model(n).resident_gib for n in names)
        return self.plan.can_coreside(set(names)) and total <= self.plan.usable_gib - self.leases.reserved_gib

    def views(self, now: float | None = None) -> list[EngineView]:
        return self.admission.views(sleep_frees=self.launch.sleep_supported, now=now)

    async def _run(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the owner is closing
                log.exception("engine owner: a step was cancelled from inside; carrying on")
            except Exception:
                log.exception("engine owner: step failed")
            await self._kick.wait(self._tick_s)

    async def step(self) -> None:
        """One turn of the owner: leases, commands, then one decision. Waits on no engine."""
        if self.state_file.dirty:  # a failed write is retried here, once a tick
            await asyncio.to_thread(self.state_file.flush)
        due = await self.leases.due()
        if due is not None and self.leases.lease is due[0]:
            self.leases.release(due[0].lease_id, reason=due[1])
        while self._commands:
            command, fut = self._commands.popleft()
            if fut.done():
                continue
            try:
                self._carry_out(command, fut)
            except Exception as e:  # an unknown model, say: the caller hears of it, the owner carries on
                fut.set_exception(e)
        self._decide()

    def _busy(self) -> frozenset[str]:
        return frozenset(self.ops.running) | (self._swap_models if self._swap is not None else frozenset())

    def _decide(self) -> None:
        views = self.views()
        d: Decision = self.policy(views, fits=self.fits, max_wait_s=self.max_wait_s, wait_bounds=self.wait_bounds)
        self.last_reason = d.reason
        busy = self._busy()
        for name, e in self.engines.items():  # draining is a state: the policy's drains, and no others
            if name in d.drain and e.state is EngineState.READY:
                e.sm.swap(EngineState.READY, EngineState.DRAINING)
            elif name not in d.drain and name not in busy and e.state is EngineState.DRAINING:
                e.sm.swap(EngineState.DRAINING, EngineState.READY)
        for name in d.admit:
            self.admission.admit_all(name)
        if d.blocked:
            lease = self.leases.lease
            leased = (f"; {self.leases.reserved_gib:g} GiB of the card are leased (lease {lease.lease_id})"
                      if lease else "")
            self.admission.fail_all(d.blocked, CapacityError(
                f"model {d.blocked} cannot be made resident now: {d.reason}{leased}",
                model=d.blocked, retry_after=60 if lease else 3600))
        if d.load is not None and self._swap is None and not ({d.load, *d.evict} & busy):
            self._target, self._swap_models = d.load, frozenset({d.load, *d.evict})
            self._swap = asyncio.create_task(self._swap_in(d.load, d.evict, d.reason), name=f"swap-{d.load}")
            self._swap.add_done_callback(self._swap_done)
        self._expire_idle(views, busy)

    def _swap_done(self, task: asyncio.Task[None]) -> None:
        if task is self._swap:
            self._swap, self._swap_models, self._target = None, frozenset(), None
        if not task.cancelled() and task.exception() is not None:
            log.error("engine owner: swap task failed", exc_info=task.exception())
        self._kick.set()

    def _expire_idle(self, views: list[EngineView], busy: frozenset[str]) -> None:
        for v in views:
            engine = self.engines[v.name]
            if v.name not in busy and not v.draining and idle_expired(v, engine.spec.idle_ttl_s):
                log.info("model %s idle for %.0f s (ttl %.0f s): %s", v.name, v.idle_s, engine.spec.idle_ttl_s,
                         "sleeping" if self.launch.sleep_supported and engine.spec.sleep_level else "stopping")
                self.ops.run(v.name, self._evict(v.name))

    # --- the swap -----------------------------------------------------------------------------------

    async def _evict(self, name: str) -> None:
        engine = self.engines[name]
        level = engine.spec.sleep_level
        if self.launch.sleep_supported and level > 0 and engine.state in (EngineState.READY, EngineState.DRAINING):
            sleeping_weights = sum(e.plan.weights_gib for e in self.engines.values()
                                   if e.state is EngineState.SLEEPING and e.sleep_level == 1)
            if level == 1 and sleeping_weights + engine.plan.weights_gib > self.registry.gpu.host_ram_for_sleep_gib:
                level = 2
            await engine.sleep(level)
        else:
            await engine.stop()

    async def _swap_in(self, name: str, victims: tuple[str, ...], reason: str) -> None:
        engine = self.engines[name]
        kind = "wake" if engine.state is EngineState.SLEEPING else ("cold" if victims else "co_load")
        waiting = self.admission.queues[name]
        first = waiting[0].since if waiting else time.monotonic()
        causer = waiting[0].user if waiting else None
        log.info("swap: load %s (%s) evicting %s; reason: %s; %d waiting (oldest %.1f s); expected cost %.1f s",
                 name, kind, list(victims) or "nothing", reason, len(waiting), time.monotonic() - first,
                 engine.expected_wake_s() if kind == "wake" else engine.expected_start_s())
        t0 = time.monotonic()
        restart = engine.state is EngineState.FAILED
        starts = len(engine.start_seconds)
        try:
            engine.check_backoff()  # before evicting anyone for a model that may not start yet
            for v in victims:
                await self._evict(v)
            await engine.ensure_ready()
        except (CrashLoop, StartCancelled) as e:  # not a new start failure
            self.admission.fail_all(name, e)
            return
        except EngineError as e:
            self.events.start_failed(name, e)
            self.admission.fail_all(name, e)
            return
        except Exception as e:  # never leave waiters hanging on a bug
            log.exception("swap to %s failed", name)
            self.admission.fail_all(name, EngineError(
                f"model {name}: could not be made resident: {type(e).__name__}: {e}", model=name))
            return
        seconds = time.monotonic() - t0
        if kind == "wake" and len(engine.start_seconds) > starts:  # its wake was refused: a cold restart
            kind, restart = "cold", True
        if restart:
            self.events.restarted(name)
        await self._measure(engine)
        self.swaps.append(SwapRecord(time.time(), name, kind, victims, seconds, reason))
        del self.swaps[:-1000]
        self.events.swapped(name, kind, seconds, reason)
        if causer is not None:
            self.events.swap_caused(name, causer)
        if engine.state is EngineState.READY:  # not stopped meanwhile (an unload, a lease)
            self.admission.admit_all(name)

    async def _measure(self, engine: Engine) -> None:
        """After a load, the engine's real GPU memory (NVML, its whole process tree) replaces the estimate."""
        if self.gpu_probe is None or engine.pid is None:
            return
        measured = await asyncio.to_thread(engine_gpu_bytes, self.gpu_probe, engine.pid)
        if measured <= 0:
            return
        gib = measured / 1024**3
        log.info("model %s measured at %.2f GiB on the GPU (planned %.2f GiB)", engine.name, gib,
                 engine.plan.total_gib)
        self.measured_gib[engine.name] = gib
        self.plan = plan_registry(self.registry, budget_gib=self._budget_override, measured_gib=self.measured_gib)
        for name, e in self.engines.items():
            e.plan = self.plan.model(name)
