"""Admission: who may send a request to which engine now, and the queues of those who wait.

A request for a ready engine, with nobody queued ahead who could go, takes a slot at once
(:meth:`Admission.try_acquire`). The others wait in their model's queue until the owner task admits
them (:meth:`Admission.admit_all`, one user at a time in turn) or fails them; a wait is bounded by
:func:`engines.scheduler.queue_bound_s`, not counting time its own model spends being made resident::

    adm = Admission(engines, shares=Shares(), events=ManagerEvents(), max_queue=256, max_wait_s=60,
                    becoming_resident=lambda model: False, kick=lambda: None)
    engine = adm.try_acquire("tiny", "ana") or await adm.wait("tiny", adm.enqueue("tiny", user="ana"))
    adm.release(engine, "ana")
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engines.deadlines import await_admission, queue_expired
from engines.errors import CapacityError, OnecardError, QueueFull, UserLimit
from engines.people import ANONYMOUS, UserClass
from engines.planner import Verdict
from engines.scheduler import EngineView, queue_bound_s
from engines.shares import Shares, class_waits
from engines.state import EngineState

if TYPE_CHECKING:
    from engines.engine import Engine
    from engines.events import ManagerEvents


@dataclass
class Waiter:
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)
    user: str = ANONYMOUS
    klass: str = UserClass.BATCH.value
    left: bool = False  # it gave up (see Admission.leave); a second leave changes nothing


class Admission:
    """The queues of every model and the in-flight slots of every engine."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        *,
        shares: Shares,
        events: ManagerEvents,
        max_queue: int,
        max_wait_s: float,
        becoming_resident: Callable[[str], bool],
        kick: Callable[[], None],
    ) -> None:
        self.engines = engines
        self.shares = shares
        self.events = events
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.becoming_resident = becoming_resident
        self.kick = kick
        self.queues: dict[str, deque[Waiter]] = {name: deque() for name in engines}

    def waiting(self) -> Iterator[Waiter]:
        return (w for queue in self.queues.values() for w in queue)

    def try_acquire(self, model: str, user: str = ANONYMOUS) -> Engine | None:
        """The fast path: a ready engine (not draining) with nobody who may go queued ahead, for a user
        under their in-flight limit."""
        engine = self.engines[model]
        if (
            engine.state is EngineState.READY
            and self.shares.may_start(user)
            and not any(self.shares.may_start(w.user) for w in self.queues[model])
        ):
            engine.acquire()
            self.shares.started(user)
            return engine
        return None

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
        limit = self.shares.queue_full(user, self.waiting())
        if limit is not None:
            raise UserLimit(f"user {user} already has {limit} requests waiting (their limit); retry later",
                            model=model, retry_after=self.expected_wait_s(model))
        w = Waiter(asyncio.get_running_loop().create_future(), user=user, klass=klass)
        q.append(w)
        self.events.queue_changed(model, len(q))
        self.kick()
        return w

    async def wait(self, model: str, waiter: Waiter) -> Engine:
        """Wait for the owner task to admit ``waiter``, at most :func:`queue_bound_s` (then CapacityError).
        Cancelled, it leaves the queue, or gives back a slot granted meanwhile."""
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
            await await_admission(waiter.future, since=waiter.since, bound_s=queue_bound_s(bound),
                                  becoming_resident=lambda: self.becoming_resident(model), expired=expired)
        except BaseException:
            self.leave(model, waiter)
            raise
        self.events.queue_waited(model, time.monotonic() - waiter.since)
        return engine

    def leave(self, model: str, waiter: Waiter) -> None:
        """``waiter`` gives up: out of the queue, or its slot given back if it was admitted meanwhile.
        Only the first call counts."""
        if waiter.left:
            return
        waiter.left = True
        q = self.queues[model]
        if waiter in q:
            q.remove(waiter)
            self.events.queue_changed(model, len(q))
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self.release(self.engines[model], waiter.user)

    def release(self, engine: Engine, user: str = ANONYMOUS) -> None:
        engine.release()
        self.shares.finished(user)
        # Waiters held by their user's limit may go; an idle engine may let a waiting swap or drain go on.
        # An idle ready engine with nobody waiting anywhere changes no decision (idle expiry is on ticks).
        if self.queues[engine.name] or (engine.in_flight == 0 and (
                engine.state is not EngineState.READY or any(self.queues.values()))):
            self.kick()

    def expected_wait_s(self, model: str) -> float:
        e = self.engines[model]
        cost = e.expected_wake_s() if e.state is EngineState.SLEEPING else e.expected_start_s()
        return max(1.0, round(cost + len(self.queues[model]) * 0.5, 1))

    def position(self, model: str, waiter: Waiter) -> int:
        """1 for the head of the queue; 0 once admitted (or failed)."""
        try:
            return list(self.queues[model]).index(waiter) + 1
        except ValueError:
            return 0

    def admit_all(self, name: str) -> None:
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

    def fail_all(self, name: str, err: OnecardError) -> None:
        q = self.queues[name]
        while q:
            w = q.popleft()
            if not w.future.done():
                w.future.set_exception(err)
        self.events.queue_changed(name, 0)

    def views(self, *, sleep_frees: bool, now: float | None = None) -> list[EngineView]:
        """What the pure policy sees. A draining engine is shown as a ready one that admits nobody;
        ``sleep_frees``: whether a sleeping engine gives its memory back (not on the CPU)."""
        now = time.monotonic() if now is None else now
        out = []
        for name, e in self.engines.items():
            q = self.queues[name]
            state = EngineState.READY if e.state is EngineState.DRAINING else e.state
            occupies = state in (EngineState.READY, EngineState.STARTING, EngineState.STOPPING) or (
                state is EngineState.SLEEPING and not sleep_frees)
            out.append(EngineView(
                name=name, state=state, in_flight=e.in_flight, queued=len(q),
                oldest_wait_s=(now - q[0].since) if q else 0.0, pinned=e.spec.pinned, occupies_memory=occupies,
                # what bringing it back would cost: a wake where eviction is a sleep, else a cold start
                return_cost_s=(e.expected_wake_s() if sleep_frees and e.spec.sleep_level > 0
                               else e.expected_start_s()),
                idle_s=(now - e.last_used) if e.in_flight == 0 else 0.0,
                draining=e.state is EngineState.DRAINING, class_waits=class_waits(q, now)))
        return out
