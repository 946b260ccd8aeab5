"""Backoff and crash loops, on a clock the test moves (``engines/restarts.py``)."""

from __future__ import annotations

import pytest

from engines.restarts import RestartPolicy, Restarts

CAUSE = "model m: the engine exited (code 0) while serving; cause: RuntimeError: einsum(): subscript b has size 7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def die(restarts: Restarts, clock: Clock, after_s: float, ready_for: float = 5.0) -> None:
    clock.now += after_s
    restarts.record(serving=True, cause=CAUSE, ready_for=ready_for)


def test_backoff_then_a_crash_loop_that_names_count_and_cause(clock: Clock) -> None:
    r = Restarts(RestartPolicy(), clock=clock)
    assert r.refusal("m") is None
    die(r, clock, 0)
    refusal = r.refusal("m")
    assert refusal is not None and "restarts after a backoff" in refusal.message and CAUSE in refusal.message
    clock.now += 1.0  # base_backoff_s
    assert r.refusal("m") is None
    die(r, clock, 20)
    clock.now += 1.9
    assert r.refusal("m") is not None  # second backoff: 2 s
    clock.now += 0.1
    assert r.refusal("m") is None
    die(r, clock, 20)
    refusal = r.refusal("m")
    assert refusal is not None
    assert refusal.message.startswith("model m failed 3 times in 43 s (it died while serving each time): a crash loop")
    assert "not restarted for 300 s more" in refusal.message and refusal.message.endswith(CAUSE)
    assert refusal.retry_after == 300
    clock.now += 299
    assert r.refusal("m") is not None
    clock.now += 1
    assert r.refusal("m") is None  # the hold is over: the next start may go


def test_the_same_batch_again_doubles_the_hold_and_a_healthy_run_forgives(clock: Clock) -> None:
    r = Restarts(RestartPolicy(), clock=clock)
    for _ in range(3):
        die(r, clock, 10)
    assert r.report is not None and r.report.loops == 1 and r.report.hold_s == 300
    clock.now += 300
    # Only failures after the loop count toward the next one: one more death is a backoff, not a loop.
    die(r, clock, 30)
    refusal = r.refusal("m")
    assert refusal is not None and "backoff" in refusal.message
    die(r, clock, 30)
    die(r, clock, 30)
    refusal = r.refusal("m")
    assert refusal is not None and "crash loop 2 in a row" in refusal.message and refusal.retry_after == 600
    clock.now += 600
    for _ in range(3):
        die(r, clock, 10)
    assert r.report.loops == 3 and r.report.hold_s == 1200
    clock.now += 1200
    for _ in range(3):  # 2400 s, then capped at max_hold_s
        for _ in range(3):
            die(r, clock, 10)
        clock.now = r.held_until
    assert r.report.loops == 6 and r.report.hold_s == 3600
    # An engine that served for a whole window before dying starts a new series.
    clock.now += 3600
    die(r, clock, 10, ready_for=400)
    die(r, clock, 10)
    die(r, clock, 10)
    assert r.report.loops == 1 and r.report.hold_s == 300


def test_start_failures_and_deaths_are_told_apart(clock: Clock) -> None:
    r = Restarts(RestartPolicy(loop_failures=3, base_backoff_s=0.1), clock=clock)
    r.record(serving=False, cause="model m failed to start: ...; cause: ValueError: No available memory")
    clock.now += 1
    r.record(serving=True, cause=CAUSE)
    clock.now += 1
    loop = r.record(serving=False, cause="model m failed to start: ...; cause: ValueError: No available memory")
    assert loop is not None and loop.serving == 1
    refusal = r.refusal("m")
    assert refusal is not None and "1 deaths while serving, 2 failed starts" in refusal.message
    assert "ValueError: No available memory" in refusal.message
