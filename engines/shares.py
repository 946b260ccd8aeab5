"""Fair shares of the engines among the lab's people: in-flight limits per user, and turns.

A user's requests beyond their in-flight limit wait in the model's queue (their own part of it) and
are admitted as their earlier requests finish; when several users wait for one model they are
admitted in turn (round robin), so one harness with hundreds of requests queued cannot put a second
user at the back of its line::

    shares = Shares()
    shares.set_limits({"alice": 4})
    admitted, kept = shares.take_turns(queue)      # queue: Waiters, oldest first
    shares.started("alice") ... shares.finished("alice")

The order is a pure function of the queue and the users' counts (:func:`round_robin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar


class Queued(Protocol):
    @property
    def user(self) -> str: ...


class Timed(Protocol):
    @property
    def klass(self) -> str: ...
    @property
    def since(self) -> float: ...


W = TypeVar("W", bound=Queued)


def round_robin(waiters: Sequence[W], may_take: Callable[[str], bool]) -> tuple[list[W], list[W]]:
    """Admit ``waiters`` one per user in turn (users in the order of their oldest request); ``may_take(user)``
    says whether that user may have one more in flight now (and counts it when it says yes).
    Returns (admitted in order, kept in their original order)."""
    lines: dict[str, list[W]] = {}
    for w in waiters:
        lines.setdefault(w.user, []).append(w)
    admitted: list[W] = []
    kept_ids: set[int] = set()
    while lines:
        for user in list(lines):
            line = lines[user]
            if may_take(user):
                admitted.append(line.pop(0))
                if not line:
                    del lines[user]
            else:  # at their limit: the rest of their line waits
                kept_ids.update(id(w) for w in line)
                del lines[user]
    return admitted, [w for w in waiters if id(w) in kept_ids]


class Shares:
    """In-flight requests per user, against each user's limit (None: no limit)."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        self.queue_limits: dict[str, int] = {}

    def set_limits(self, in_flight: Mapping[str, int], queued: Mapping[str, int] | None = None) -> None:
        self.limits = dict(in_flight)
        self.queue_limits = dict(queued or {})

    def may_start(self, user: str) -> bool:
        limit = self.limits.get(user)
        return limit is None or self.in_flight.get(user, 0) < limit

    def started(self, user: str) -> None:
        self.in_flight[user] = self.in_flight.get(user, 0) + 1

    def finished(self, user: str) -> None:
        left = self.in_flight.get(user, 0) - 1
        if left > 0:
            self.in_flight[user] = left
        else:
            self.in_flight.pop(user, None)

    def take_turns(self, waiters: Sequence[W]) -> tuple[list[W], list[W]]:
        """:func:`round_robin` against the limits, counting each admitted request as started."""

        def take(user: str) -> bool:
            if self.may_start(user):
                self.started(user)
                return True
            return False

        return round_robin(waiters, take)

    def queue_full(self, user: str, queued: Iterable[Queued]) -> int | None:
        """The user's queue limit when ``queued`` already holds that many of theirs, else None."""
        limit = self.queue_limits.get(user)
        if limit is None:
            return None
        mine = sum(1 for w in queued if w.user == user)
        return limit if mine >= limit else None


def class_waits(queue: Iterable[Timed], now: float) -> tuple[tuple[str, float], ...]:
    """The oldest wait of each request class in ``queue`` (oldest first), for the swap policy's views."""
    oldest: dict[str, float] = {}
    for w in queue:
        oldest.setdefault(w.klass, now - w.since)
    return tuple(oldest.items())
