"""The engine manager: all engines, their wait queues, and the one owner task that swaps them.

Requests for a resident model go straight through :meth:`EngineManager.slot`; the others wait in
their model's queue until the owner task, following :func:`engines.scheduler.decide`, has made
the model resident::

    manager = EngineManager(registry, client=client, run_dir=Path(".onecard"))
    await manager.start()
    async with manager.slot("judge") as engine:     # waits (bounded) while a swap happens
        ... send the request to engine.base_url ...
    await manager.close()                          # stops every engine
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from engines.adapters import FoundAdapter, scan_adapters
from engines.deadlines import await_admission, queue_expired
from engines.engine import Engine, RestartPolicy
from engines.errors import CapacityError, CrashLoop, EngineError, LeaseError, OnecardError, QueueFull, UserLimit
from engines.gpu import GpuProbe
from engines.leases import DEFAULT_TTL_S, Lease, restorable
from engines.leftovers import RunLock, StateFile
from engines.people import ANONYMOUS, UserClass
from engines.planner import Plan, Verdict, plan_registry
from engines.registry import Registry, Target
from engines.scheduler import POLICIES, EngineView, idle_expired, queue_bound_s, victims_for_room
from engines.shares import Shares, class_waits
from engines.state import EngineState, wait_event
from engines.vllm import LaunchConfig

log = logging.getLogger(__name__)


def engine_gpu_bytes(probe: GpuProbe, pid: int) -> int:
    """GPU memory held by a process and its descendants (vLLM's workers hold the weights), per NVML."""
    try:
        root = psutil.Process(pid)
        pids = {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.Error:
        return 0
    total = 0
    for reading in probe.read():
        for p, used in (reading.process_memory_bytes or {}).items():
            if p in pids:
                total += used
    return total


class ManagerEvents:
    """Hooks the gateway overrides to feed metrics; every method is a no-op here."""

    def state_changed(self, model: str, old: EngineState, new: EngineState) -> None: ...
    def swapped(self, model: str, kind: str, seconds: float, reason: str) -> None: ...
    def start_failed(self, model: str, error: EngineError) -> None: ...
    def queue_changed(self, model: str, depth: int) -> None: ...
    def queue_waited(self, model: str, seconds: float) -> None: ...
    def lease_changed(self, active: bool, gib: float) -> None: ...
    def restarted(self, model: str) -> None: ...
    def swap_caused(self, model: str, user: str) -> None: ...


@dataclass
class Waiter:
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)
    user: str = ANONYMOUS
    klass: str = UserClass.BATCH.value


@dataclass
class SwapRecord:
    at: float
    model: str
    kind: str
    evicted: tuple[str, ...]
    seconds: float
    reason: str


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
    ) -> None:
        self.registry = registry
        self.client = client
        self.run_dir = run_dir
        self.events = events or ManagerEvents()
        self.plan: Plan = plan_registry(registry, budget_gib=budget_gib)
        self._budget_override = budget_gib
        self.gpu_probe = gpu_probe
        self.measured_gib: dict[str, float] = {}
        self.platform = registry.gpu.platform
        self.launch = LaunchConfig(
            registry=registry,
            executable=executable or registry.vllm.executable,
            platform=self.platform,
            budget_gib=self.plan.budget_gib,
            run_dir=run_dir,
            card_total_gib=card_total_gib,
        )
        self.run_lock = RunLock(run_dir)
        self.state_file = StateFile(run_dir / "state" / "engines.json")
        self.engines: dict[str, Engine] = {
            m.name: Engine(
                m,
                plan=self.plan.model(m.name),
                launch=self.launch,
                client=client,
                state_file=self.state_file,
                policy=restart,
                on_state=self.events.state_changed,
            )
            for m in registry.models
        }
        self.queues: dict[str, deque[Waiter]] = {name: deque() for name in self.engines}
        self.draining: frozenset[str] = frozenset()
        self.reserved_gib = 0.0
        self.swaps: list[SwapRecord] = []
        self.last_reason = ""
        self.max_wait_s = registry.scheduler.max_wait_s
        self.max_queue = registry.scheduler.max_queue
        self.policy = POLICIES[registry.scheduler.policy]
        #: Each request class's wait bound in the swap policy: interactive requests force a swap sooner.
        self.wait_bounds = {UserClass.BATCH.value: self.max_wait_s, UserClass.INTERACTIVE.value: min(
            self.max_wait_s, registry.scheduler.interactive_max_wait_s)}
        self.shares = Shares()
        self._tick_s = tick_s
        self._kick = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._preload: list[asyncio.Task[None]] = []
        self._evicting: set[str] = set()
        self._swapping: str | None = None  # the model the owner task is making resident
        self._swap_lock = asyncio.Lock()
        self.lease: Lease | None = None
        self.lease_ttl_s = DEFAULT_TTL_S
        self.wall_clock = time.time  # lease expiry is wall-clock time: it must hold across restarts
        self._lease_freed = asyncio.Event()
        self.discovered: dict[str, FoundAdapter] = {}
        self.adapter_problems: dict[str, str] = {}
        self.adapter_scan_s = 2.0

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
        saved = self.state_file.get_section("lease")
        try:
            lease, why = await asyncio.to_thread(restorable, saved, now=self.wall_clock())
        except ValueError as e:
            lease, why = None, ""
            log.warning("state file %s: the saved lease is dropped: %s", self.state_file.path, e)
        if why:
            log.info("%s", why)
        if lease is not None:
            self.lease, self.reserved_gib = lease, lease.gib
            self.state_file.set_section("lease", lease.as_dict())
        elif saved is not None:
            self.state_file.set_section("lease", None)
        try:
            await self.rescan_adapters()
        except Exception:  # discovery never stops start-up; the watcher retries
            log.exception("adapter scan failed")
        self._owner = asyncio.create_task(self._run(), name="engine-owner")
        for spec in self.registry.models:
            if spec.pinned:  # pinned models are meant to be there: load them now, not at first request
                self._preload.append(asyncio.create_task(self._load_logged(spec.name), name=f"preload-{spec.name}"))
        if any(m.lora.watch_dirs for m in self.registry.models):
            self._watcher = asyncio.create_task(self._watch_adapters(), name="adapter-watch")
        return killed

    async def _load_logged(self, model: str) -> None:
        try:
            await self.load(model)
        except OnecardError as e:
            log.error("pinned model %s could not be loaded: %s", model, e.message)

    async def close(self) -> None:
        for task in (*self._preload, self._owner, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name, q in self.queues.items():
            while q:
                w = q.popleft()
                if not w.future.done():
                    w.future.set_exception(CapacityError(f"the gateway is shutting down; {name} is unavailable",
                                                         model=name))
        await asyncio.gather(*(e.stop(drain_timeout_s=10) for e in self.engines.values()), return_exceptions=True)
        self.state_file.flush()
        self.run_lock.release()

    # --- the request path ---------------------------------------------------------------------------

    def resolve(self, name: str) -> Target | None:
        """A registry name, alias or adapter, else a discovered adapter, else None."""
        try:
            return self.registry.resolve(name)
        except KeyError:
            found = self.discovered.get(name)
            return Target(self.registry.model(found.base), name) if found else None

    def adapter_path(self, target: Target) -> str:
        assert target.adapter is not None
        found = self.discovered.get(target.adapter)
        if found is not None and target.adapter not in target.model.lora.adapters:
            return str(found.path)
        return self.registry.locate(target.model.lora.adapters[target.adapter].path)

    # --- adapter discovery --------------------------------------------------------------------------

    async def rescan_adapters(self) -> None:
        found, problems = await asyncio.to_thread(scan_adapters, self.registry)
        for name in found.keys() - self.discovered.keys():
            log.info("adapter %s discovered for %s at %s", name, found[name].base, found[name].path)
        for path, why in problems.items():
            if self.adapter_problems.get(path) != why:
                log.warning("adapter folder %s is not usable: %s", path, why)
        for name in self.discovered.keys() - found.keys():
            log.info("adapter %s is gone from disk", name)
            engine = self.engines[self.discovered[name].base]
            if name in engine.adapters and engine.state is EngineState.READY:
                with contextlib.suppress(Exception):
                    await engine.unload_adapter(name)
        self.discovered, self.adapter_problems = found, problems

    async def _watch_adapters(self) -> None:
        while True:
            await asyncio.sleep(self.adapter_scan_s)
            try:
                await self.rescan_adapters()
            except Exception:
                log.exception("adapter scan failed")

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[Engine]:
        """Hold one in-flight slot on ``model``'s engine, waiting for it to become resident."""
        engine = await self.acquire(model)
        try:
            yield engine
        finally:
            self.release(engine)

    def try_acquire(self, model: str, user: str = ANONYMOUS) -> Engine | None:
        """The fast path: a resident, admitting engine with nobody who may go queued ahead, for a user
        under their in-flight limit."""
        engine = self.engines[model]
        if (
            engine.state is EngineState.READY
            and model not in self.draining
            and model not in self._evicting
            and self.shares.may_start(user)
            and not any(self.shares.may_start(w.user) for w in self.queues[model])
        ):
            engine.acquire()
            self.shares.started(user)
            return engine
        return None

    async def acquire(self, model: str, user: str = ANONYMOUS) -> Engine:
        engine = self.try_acquire(model, user)
        if engine is not None:
            return engine
        waiter = self.enqueue(model, user=user)
        return await self.wait(model, waiter)

    def enqueue(self, model: str, *, user: str = ANONYMOUS, klass: str = UserClass.BATCH.value) -> Waiter:
        engine = self.engines[model]
        if engine.plan.verdict is Verdict.NEVER_FITS:
            raise CapacityError(f"model {model} can never fit on this GPU: {'; '.join(engine.plan.notes)}",
                                model=model, retry_after=3600)
        q = self.queues[model]
        if len(q) >= self.max_queue:
            raise QueueFull(
                f"model {model} already has {len(q)} requests waiting (limit {self.max_queue}); retry later",
                model=model,
                retry_after=self.expected_wait_s(model),
            )
        limit = self.shares.queue_full(user, (w for queue in self.queues.values() for w in queue))
        if limit is not None:
            raise UserLimit(f"user {user} already has {limit} requests waiting (their limit); retry later",
                            model=model, retry_after=self.expected_wait_s(model))
        w = Waiter(asyncio.get_running_loop().create_future(), user=user, klass=klass)
        q.append(w)
        self.events.queue_changed(model, len(q))
        self._kick.set()
        return w

    async def wait(self, model: str, waiter: Waiter) -> Engine:
        """Wait for the owner task to admit ``waiter``, at most :func:`queue_bound_s` (then CapacityError)."""
        engine = self.engines[model]
        bound = self.max_wait_s  # a class's own bound forces swaps sooner; every class is as patient

        def expired(waited: float) -> OnecardError:
            if engine.state is EngineState.READY and not self.shares.may_start(waiter.user):  # held by their limit
                return UserLimit(
                    f"user {waiter.user}: waited {waited:.1f} s behind their own {self.shares.limits.get(waiter.user)} "
                    f"request(s) in flight (their limit) for model {model}, past the bound of "
                    f"{queue_bound_s(bound):g} s; retry later", model=model, retry_after=max(1.0, bound))
            return queue_expired(model, waited, max_wait_s=bound, in_flight={
                n: e.in_flight for n, e in self.engines.items() if n != model and e.in_flight})

        try:
            await await_admission(
                waiter.future, since=waiter.since, bound_s=queue_bound_s(bound),
                becoming_resident=lambda: engine.state is EngineState.STARTING or self._swapping == model,
                expired=expired)
        except BaseException:
            q = self.queues[model]
            if waiter in q:
                q.remove(waiter)
                self.events.queue_changed(model, len(q))
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(self.engines[model], waiter.user)  # admitted as we were cancelled
            raise
        self.events.queue_waited(model, time.monotonic() - waiter.since)
        return self.engines[model]

    def release(self, engine: Engine, user: str = ANONYMOUS) -> None:
        engine.release()
        self.shares.finished(user)
        if engine.in_flight == 0 or self.queues[engine.name]:  # waiters held by their user's limit may go
            self._kick.set()

    def expected_wait_s(self, model: str) -> float:
        e = self.engines[model]
        cost = e.expected_wake_s() if e.state is EngineState.SLEEPING else e.expected_start_s()
        return max(1.0, round(cost + len(self.queues[model]) * 0.5, 1))

    def queue_position(self, model: str, waiter: Waiter) -> int:
        try:
            return list(self.queues[model]).index(waiter) + 1
        except ValueError:
            return 0

    # --- admin --------------------------------------------------------------------------------------

    async def load(self, model: str) -> None:
        """Make a model resident now (evicting as the policy would), via the queue."""
        async with self.slot(model):
            pass

    async def unload(self, model: str) -> None:
        await self.engines[model].stop()
        self._kick.set()

    async def sleep(self, model: str, level: int) -> None:
        engine = self.engines[model]
        if not self.launch.sleep_supported:
            log.info("sleep on %s: the platform has no sleep mode that frees memory; the engine keeps its "
                     "memory", model)
        await self._sleep(engine, level)

    def fits(self, names: frozenset[str]) -> bool:
        if not names:
            return True
        if self.reserved_gib <= 0:
            return self.plan.can_coreside(set(names))
        plans = [self.plan.model(n) for n in names]
        total = sum(p.resident_gib for p in plans)
        return self.plan.can_coreside(set(names)) and total <= self.plan.usable_gib - self.reserved_gib

    def kick(self) -> None:
        self._kick.set()

    # --- GPU leases ---------------------------------------------------------------------------------

    async def grant_lease(self, *, gib: float | None, holder_pid: int, label: str = "", wait: bool = False,
                          wait_timeout_s: float = 3600, ttl_s: float | None = None, user: str = "") -> Lease:
        """Reserve ``gib`` (default: all usable) for a process outside the gateway; evict what must go.
        The lease ends ``ttl_s`` (default :attr:`lease_ttl_s`) after the last heartbeat."""
        usable = self.plan.usable_gib
        want = usable if gib is None else gib
        if want <= 0:
            raise LeaseError("a lease needs a positive number of GiB")
        if want > usable + 1e-9:
            raise LeaseError(f"{want:g} GiB is more than the card's usable {usable:g} GiB "
                             f"(budget {self.plan.budget_gib:g} - headroom {self.plan.headroom_gib:g})")
        pinned = [e for e in self.engines.values() if e.spec.pinned and e.state is not EngineState.STOPPED]
        pinned_gib = sum(e.plan.resident_gib for e in pinned)
        if pinned_gib + want > usable + 1e-9:
            raise LeaseError(
                f"{want:g} GiB cannot be leased: pinned models {[e.name for e in pinned]} hold {pinned_gib:.1f} GiB "
                f"of the {usable:g} GiB usable, leaving {usable - pinned_gib:.1f} GiB; ask for less or unpin them")
        deadline = time.monotonic() + wait_timeout_s
        while self.lease is not None:
            if not wait:
                raise LeaseError(f"lease {self.lease.lease_id} ({self.lease.gib:g} GiB, pid {self.lease.holder_pid}) "
                                 "is active; retry later or pass --wait")
            self._lease_freed.clear()
            await wait_event(self._lease_freed, max(0.1, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                raise LeaseError("timed out waiting for the active lease to end")
        lease = Lease.new(gib=want, holder_pid=holder_pid, label=label, ttl_s=ttl_s or self.lease_ttl_s,
                          now=self.wall_clock(), user=user)
        async with self._swap_lock:
            if self.lease is not None:  # another lease was granted while this one waited for the lock
                raise LeaseError(f"lease {self.lease.lease_id} was granted first; retry after it ends")
            self.reserved_gib = want
            victims = victims_for_room(self.views(), self.fits)
            if victims is None:  # cannot happen after the pinned check, but never leave a half-granted lease
                self.reserved_gib = 0.0
                raise LeaseError("no set of unpinned engines frees enough memory for this lease")
            self.lease = lease
            for v in victims:
                log.info("lease %s: evicting %s to free memory", lease.lease_id, v)
                await self.engines[v].stop()
        lease = dataclasses.replace(lease, evicted=tuple(victims)).renewed(self.wall_clock())
        self.lease = lease
        self.state_file.set_section("lease", lease.as_dict())
        self.events.lease_changed(True, want)
        log.info("lease %s granted: %g GiB to pid %d (%s); evicted %s", lease.lease_id, want, holder_pid,
                 label or "-", list(victims) or "nothing")
        return lease

    async def release_lease(self, lease_id: str, *, reason: str = "released") -> Lease:
        lease = self.lease
        if lease is None or lease.lease_id != lease_id:
            raise LeaseError(f"no active lease {lease_id[:64]!r}")
        self.lease = None
        self.reserved_gib = 0.0
        self.state_file.set_section("lease", None)
        self._lease_freed.set()
        self.events.lease_changed(False, 0.0)
        log.info("lease %s ended (%s) after %.0f s", lease_id, reason, time.time() - lease.granted_at)
        self._kick.set()
        return lease

    async def heartbeat_lease(self, lease_id: str) -> Lease:
        """The holder is still there: the lease lasts another ``ttl_s``."""
        lease = self.lease
        if lease is None or lease.lease_id != lease_id:
            raise LeaseError(f"no active lease {lease_id[:64]!r}")
        self.lease = lease = lease.renewed(self.wall_clock())
        self.state_file.set_section("lease", lease.as_dict())
        return lease

    async def _check_lease_holder(self) -> None:
        if self.state_file.dirty:  # a failed write is retried here, once a tick
            await asyncio.to_thread(self.state_file.flush)
        lease = self.lease
        if lease is not None and lease.expired(self.wall_clock()):
            await self.release_lease(lease.lease_id, reason=f"no heartbeat for {lease.ttl_s:g} s")
        elif lease is not None and not await asyncio.to_thread(lease.holder_alive):
            await self.release_lease(lease.lease_id, reason=f"holder pid {lease.holder_pid} is gone")

    # --- the owner task -----------------------------------------------------------------------------

    def views(self, now: float | None = None) -> list[EngineView]:
        now = time.monotonic() if now is None else now
        out = []
        for name, e in self.engines.items():
            q = self.queues[name]
            occupies = e.state in (EngineState.READY, EngineState.STARTING, EngineState.STOPPING) or (
                e.state is EngineState.SLEEPING and not self.launch.sleep_supported
            )
            out.append(
                EngineView(
                    name=name,
                    state=e.state,
                    in_flight=e.in_flight,
                    queued=len(q),
                    oldest_wait_s=(now - q[0].since) if q else 0.0,
                    pinned=e.spec.pinned,
                    occupies_memory=occupies,
                    # what bringing it back would cost: a wake where eviction is a sleep, else a cold start
                    return_cost_s=(
                        e.expected_wake_s()
                        if self.launch.sleep_supported and e.spec.sleep_level > 0
                        else e.expected_start_s()
                    ),
                    idle_s=(now - e.last_used) if e.in_flight == 0 else 0.0,
                    draining=name in self.draining,
                    class_waits=class_waits(q, now),
                )
            )
        return out

    async def _run(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the manager is closing
                log.exception("engine owner: a step was cancelled from inside; carrying on")
            except Exception:
                log.exception("engine owner: step failed")
            await wait_event(self._kick, self._tick_s)

    async def step(self) -> None:
        """One decision, carried out."""
        await self._check_lease_holder()
        async with self._swap_lock:
            await self._step_locked()

    async def _step_locked(self) -> None:
        views = self.views()
        d = self.policy(views, fits=self.fits, max_wait_s=self.max_wait_s, wait_bounds=self.wait_bounds)
        self.draining = d.drain
        self.last_reason = d.reason
        for name in d.admit:
            self._admit_all(name)
        if d.blocked:
            leased = f"; {self.reserved_gib:g} GiB of the card are leased (lease {self.lease.lease_id})" if (
                self.lease) else ""
            self._fail_waiters(d.blocked, CapacityError(
                f"model {d.blocked} cannot be made resident now: {d.reason}{leased}",
                model=d.blocked, retry_after=60 if self.lease else 3600))
        if d.load is not None:
            self._swapping = d.load
            try:
                await self._swap_in(d.load, d.evict, d.reason)
            finally:
                self._swapping = None
            self._kick.set()
            return
        await self._expire_idle(views)

    def _admit_all(self, name: str) -> None:
        """Admit the model's waiters, one user at a time in turn, each up to their in-flight limit."""
        engine = self.engines[name]
        q = self.queues[name]
        admitted, kept = self.shares.take_turns([w for w in q if not w.future.done()])
        q.clear()
        q.extend(kept)
        for w in admitted:
            engine.acquire()
            w.future.set_result(None)
        self.events.queue_changed(name, len(q))

    def _fail_waiters(self, name: str, err: OnecardError) -> None:
        q = self.queues[name]
        while q:
            w = q.popleft()
            if not w.future.done():
                w.future.set_exception(err)
        self.events.queue_changed(name, 0)

    async def _evict(self, name: str) -> None:
        engine = self.engines[name]
        level = engine.spec.sleep_level
        if self.launch.sleep_supported and level > 0 and engine.state is EngineState.READY:
            if level == 1 and self._sleeping_weights_gib() + engine.plan.weights_gib > (
                self.registry.gpu.host_ram_for_sleep_gib
            ):
                level = 2
            await self._sleep(engine, level)
        else:
            await engine.stop()

    async def _sleep(self, engine: Engine, level: int) -> None:
        """Put an engine to sleep with no request slipping in meanwhile (the fast path is closed)."""
        self._evicting.add(engine.name)
        try:
            await engine.sleep(level)
        finally:
            self._evicting.discard(engine.name)
            self._kick.set()

    def _sleeping_weights_gib(self) -> float:
        return sum(e.plan.weights_gib for e in self.engines.values()
                   if e.state is EngineState.SLEEPING and e.sleep_level == 1)

    async def _swap_in(self, name: str, victims: tuple[str, ...], reason: str) -> None:
        engine = self.engines[name]
        kind = "wake" if engine.state is EngineState.SLEEPING else ("cold" if victims else "co_load")
        waiting = self.queues[name]
        first = waiting[0].since if waiting else time.monotonic()
        causer = waiting[0].user if waiting else None
        log.info(
            "swap: load %s (%s) evicting %s; reason: %s; %d waiting (oldest %.1f s); expected cost %.1f s",
            name, kind, list(victims) or "nothing", reason, len(waiting), time.monotonic() - first,
            engine.expected_wake_s() if kind == "wake" else engine.expected_start_s(),
        )
        t0 = time.monotonic()
        restart = engine.state is EngineState.FAILED
        starts = len(engine.start_seconds)
        try:
            engine.check_backoff()  # before evicting anyone for a model that may not start yet
            for v in victims:
                await self._evict(v)
            await engine.ensure_ready()
        except CrashLoop as e:
            self._fail_waiters(name, e)
            return
        except EngineError as e:
            self.events.start_failed(name, e)
            self._fail_waiters(name, e)
            return
        except Exception as e:  # never leave waiters hanging on a bug
            log.exception("swap to %s failed", name)
            err = EngineError(f"model {name}: could not be made resident: {type(e).__name__}: {e}", model=name)
            self._fail_waiters(name, err)
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
        self.draining = frozenset()
        self._admit_all(name)

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

    async def _expire_idle(self, views: list[EngineView]) -> None:
        for v in views:
            engine = self.engines[v.name]
            if idle_expired(v, engine.spec.idle_ttl_s):
                log.info("model %s idle for %.0f s (ttl %.0f s): %s", v.name, v.idle_s, engine.spec.idle_ttl_s,
                         "sleeping" if self.launch.sleep_supported and engine.spec.sleep_level else "stopping")
                await self._evict(v.name)

    # --- reporting ----------------------------------------------------------------------------------

    def engine_rows(self) -> list[dict[str, object]]:
        now = time.monotonic()
        rows: list[dict[str, object]] = []
        for name, e in self.engines.items():
            q = self.queues[name]
            rows.append(
                {
                    "model": name,
                    "state": e.state.value,
                    "pid": e.pid if e.state not in (EngineState.STOPPED,) else None,
                    "port": e.port if e.state not in (EngineState.STOPPED,) else None,
                    "uptime_s": round(now - e.ready_since, 1) if e.ready_since else None,
                    "in_flight": e.in_flight,
                    "queued": len(q),
                    "oldest_wait_s": round(now - q[0].since, 2) if q else None,
                    "draining": name in self.draining,
                    "footprint_gib": round(e.plan.resident_gib, 2),
                    "verdict": e.plan.verdict.value,
                    "pinned": e.spec.pinned,
                    "adapters": sorted(e.adapters),
                    "last_error": e.last_error.message if e.last_error and e.state is EngineState.FAILED else None,
                    "start_seconds": [round(s, 2) for s in e.start_seconds[-5:]],
                    "wake_seconds": [round(s, 2) for s in e.wake_seconds[-5:]],
                }
            )
        return rows


