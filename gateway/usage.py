"""Usage that lasts: per user and model, requests, tokens, queue wait, swaps caused and engine-seconds.

Kept in SQLite in the run folder (``usage.sqlite3``), so a restart or a month does not reset it. The
request path only adds to counters in memory; a background task writes them in one transaction every
couple of seconds, in a thread, off the event loop (and once more at shutdown)::

    usage = Usage(run_dir / "usage.sqlite3", registry=metrics.registry, users=people.label_names)
    token = usage.begin("judge")                 # a request starts on the judge's engine
    usage.end("judge", token, user="alice", queue_wait_s=0.3)
    usage.tokens("judge", user="alice", prompt=12, completion=40)
    await usage.rows(since=time.time() - 86400)  # [{"user": "alice", "model": "judge", ...}]

**Engine-seconds** are the time an engine had requests in flight, shared among the requests in flight
at each moment: one request alone for 2 s is charged 2 s; two together for those 2 s, 1 s each. A
:class:`ShareClock` per model keeps the running integral of ``1 / in_flight``; a request is charged
its value at the end less its value at the start.

Rows are kept per hour, so ``since`` is exact to the hour.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from engines.pool import ADMIN, ANONYMOUS

log = logging.getLogger(__name__)

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "queue_wait_s", "engine_seconds", "swaps")
FLUSH_S = 2.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL, user TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, queue_wait_s REAL NOT NULL DEFAULT 0,
    engine_seconds REAL NOT NULL DEFAULT 0, swaps INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, user, model))
"""


