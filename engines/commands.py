"""What may be asked of the engine owner: the admin actions and the GPU lease calls.

Each is a frozen value handed to :meth:`engines.pool.EnginePool.submit`; the owner task carries it out,
so one place decides every change of what is resident::

    await pool.submit(Unload("judge"))
    lease = await pool.submit(GrantLease(gib=12, holder_pid=pid, label="train.py"))
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """Make a model resident now (evicting as the policy would), through its queue like a request."""

    model: str


@dataclass(frozen=True)
class Wake:
    """Bring a sleeping model back (a load: it is woken, or started if it is not asleep)."""

    model: str


@dataclass(frozen=True)
class Unload:
    """Stop a model's engine (a start in progress is stopped too)."""

    model: str


@dataclass(frozen=True)
class Sleep:
    """Put a ready model to sleep at ``level`` (1 keeps weights in host RAM, 2 drops them)."""

    model: str
    level: int


@dataclass(frozen=True)
class GrantLease:
    """Reserve ``gib`` (None: all usable) of the card for process ``holder_pid``; evict what must go."""

    gib: float | None
    holder_pid: int
    label: str = ""
    wait: bool = False
    wait_timeout_s: float = 3600.0
    ttl_s: float | None = None
    user: str = ""


@dataclass(frozen=True)
class ReleaseLease:
    lease_id: str
    reason: str = "released"


@dataclass(frozen=True)
class HeartbeatLease:
    """The holder is still there: the lease lasts another ``ttl_s``."""

    lease_id: str


Command = Load | Wake | Unload | Sleep | GrantLease | ReleaseLease | HeartbeatLease
