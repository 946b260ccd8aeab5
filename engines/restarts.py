"""When may a failed engine start again? Backoff after a failure, and a crash loop that holds it failed.

A request pattern that kills an engine (a batch its vLLM build cannot run) kills it again after every
restart, because the client retries the same batch. So: after a failure the next start waits a backoff
(1 s, 2 s, 4 s, ...); ``loop_failures`` failures within ``loop_window_s`` are a crash loop, and the model
then stays ``failed`` for a hold (``loop_window_s``, doubled for each further loop in a row, at most
``max_hold_s``) instead of restarting in front of the same batch. Only failures after a loop count toward
the next one; an engine that ran for ``loop_window_s`` before it failed starts a new series.

::

    restarts = Restarts(RestartPolicy(), clock=time.monotonic)
    restarts.record(serving=True, cause="RuntimeError: ...", ready_for=12.0)   # it died while serving
    refusal = restarts.refusal()            # None, or why it may not start yet and for how long
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Failure", "LoopReport", "Refusal", "RestartPolicy", "Restarts"]


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff after failures, and what counts as a crash loop."""

    base_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    loop_failures: int = 3
    loop_window_s: float = 300.0
    max_hold_s: float = 3600.0
    stop_grace_s: float = 15.0
    drain_timeout_s: float = 30.0

    def backoff(self, failures: int) -> float:
        return 0.0 if failures == 0 else min(self.max_backoff_s, self.base_backoff_s * 2 ** (failures - 1))

    def hold(self, loops: int) -> float:
        """How long the ``loops``-th crash loop in a row keeps the model failed.

        >>> [RestartPolicy().hold(n) for n in (1, 2, 3, 5, 9)]
        [300.0, 600.0, 1200.0, 3600.0, 3600.0]
        """
        return min(self.max_hold_s, self.loop_window_s * 2.0 ** max(0, loops - 1))


class Failure(NamedTuple):
    at: float
    serving: bool  # it died while serving (else: it failed to start or to wake)
    cause: str


@dataclass(frozen=True)
class LoopReport:
    """A declared crash loop: how many failures in how long, of which kind, the last cause, the hold."""

    failures: int
    span_s: float
    serving: int
    cause: str
    hold_s: float
    loops: int

    def describe(self, model: str, remaining_s: float) -> str:
        how = (
            "it died while serving each time"
            if self.serving == self.failures
            else "it failed to start each time"
            if self.serving == 0
            else f"{self.serving} deaths while serving, {self.failures - self.serving} failed starts"
        )
        again = f", crash loop {self.loops} in a row" if self.loops > 1 else ""
        return (
            f"model {model} failed {self.failures} times in {self.span_s:.0f} s ({how}{again}): a crash loop, so it "
            f"stays failed and is not restarted for {remaining_s:.0f} s more; last failure: {self.cause}"
        )


class Refusal(NamedTuple):
    message: str
    retry_after: float


class Restarts:
    """The failure history of one engine and the decision it implies; the clock is injected."""

    def __init__(self, policy: RestartPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.failures: deque[Failure] = deque(maxlen=16)
        self.loops = 0  # crash loops in a row
        self.report: LoopReport | None = None
        self.held_until = 0.0
        self._counted_from = -float("inf")  # failures before this instant belong to a loop already declared

    def record(self, *, serving: bool, cause: str, ready_for: float | None = None) -> LoopReport | None:
        """Note a failure; returns the crash loop it completes, if it does. ``ready_for``: how long the
        engine had been ready when it died (an engine that ran for a whole window starts a new series)."""
        now = self.clock()
        if ready_for is not None and ready_for >= self.policy.loop_window_s:
            self.loops = 0
            self._counted_from = now
        self.failures.append(Failure(now, serving, cause))
        recent = self._recent(now)
        if len(recent) < self.policy.loop_failures:
            return None
        self.loops += 1
        hold = self.policy.hold(self.loops)
        self.held_until = now + hold
        self._counted_from = now + 1e-9
        self.report = LoopReport(
            len(recent), now - recent[0].at, sum(f.serving for f in recent), cause, hold, self.loops
        )
        return self.report

    def _recent(self, now: float) -> list[Failure]:
        return [f for f in self.failures if now - f.at <= self.policy.loop_window_s and f.at >= self._counted_from]

    def refusal(self, model: str) -> Refusal | None:
        """Why ``model`` may not start now, and for how long; None when it may."""
        now = self.clock()
        if self.report is not None and now < self.held_until:
            remaining = self.held_until - now
            return Refusal(self.report.describe(model, remaining), max(1.0, remaining))
        recent = self._recent(now)
        if not recent:
            return None
        wait = recent[-1].at + self.policy.backoff(len(recent)) - now
        if wait <= 0:
            return None
        return Refusal(
            f"model {model} failed {now - recent[-1].at:.1f} s ago and restarts after a backoff "
            f"({wait:.1f} s more); last failure: {recent[-1].cause}",
            max(1.0, wait),
        )
