"""The pure swap policy: starvation bound, pinning, co-residency, cheapest victim."""

from __future__ import annotations

from engines.scheduler import EngineView, decide, idle_expired
from engines.state import EngineState

R, S = EngineState.READY, EngineState.STOPPED


def sizes_fit(sizes: dict[str, float], budget: float):  # type: ignore[no-untyped-def]
    return lambda names: sum(sizes[n] for n in names) <= budget


def resident(name: str, **kw: object) -> EngineView:
    return EngineView(name=name, state=R, occupies_memory=True, **kw)  # type: ignore[arg-type]


def waiting(name: str, wait: float, n: int = 1, **kw: object) -> EngineView:
    return EngineView(name=name, state=S, queued=n, oldest_wait_s=wait, **kw)  # type: ignore[arg-type]


ALONE = sizes_fit({"a": 20, "b": 20, "c": 3, "d": 3}, 23)


def test_resident_model_admits_its_queue() -> None:
    d = decide([resident("a", queued=3)], fits=ALONE, max_wait_s=60)
    assert d.admit == {"a"} and d.load is None


def test_serve_resident_queue_before_swapping() -> None:
    views = [resident("a", queued=2, in_flight=1), waiting("b", wait=5)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load is None and d.drain == frozenset()
    assert d.admit == {"a"}
    assert "still have queued" in d.reason


def test_swap_once_resident_queue_is_empty_and_idle() -> None:
    views = [resident("a"), waiting("b", wait=1)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load == "b" and d.evict == ("a",)


def test_drain_before_evicting_busy_victim() -> None:
    views = [resident("a", in_flight=2), waiting("b", wait=1)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load is None and d.drain == {"a"}
    assert "a" not in d.admit


def test_starvation_bound_preempts_a_busy_resident_queue() -> None:
    views = [resident("a", queued=50, in_flight=0), waiting("b", wait=61)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load == "b" and d.evict == ("a",)
    assert "a" not in d.admit  # the resident stops admitting once the bound is passed
    below = decide([resident("a", queued=50), waiting("b", wait=59)], fits=ALONE, max_wait_s=60)
    assert below.load is None and below.admit == {"a"}


def test_pinned_model_is_never_evicted() -> None:
    views = [resident("a", pinned=True), waiting("b", wait=1000)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load is None and "a" not in d.evict and not d.drain
    assert "pinned or busy" in d.reason


def test_co_residency_used_when_the_plan_allows() -> None:
    views = [resident("c", queued=1), waiting("d", wait=1)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load == "d" and d.evict == ()
    assert d.admit == {"c"}


def test_cheapest_victim_is_chosen() -> None:
    fits = sizes_fit({"x": 10, "y": 10, "z": 10}, 20)
    views = [
        resident("x", return_cost_s=90.0),
        resident("y", return_cost_s=2.0),
        waiting("z", wait=1),
    ]
    d = decide(views, fits=fits, max_wait_s=60)
    assert d.load == "z" and d.evict == ("y",)


def test_victims_with_queues_are_spared_when_another_makes_room() -> None:
    fits = sizes_fit({"x": 10, "y": 10, "z": 10}, 20)
    views = [resident("x", queued=3, return_cost_s=1.0), resident("y", return_cost_s=50.0), waiting("z", wait=1)]
    d = decide(views, fits=fits, max_wait_s=60)
    assert d.evict == ("y",) and d.admit == {"x"}


def test_oldest_waiting_model_goes_first() -> None:
    fits = sizes_fit({"a": 20, "b": 20, "c": 20}, 23)
    d = decide([waiting("b", wait=3), waiting("c", wait=9)], fits=fits, max_wait_s=60)
    assert d.load == "c"


def test_model_that_can_never_fit_is_blocked() -> None:
    fits = sizes_fit({"a": 5, "huge": 40}, 23)
    d = decide([waiting("huge", wait=1)], fits=fits, max_wait_s=60)
    assert d.blocked == "huge" and d.load is None


def test_starting_engine_is_not_evicted_mid_start() -> None:
    views = [EngineView(name="a", state=EngineState.STARTING, occupies_memory=True), waiting("b", wait=1)]
    d = decide(views, fits=ALONE, max_wait_s=60)
    assert d.load is None


def test_idle_ttl() -> None:
    v = resident("a", idle_s=301)
    assert idle_expired(v, 300)
    assert not idle_expired(v, None)
    assert not idle_expired(resident("a", idle_s=301, pinned=True), 300)
    assert not idle_expired(resident("a", idle_s=301, in_flight=1), 300)
