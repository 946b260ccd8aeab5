"""The swap policy: a pure function of queues, resident engines, the plan, measured costs and the clock.

:func:`decide` never logs, sleeps or touches a process; the manager's one owner task calls it and
carries the decision out. That keeps every swap decision testable and replaceable::

    d = decide(views, fits=plan_fits, max_wait_s=60,    # views carry the waits, measured by the caller
               wait_bounds={"interactive": 15, "batch": 60})
    d.admit      # models whose waiting requests may go through now
    d.drain      # resident models that stop taking new requests because a swap is due
    d.load       # the model to make resident next (once the victims are idle)
    d.evict      # the victims, cheapest to bring back first

Rules, in order:
1. A resident model that is not being drained admits its waiters at once.
2. The waiting model whose request is most overdue is the candidate to load: each waiting request's
   wait is measured against its class's bound (``wait_bounds``, e.g. 15 s for a person chatting, the
   registry's ``max_wait_s`` for batch runs); with one class this is the oldest request.
3. If it fits beside what is resident (the plan says so), load it: co-residency, no eviction.
4. Otherwise evict the cheapest set of unpinned victims that makes room, but only once each victim's
   own queue is empty (serve the resident queue first), unless the candidate's oldest request has
   waited past its class's bound (no starvation). Victims are drained, then evicted when idle. So a
   chat request for a model that is not resident waits at most its bound plus the swap, even while
   a batch run keeps another model busy; the batch requests wait in their queue and continue after.
5. A queued request waits at most :func:`queue_bound_s` (its own model's start aside); then it is
   refused with Retry-After (``engines.deadlines``), so a long request on a victim delays it, but
   never without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engines.state import EngineState


@dataclass(frozen=True)
class EngineView:
    """What the policy may know about one engine."""

    name: str
    state: EngineState
    in_flight: int = 0
    queued: int = 0
    oldest_wait_s: float = 0.0
    pinned: bool = False
    occupies_memory: bool = False  # resident, or asleep on a platform where sleep frees nothing
    return_cost_s: float = 30.0  # expected seconds to bring it back if evicted
    idle_s: float = 0.0
    draining: bool = False
    #: The oldest wait per request class among the queued requests, e.g. (("interactive", 3.2),); empty:
    #: every waiter is of one class, and ``oldest_wait_s`` is measured against ``max_wait_s``.
    class_waits: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Decision:
    admit: frozenset[str] = frozenset()
    drain: frozenset[str] = frozenset()
    load: str | None = None
    evict: tuple[str, ...] = ()
    reason: str = ""
    blocked: str | None = None  # a waiting model that can never be made resident, with why in reason


Fits = Callable[[frozenset[str]], bool]


def overdue(view: EngineView, max_wait_s: float, wait_bounds: Mapping[str, float] | None) -> tuple[float, str]:
    """How far the most pressing waiter of ``view`` is along its bound (1.0: at its bound), and its class."""
    if not view.class_waits or not wait_bounds:
        return view.oldest_wait_s / max_wait_s, ""
    return max((wait / wait_bounds.get(klass, max_wait_s), klass) for klass, wait in view.class_waits)


def decide(views: Sequence[EngineView], *, fits: Fits, max_wait_s: float,
           wait_bounds: Mapping[str, float] | None = None) -> Decision:
    """The next step for the owner task. ``fits(names)`` says whether a set can be resident together;
    ``wait_bounds`` gives the bound of each request class (default: ``max_wait_s`` for all)."""
    by_name = {v.name: v for v in views}
    occupying = frozenset(v.name for v in views if v.occupies_memory)
    admit = frozenset(v.name for v in views if v.state is EngineState.READY and v.queued and not v.draining)
    waiting = sorted(
        (v for v in views if v.queued and v.state is not EngineState.READY and v.state is not EngineState.STARTING),
        key=lambda v: (-overdue(v, max_wait_s, wait_bounds)[0], -v.oldest_wait_s),
    )
    # A model that is ready but draining has waiters too: they wait for the swap to finish.
    if not waiting:
        return Decision(admit=admit, reason="nothing to load")
    cand = waiting[0]
    if fits(occupying | {cand.name}):
        return Decision(admit=admit, load=cand.name, reason=f"{cand.name} fits beside {sorted(occupying) or 'nothing'}")
    pressure, klass = overdue(cand, max_wait_s, wait_bounds)
    starving = pressure >= 1.0
    bound = wait_bounds.get(klass, max_wait_s) if wait_bounds and klass else max_wait_s
    victims = _cheapest_victims(cand.name, [by_name[n] for n in occupying], fits, starving=starving)
    if victims is None:
        if not fits(frozenset({cand.name})):
            return Decision(admit=admit, blocked=cand.name, reason=f"{cand.name} cannot fit even alone")
        return Decision(admit=admit, reason=f"{cand.name} waits: no evictable set makes room (pinned or busy)")
    busy = [v for v in victims if by_name[v].queued and not starving]
    if busy:
        return Decision(admit=admit, reason=f"{cand.name} waits: {busy} still have queued requests")
    drain = frozenset(victims)
    admit = admit - drain
    reason = (
        f"{cand.name} waited {pressure * bound:.1f} s (bound {bound:g} s{f' for {klass}' if klass else ''})"
        if starving
        else f"{cand.name} waiting and {sorted(victims)} have no queue"
    )
    if any(by_name[v].in_flight or by_name[v].state is EngineState.STARTING for v in victims):
        return Decision(admit=admit, drain=drain, reason=reason + "; draining victims")
    return Decision(admit=admit, drain=drain, load=cand.name, evict=victims, reason=reason)


def decide_fifo(views: Sequence[EngineView], *, fits: Fits, max_wait_s: float,
                wait_bounds: Mapping[str, float] | None = None) -> Decision:
    """Naive first come, first served: the model of the oldest waiting request goes next, whatever the cost.

    A baseline for benchmarks (and what a plain queue in front of swapping engines does): a resident
    model stops admitting as soon as an older request waits for another model. Classes are ignored.
    """
    by_name = {v.name: v for v in views}
    occupying = frozenset(v.name for v in views if v.occupies_memory)
    waiting = sorted((v for v in views if v.queued), key=lambda v: -v.oldest_wait_s)
    if not waiting:
        return Decision(reason="nothing waits")
    head = waiting[0]
    if head.state is EngineState.READY and not head.draining:
        return Decision(admit=frozenset({head.name}), reason=f"{head.name} is first in line")
    if head.state is EngineState.STARTING:
        return Decision(reason=f"{head.name} is starting")
    if fits(occupying | {head.name}):
        return Decision(load=head.name, reason=f"{head.name} is first in line and fits")
    victims = _cheapest_victims(head.name, [by_name[n] for n in occupying], fits, starving=True)
    if victims is None:
        if not fits(frozenset({head.name})):
            return Decision(blocked=head.name, reason=f"{head.name} cannot fit even alone")
        return Decision(reason=f"{head.name} waits: no evictable set makes room")
    drain = frozenset(victims)
    if any(by_name[v].in_flight or by_name[v].state is EngineState.STARTING for v in victims):
        return Decision(drain=drain, reason=f"{head.name} is first in line; draining {sorted(victims)}")
    return Decision(drain=drain, load=head.name, evict=victims, reason=f"{head.name} is first in line")


POLICIES: dict[str, Callable[..., Decision]] = {"swap-aware": decide, "fifo": decide_fifo}


def victims_for_room(views: Sequence[EngineView], fits: Fits) -> tuple[str, ...] | None:
    """The fewest, cheapest unpinned engines to evict so the rest fit (a lease shrank the budget), or None."""
    occupying = [v for v in views if v.occupies_memory]
    return _cheapest_victims(None, occupying, fits, starving=True)


def _cheapest_victims(
    target: str | None, resident: list[EngineView], fits: Fits, *, starving: bool
) -> tuple[str, ...] | None:
    """Fewest, cheapest unpinned victims whose eviction lets ``target`` (if any) in, or None."""
    extra = frozenset({target}) if target else frozenset()
    candidates = [v for v in resident if not v.pinned and v.name != target]
    if not starving:
        # Prefer victims with nothing queued; a busy victim is only taken when starving.
        candidates.sort(key=lambda v: (v.queued > 0, v.in_flight > 0, v.return_cost_s, -v.idle_s))
    else:
        candidates.sort(key=lambda v: (v.return_cost_s, v.in_flight, -v.idle_s))
    keep = {v.name for v in resident}
    chosen: list[str] = []
    for v in candidates:
        if fits(frozenset(keep) | extra):
            break
        keep.discard(v.name)
        chosen.append(v.name)
    if not fits(frozenset(keep) | extra):
        return None
    # Drop victims that turned out unnecessary (a later, larger one made room on its own).
    for name in list(chosen):
        trial = frozenset(keep | {name}) | extra
        if fits(trial):
            keep.add(name)
            chosen.remove(name)
    return tuple(chosen)


def queue_bound_s(max_wait_s: float) -> float:
    """How long a queued request may wait before it is refused: ``max_wait_s`` until its swap is forced,
    and as long again for the resident models to finish what they are doing (they take nothing new)."""
    return 2.0 * max_wait_s


def idle_expired(view: EngineView, ttl_s: float | None) -> bool:
    """Whether an idle TTL says this engine should be put to sleep or stopped now."""
    return (
        ttl_s is not None
        and view.state is EngineState.READY
        and not view.pinned
        and view.in_flight == 0
        and view.queued == 0
        and view.idle_s >= ttl_s
    )