class ShareClock:
    """The integral over time of ``1 / in_flight`` while anything is in flight, for one engine."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self.shared = 0.0
        self._at = clock()

    def _advance(self) -> float:
        now = self.clock()
        if self.in_flight:
            self.shared += (now - self._at) / self.in_flight
        self._at = now
        return self.shared

    def begin(self) -> float:
        mark = self._advance()
        self.in_flight += 1
        return mark

    def end(self, mark: float) -> float:
        """The engine-seconds of a request that began at ``mark``."""
        seconds = self._advance() - mark
        self.in_flight = max(0, self.in_flight - 1)
        return seconds


class UsageDb:
    """The SQLite file; every method runs in a worker thread (one at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)
        return self._conn

    def add(self, pending: dict[tuple[int, str, str], dict[str, float]]) -> None:
        if not pending:
            return
        cols = ", ".join(FIELDS)
        sets = ", ".join(f"{f} = {f} + excluded.{f}" for f in FIELDS)
        sql = (
            f"INSERT INTO usage (hour, user, model, {cols}) VALUES (?, ?, ?, {', '.join('?' * len(FIELDS))}) "
            f"ON CONFLICT (hour, user, model) DO UPDATE SET {sets}"
        )
        with self._lock:
            db = self._db()
            with db:
                db.executemany(sql, [(h, u, m, *(d.get(f, 0) for f in FIELDS)) for (h, u, m), d in pending.items()])

    def rows(self, since: float | None) -> list[dict[str, Any]]:
        hour = int(since // 3600) if since is not None else 0
        sums = ", ".join(f"SUM({f})" for f in FIELDS)
        with self._lock:
            cur = self._db().execute(
                f"SELECT user, model, {sums} FROM usage WHERE hour >= ? GROUP BY user, model ORDER BY user, model",
                (hour,),
            )
            out = []
            for user, model, *values in cur.fetchall():
                row: dict[str, Any] = {"user": user, "model": model}
                for f, v in zip(FIELDS, values, strict=True):
                    row[f] = round(float(v), 3) if f in ("queue_wait_s", "engine_seconds") else int(v)
                out.append(row)
            return out

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class UserMetrics:
    """Prometheus counters with a ``user`` label, whose values are the users file's names (plus anonymous
    and admin): any other name is counted as ``other``, so the label stays bounded."""

    def __init__(self, registry: CollectorRegistry, users: Callable[[], list[str]]) -> None:
        self.users = users
        labels = ["user", "model"]
        self.requests = Counter(
            "onecard_user_requests", "Requests sent to an engine, by user.", labels, registry=registry
        )
        self.prompt_tokens = Counter("onecard_user_prompt_tokens", "Prompt tokens, by user.", labels, registry=registry)
        self.completion_tokens = Counter(
            "onecard_user_completion_tokens", "Completion tokens, by user.", labels, registry=registry
        )
        self.queue_wait = Counter(
            "onecard_user_queue_wait_seconds", "Seconds waited in queues, by user.", labels, registry=registry
        )
        self.engine_seconds = Counter(
            "onecard_user_engine_seconds",
            "Engine time, shared among the requests in flight, by user.",
            labels,
            registry=registry,
        )
        self.swaps = Counter("onecard_user_swaps", "Swaps a user's request caused.", labels, registry=registry)
        self._children: dict[tuple[Counter, str, str], Any] = {}

    def label(self, user: str) -> str:
        return user if user in (ANONYMOUS, ADMIN) or user in self.users() else "other"

    def child(self, counter: Counter, user: str, model: str) -> Any:
        """``counter.labels(self.label(user), model)``, bound once per user label and model (made on first
        use, as ``labels()`` would make it)."""
        label = self.label(user)
        key = (counter, label, model)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(label, model)
        return found


class Usage:
    def __init__(
        self,
        path: Path,
        *,
        registry: CollectorRegistry,
        users: Callable[[], list[str]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.db = UsageDb(path)
        self.metrics = UserMetrics(registry, users)
        self.clock = clock
        self.wall = wall
        self.clocks: dict[str, ShareClock] = {}
        self.pending: dict[tuple[int, str, str], dict[str, float]] = {}
        self._flushing = asyncio.Lock()

    def _add(self, user: str, model: str, **deltas: float) -> None:
        key = (int(self.wall() // 3600), user, model)
        row = self.pending.setdefault(key, {})
        for f, v in deltas.items():
            row[f] = row.get(f, 0) + v

    def begin(self, model: str) -> float:
        clock = self.clocks.get(model)
        if clock is None:
            clock = self.clocks[model] = ShareClock(self.clock)
        return clock.begin()

    def end(self, model: str, mark: float, *, user: str, queue_wait_s: float) -> None:
        """A request of ``user`` left ``model``'s engine: count it, its queue wait and its engine-seconds."""
        engine_s = self.clocks[model].end(mark)
        self._add(user, model, requests=1, queue_wait_s=queue_wait_s, engine_seconds=engine_s)
        m = self.metrics
        m.child(m.requests, user, model).inc()
        m.child(m.queue_wait, user, model).inc(queue_wait_s)
        m.child(m.engine_seconds, user, model).inc(engine_s)

    def tokens(self, model: str, *, user: str, prompt: int, completion: int) -> None:
        self._add(user, model, prompt_tokens=prompt, completion_tokens=completion)
        m = self.metrics
        m.child(m.prompt_tokens, user, model).inc(prompt)
        m.child(m.completion_tokens, user, model).inc(completion)

    def swap(self, model: str, *, user: str) -> None:
        self._add(user, model, swaps=1)
        self.metrics.child(self.metrics.swaps, user, model).inc()

    async def flush(self) -> None:
        async with self._flushing:
            pending, self.pending = self.pending, {}
            try:
                await asyncio.to_thread(self.db.add, pending)
            except sqlite3.Error as e:  # a full or locked disk: keep the counts, try again next time
                log.warning("usage database %s: write failed (%s); retrying", self.db.path, e)
                for key, row in pending.items():
                    mine = self.pending.setdefault(key, {})
                    for f, v in row.items():
                        mine[f] = mine.get(f, 0) + v

    async def rows(self, since: float | None = None) -> list[dict[str, Any]]:
        await self.flush()
        return await asyncio.to_thread(self.db.rows, since)

    async def run(self) -> None:
        """Write what has been counted every :data:`FLUSH_S` seconds, until cancelled (:meth:`close` writes
        the rest)."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def close(self) -> None:
        await self.flush()
        await asyncio.to_thread(self.db.close)


#: The epoch seconds ``since`` may name: the years 1 to 9999, as ISO dates can.
SINCE_RANGE = (-62135596800.0, 253402300799.0)


def parse_since(text: str | None, *, now: float) -> float | None:
    """``since`` as epoch seconds: a number of seconds since the epoch, an ISO date or time (UTC unless it
    says), or a duration back from now (``90m``, ``24h``, ``7d``). ValueError says what it takes."""
    if text is None or not text.strip():
        return None
    when = _since(text, now=now)
    if not SINCE_RANGE[0] <= when <= SINCE_RANGE[1]:  # NaN fails this too
        raise ValueError(f"since={text[:40]!r} is out of range: it must fall in the years 1 to 9999")
    return when


def _since(text: str, *, now: float) -> float:
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if t[-1:] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"since={text[:40]!r}: give an ISO date or time (2026-12-01, 2026-12-01T09:00), "
            "epoch seconds, or a duration back from now (90m, 24h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
