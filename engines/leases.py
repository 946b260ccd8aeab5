"""GPU leases: a training job borrows part (or all) of the card from the gateway for a while.

A lease reserves GiB of the plan's usable budget; the manager evicts what it must so that the
resident engines fit in what is left, and loads nothing that would not. The lease ends when it is
released, when its holder process exits (checked every tick), or when its holder stops proving it is
there: every lease has a TTL that heartbeats renew (``onecard lease`` sends them while its command
runs). A restart keeps a saved lease only while its holder lives and its TTL has not run out::

    lease = await pool.submit(GrantLease(gib=12, holder_pid=os.getpid(), label="train.py", ttl_s=60))
    await pool.submit(HeartbeatLease(lease.lease_id))    # every ttl_s / 3 or so
    await pool.submit(ReleaseLease(lease.lease_id))
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

#: How long a lease lasts without a heartbeat, unless its request says otherwise.
DEFAULT_TTL_S = 60.0
MIN_TTL_S = 1.0
MAX_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class Lease:
    lease_id: str
    gib: float
    holder_pid: int
    holder_started: float  # the holder's process create time: a recycled pid is not the holder
    label: str = ""
    granted_at: float = field(default_factory=time.time)
    evicted: tuple[str, ...] = ()
    ttl_s: float = DEFAULT_TTL_S
    expires_at: float = math.inf  # wall clock; each heartbeat moves it to now + ttl_s
    user: str = ""  # the gateway user who asked for it

    @classmethod
    def new(cls, *, gib: float, holder_pid: int, label: str, ttl_s: float = DEFAULT_TTL_S,
            now: float | None = None, user: str = "") -> Lease:
        try:
            started = psutil.Process(holder_pid).create_time()
        except psutil.Error:
            started = 0.0
        now = time.time() if now is None else now
        return cls(lease_id=uuid.uuid4().hex[:8], gib=gib, holder_pid=holder_pid, holder_started=started,
                   label=label, granted_at=now, ttl_s=ttl_s, expires_at=now + ttl_s, user=user)

    def holder_alive(self) -> bool:
        try:
            proc = psutil.Process(self.holder_pid)
            return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - self.holder_started) < 1.0
        except psutil.Error:
            return False

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def renewed(self, now: float) -> Lease:
        """This lease after a heartbeat at ``now``."""
        return dataclasses.replace(self, expires_at=now + self.ttl_s)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        d = asdict(self)
        d["id"] = d.pop("lease_id")
        d["pid"] = d["holder_pid"]
        d["state"] = "granted"
        d["evicted"] = list(self.evicted)
        d["expires_in_s"] = round(max(0.0, self.expires_at - now), 1)
        return d

    @classmethod
    def from_dict(cls, d: object) -> Lease:
        """A lease as saved by :meth:`as_dict`, checked field by field; ValueError says what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"not an object but {type(d).__name__}")

        def number(name: str, default: float | None = None) -> float:
            value = d.get(name, default)
            if value is None:
                raise ValueError(f"{name} is missing")
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ValueError(f"{name} is {value!r}, not a number")
            return float(value)

        lease_id, holder_pid = d.get("id"), d.get("holder_pid")
        if not isinstance(lease_id, str) or not lease_id:
            raise ValueError(f"id is {lease_id!r}, not a lease id")
        if isinstance(holder_pid, bool) or not isinstance(holder_pid, int) or holder_pid <= 0:
            raise ValueError(f"holder_pid is {holder_pid!r}, not a pid")
        gib = number("gib")
        if not 0 < gib < math.inf:
            raise ValueError(f"gib is {gib!r}, not a positive size")
        evicted = d.get("evicted", [])
        if not isinstance(evicted, list) or not all(isinstance(x, str) for x in evicted):
            raise ValueError("evicted is not a list of model names")
        ttl_s = number("ttl_s", DEFAULT_TTL_S)
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s is {ttl_s!r}, outside {MIN_TTL_S:g}..{MAX_TTL_S:g}")
        granted_at = number("granted_at", time.time())
        return cls(lease_id=lease_id, gib=gib, holder_pid=holder_pid, holder_started=number("holder_started"),
                   label=str(d.get("label", ""))[:200], granted_at=granted_at, evicted=tuple(evicted),
                   ttl_s=ttl_s, expires_at=number("expires_at", granted_at + ttl_s),
                   user=str(d.get("user", ""))[:64])


def restorable(saved: object, *, now: float) -> tuple[Lease | None, str]:
    """Whether a lease saved by an earlier run still holds after a restart, and why (for the log);
    ValueError when ``saved`` is not a valid lease record.

    Kept only while its holder lives and its TTL has not run out; a kept lease gets a fresh TTL from
    ``now`` so its holder can reach the new gateway."""
    if saved is None:
        return None, ""
    lease = Lease.from_dict(saved)  # ValueError: not a lease record
    if not lease.holder_alive():
        return None, f"lease {lease.lease_id} ended while the gateway was down (holder {lease.holder_pid} is gone)"
    if lease.expired(now):
        return None, (f"lease {lease.lease_id} ended while the gateway was down (no heartbeat for more than "
                      f"{lease.ttl_s:g} s)")
    return lease.renewed(now), (f"lease {lease.lease_id} ({lease.gib:g} GiB, pid {lease.holder_pid}) is still held: "
                                "keeping it")
