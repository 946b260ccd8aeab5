"""One model's engine: its state machine, its process, its start/stop/sleep/wake and LoRA adapters.

::

    engine = Engine(spec, plan=model_plan, launch=launch_cfg, client=client, state_file=state)
    await engine.ensure_ready()      # joins a start already in progress; wakes a sleeping engine
    engine.in_flight += 1 ... engine.release()
    await engine.stop()              # drain (bounded), SIGTERM the group, wait, SIGKILL

An engine that exits while serving goes to ``failed``; the next ``ensure_ready`` restarts it after a
backoff, and too many failures in a window is a crash loop that keeps it failed for a while
(``engines/restarts.py``). Every failure message carries vLLM's root-cause line (``engines/rootcause.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from engines.aio import settle
from engines.errors import CrashLoop, EngineCrashed, EngineError, EngineStartError, StartCancelled
from engines.fingerprint import AdapterReloadFailed, Fingerprints, WeightsMismatch, restore
from engines.leftovers import EngineRecord, StateFile
from engines.listener import free_port, port_owner
from engines.lora import LoadedAdapters
from engines.planner import ModelPlan
from engines.process import EngineProcess
from engines.registry import ModelSpec
from engines.restarts import RestartPolicy as RestartPolicy  # re-exported: the manager configures it
from engines.restarts import Restarts
from engines.rootcause import root_cause
from engines.state import EngineState, StateMachine, wait_event
from engines.vllm import LaunchConfig, NotReady, PortTaken, VllmApi, build_argv, build_env

log = logging.getLogger(__name__)


class Engine:
    """Supervises the vLLM process of one registry model."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        plan: ModelPlan,
        launch: LaunchConfig,
        client: httpx.AsyncClient,
        state_file: StateFile,
        policy: RestartPolicy | None = None,
        on_state: Callable[[str, EngineState, EngineState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.plan = plan
        self.launch = launch
        self.client = client
        self.state_file = state_file
        self.restarts = Restarts(policy or RestartPolicy(), clock=clock)  # backoff and crash-loop time
        self.sm = StateMachine(spec.name, [on_state] if on_state else None)
        self.process: EngineProcess | None = None
        self.port: int | None = None
        self.engine_id: str | None = None
        self.tmpdir: Path | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._start_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.lora = LoadedAdapters(spec.name)
        self.fingerprints = Fingerprints()
        self.failures = self.restarts.failures
        self.last_error: EngineError | None = None
        self.last_used = 0.0
        self.ready_since: float | None = None
        self.start_seconds: list[float] = []
        self.wake_seconds: list[float] = []
        self.sleep_level = 0
        self.vllm_version: str | None = None

    # --- views -----------------------------------------------------------------------------------

    @property
    def policy(self) -> RestartPolicy:
        return self.restarts.policy

    @policy.setter
    def policy(self, policy: RestartPolicy) -> None:
        self.restarts.policy = policy

    @property
    def state(self) -> EngineState:
        return self.sm.state

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> VllmApi:
        return VllmApi(self.client, self.base_url)

    @property
    def adapters(self) -> set[str]:
        """The LoRA adapters loaded in the running engine."""
        return self.lora.names

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, n: int = 20) -> tuple[str, ...]:
        return self.process.last_lines(n) if self.process else ()

    def failure_lines(self, n: int = 30) -> tuple[str, ...]:
        """The log lines that explain a failure (exception lines, then the last ``n``), for :func:`root_cause`."""
        return self.process.failure_lines(n) if self.process else ()

    def expected_start_s(self) -> float:
        """Measured mean start time (or a prior from the plan's size) for swap-cost decisions."""
        if self.start_seconds:
            return sum(self.start_seconds[-5:]) / len(self.start_seconds[-5:])
        return 20.0 + 2.0 * self.plan.weights_gib

    def expected_wake_s(self) -> float:
        if self.wake_seconds:
            return sum(self.wake_seconds[-5:]) / len(self.wake_seconds[-5:])
        return 1.0 + 0.2 * self.plan.weights_gib

    # --- in-flight accounting ----------------------------------------------------------------------

    def acquire(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        self.last_used = time.monotonic()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        return await wait_event(self._idle, timeout_s)

    # --- start -------------------------------------------------------------------------------------

    def check_backoff(self) -> None:
        """Raise :class:`CrashLoop` while a failed engine must not be started again yet."""
        refusal = self.restarts.refusal(self.name)
        if refusal is not None:
            tail = self.last_error.log_tail if self.last_error else ()
            raise CrashLoop(refusal.message, model=self.name, retry_after=refusal.retry_after, log_tail=tail)

    async def ensure_ready(self) -> None:
        """Make the engine ready: join a start in progress, wake it, or start it. An engine on its way
        down (stopping, or draining for sleep or stop) is waited for, on its state changes."""
        while True:
            state = self.state
            if state is EngineState.READY:
                return
            if self._start_task is not None and not self._start_task.done():
                await self._join_start()
            elif state is EngineState.SLEEPING:
                await self.wake()
            elif state in (EngineState.STOPPED, EngineState.FAILED):
                self.check_backoff()
                self._start_task = asyncio.create_task(self._start(state), name=f"start-{self.name}")
                await self._join_start()
            else:  # stopping or draining: wait for where it goes
                await self.sm.changed(60.0)

    async def _join_start(self) -> None:
        """Await the start in progress; a start cancelled by ``stop()`` is an error for its joiners."""
        assert self._start_task is not None
        try:
            await asyncio.shield(self._start_task)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we ourselves were cancelled
            raise StartCancelled(f"model {self.name}: its start was cancelled (the engine was stopped)",
                                 model=self.name) from None

    async def _start(self, expected: EngineState) -> None:
        self.sm.swap(expected, EngineState.STARTING)
        t0 = time.monotonic()
        attempts = 2
        for attempt in range(attempts):
            try:
                await self._launch_and_wait()
            except EngineStartError as e:
                port_clash = isinstance(e.__cause__, PortTaken) or any(
                    "address already in use" in line.lower() for line in e.log_tail)
                await self._cleanup_process()
                if port_clash and attempt + 1 < attempts:
                    log.warning("engine %s: port %s was taken; retrying on another port", self.name, self.port)
                    continue
                self._fail(e, expected=EngineState.STARTING)
                raise
            except Exception as e:  # a bug or an OS error: fail like any start failure, with backoff
                await self._cleanup_process()
                err = EngineStartError(f"model {self.name} failed to start: {type(e).__name__}: {e}",
                                       model=self.name, log_tail=self.failure_lines(30))
                self._fail(err, expected=EngineState.STARTING)
                raise err from e
            except BaseException:  # cancelled: by stop() (which has moved it to stopping), or at shutdown
                await self._cleanup_process()
                if self.state is EngineState.STARTING:
                    self.sm.swap(EngineState.STARTING, EngineState.FAILED)
                raise
            break
        elapsed = time.monotonic() - t0
        self.vllm_version = await self.api.version()
        self.start_seconds.append(elapsed)
        self.ready_since = time.monotonic()
        self.last_used = time.monotonic()
        self.sm.swap(EngineState.STARTING, EngineState.READY)
        assert self.process is not None
        self._watch_task = asyncio.create_task(self._watch(self.process), name=f"watch-{self.name}")
        if self.process.returncode is not None:  # it died as it became ready: the watch reports it
            await asyncio.sleep(0)
        log.info("engine %s ready in %.1f s on port %s", self.name, elapsed, self.port)

    async def _launch_and_wait(self) -> None:
        self.port = free_port()
        self.engine_id = uuid.uuid4().hex[:12]
        run_dir = self.launch.run_dir
        # Short on purpose: vLLM puts ZMQ sockets here, and a socket path must fit in 107 bytes.
        self.tmpdir = tmpdir = Path(tempfile.gettempdir()) / f"onecard-{self.engine_id}"
        tmpdir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(self.launch, model=self.spec, plan=self.plan, port=self.port)
        env = build_env(self.launch, model=self.spec, engine_id=self.engine_id, tmpdir=tmpdir)
        self.process = proc = EngineProcess(self.name, argv, env=env, log_path=run_dir / "logs" / f"{self.name}.log")
        lora = self.spec.lora
        self.lora.preloaded({n: self.launch.registry.locate(ad.path) for n, ad in lora.adapters.items()
                             if ad.preload and lora.enabled})
        try:
            await proc.spawn()
        except OSError as e:
            raise EngineStartError(
                f"model {self.name}: cannot launch {argv[0]!r}: {e}", model=self.name, log_tail=proc.last_lines()
            ) from e
        assert proc.pid is not None
        self.state_file.add(
            EngineRecord(
                engine_id=self.engine_id,
                model=self.name,
                pid=proc.pid,
                pgid=proc.pid,
                port=self.port,
                started_at=time.time(),
                tmpdir=str(tmpdir),
            )
        )
        port, session = self.port, proc.pid
        try:
            await self.api.wait_ready(
                served_name=self.name,
                timeout_s=self.spec.start_timeout_s,
                alive=lambda: proc.returncode is None,
                owner=lambda: port_owner(port, session=session),
            )
            self.fingerprints = Fingerprints()  # what these weights answer, for proving later wakes
            await self.fingerprints.take(self.api, self.name)
        except PortTaken as e:
            proc.note(str(e))
            raise EngineStartError(f"model {self.name} failed to start: {e}", model=self.name,
                                   log_tail=proc.last_lines(30)) from e
        except (NotReady, TimeoutError) as e:
            if proc.returncode is not None or isinstance(e, NotReady):
                with contextlib.suppress(TimeoutError):  # let the drain catch the last lines
                    await asyncio.wait_for(proc.wait(), timeout=2.0)
            tail = proc.failure_lines(30)
            why = f"; cause: {root_cause(tail)}" if tail else ""
            raise EngineStartError(
                f"model {self.name} failed to start: {e}{why}", model=self.name, log_tail=tail
            ) from e

    def _fail(self, err: EngineError, *, expected: EngineState, serving: bool = False) -> None:
        ready_for = time.monotonic() - self.ready_since if serving and self.ready_since is not None else None
        loop = self.restarts.record(serving=serving, cause=err.message, ready_for=ready_for)
        self.last_error = err
        if loop is not None:
            self.last_error = CrashLoop(loop.describe(self.name, loop.hold_s), model=self.name,
                                        retry_after=loop.hold_s, log_tail=err.log_tail)
            log.error("%s", self.last_error.message)
        self.sm.swap(expected, EngineState.FAILED)

    async def _watch(self, proc: EngineProcess) -> None:
        rc = await proc.wait()
        serving = self.state
        if self.process is not proc or serving not in (EngineState.READY, EngineState.DRAINING, EngineState.SLEEPING):
            return
        tail = proc.failure_lines(30)
        err = EngineCrashed(
            f"model {self.name}: the engine exited (code {rc}) while serving"
            + (f"; cause: {root_cause(tail)}" if tail else ""),
            model=self.name,
            log_tail=tail,
        )
        log.error("%s", err.message)
        self._fail(err, expected=serving, serving=True)
        await self._cleanup_process()

    async def _cleanup_process(self) -> None:
        proc = self.process
        if proc is None:
            return
        await proc.terminate(grace_s=self.policy.stop_grace_s)
        if self.engine_id:
            self.state_file.remove(self.engine_id)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # --- stop, sleep, wake ------------------------------------------------------------------------

    async def stop(self, *, drain_timeout_s: float | None = None) -> None:
        """Drain in-flight requests (bounded), then terminate the process group."""
        async with self._lock:
            state = self.state
            if state is EngineState.STARTING:  # a stop, not a failure: starting -> stopping -> stopped
                self.sm.swap(EngineState.STARTING, EngineState.STOPPING)
                if self._start_task is not None:
                    self._start_task.cancel()
                    await settle(self._start_task, f"the start of {self.name}", logger=log)
                await self._cleanup_process()
                self.ready_since = None
                self.sm.swap(EngineState.STOPPING, EngineState.STOPPED)
                return
            if state is EngineState.STOPPED:
                return
            if state is EngineState.FAILED:
                await self._cleanup_process()
                self.sm.swap(EngineState.FAILED, EngineState.STOPPED)
                return
            if state is EngineState.READY:
                self.sm.swap(EngineState.READY, EngineState.DRAINING)
            self.sm.swap(EngineState.DRAINING if state is not EngineState.SLEEPING else state, EngineState.STOPPING)
            try:
                timeout = self.policy.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
                if not await self.drained(timeout):
                    log.warning("engine %s: %d request(s) still in flight after %.0f s; stopping anyway",
                                self.name, self.in_flight, timeout)
                if self._watch_task is not None:
                    self._watch_task.cancel()
                await self._cleanup_process()
            except BaseException:  # never left `stopping` with a live process: kill it, then report
                if self.process is not None:
                    self.process.signal_group(signal.SIGKILL)
                raise
            finally:
                self.sleep_level = 0
                self.ready_since = None
                self.sm.swap(EngineState.STOPPING, EngineState.STOPPED)

    async def sleep(self, level: int) -> None:
        """Drain (bounded), then put the engine to sleep at ``level``; an engine not ready is left alone."""
        async with self._lock:
            if self.state is EngineState.READY:
                self.sm.swap(EngineState.READY, EngineState.DRAINING)
            elif self.state is not EngineState.DRAINING:
                return
            await self.drained(self.policy.drain_timeout_s)
            if level >= 2 and self.launch.sleep_supported:  # adapters lose their weights too: note what they say
                for name in sorted(self.adapters):
                    try:
                        await self.fingerprints.take(self.api, name)
                    except (httpx.HTTPError, NotReady) as e:  # reloaded after the wake, but not proven
                        log.warning("engine %s: no fingerprint for adapter %s: %s", self.name, name, e)
                        self.fingerprints.forget(name)
            try:
                await self.api.sleep(level)
            except BaseException:
                if self.state is EngineState.DRAINING:  # still running: it serves again
                    self.sm.swap(EngineState.DRAINING, EngineState.READY)
                raise
            if self.state is not EngineState.DRAINING:  # it crashed meanwhile; the watch has said so
                return
            self.sleep_level = level
            self.sm.swap(EngineState.DRAINING, EngineState.SLEEPING)

    async def wake(self) -> None:
        """Wake and prove the weights (:mod:`engines.fingerprint`); an engine that answers differently than
        it did when it became ready is stopped, and the caller's ``ensure_ready`` starts it cold."""
        async with self._lock:
            if self.state is not EngineState.SLEEPING:
                return
            t0 = time.monotonic()
            discarded = self.sleep_level >= 2 and self.launch.sleep_supported
            try:
                adapters = self.lora.loaded_paths()
                await restore(self.api, discarded=discarded, adapters=adapters)
                await self.fingerprints.verify(self.api)  # also the wake's warm-up request
            except (WeightsMismatch, AdapterReloadFailed) as e:
                await self._discard(f"model {self.name}: wake from sleep level {self.sleep_level} refused: {e}; "
                                    "restarting it cold")
                return
            except (httpx.HTTPError, NotReady) as e:
                err = EngineError(f"model {self.name}: wake from sleep failed: {e}", model=self.name,
                                  log_tail=self.failure_lines(30))
                if self.state is EngineState.SLEEPING:  # else it died meanwhile and the watch has said so
                    self._fail(err, expected=EngineState.SLEEPING)
                await self._cleanup_process()
                raise err from e
            self.wake_seconds.append(time.monotonic() - t0)
            self.sleep_level = 0
            self.last_used = time.monotonic()
            self.sm.swap(EngineState.SLEEPING, EngineState.READY)

    async def _discard(self, why: str) -> None:
        """Stop a sleeping engine whose answers cannot be trusted; nothing is served from it."""
        log.error("%s", why)
        self.last_error = EngineError(why, model=self.name, log_tail=self.log_tail(30))
        self.sm.swap(EngineState.SLEEPING, EngineState.STOPPING)
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self._cleanup_process()
        self.sleep_level = 0
        self.ready_since = None
        self.sm.swap(EngineState.STOPPING, EngineState.STOPPED)

    # --- LoRA ---------------------------------------------------------------------------------------

    async def ensure_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter at runtime unless it is already loaded."""
        await self.lora.ensure(self.api, name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.lora.unload(self.api, name)
        self.fingerprints.forget(name)
