"""GPU leases: a training job borrows part (or all) of the card from the gateway for a while.

A lease reserves GiB of the plan's usable budget; the manager evicts what it must so that the
resident engines fit in what is left, and loads nothing that would not. The lease ends when its
holder process exits, when it is released, or when the holder dies (checked every tick)::

    lease = await manager.grant_lease(gib=12, holder_pid=os.getpid(), label="train.py")
    ...
    await manager.release_lease(lease.lease_id)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil


@dataclass(frozen=True)
class Lease:
    lease_id: str
    gib: float
    holder_pid: int
    holder_started: float  # the holder's process create time: a recycled pid is not the holder
    label: str = ""
    granted_at: float = field(default_factory=time.time)
    evicted: tuple[str, ...] = ()

    @classmethod
    def new(cls, *, gib: float, holder_pid: int, label: str) -> Lease:
        try:
            started = psutil.Process(holder_pid).create_time()
        except psutil.Error:
            started = 0.0
        return cls(lease_id=uuid.uuid4().hex[:8], gib=gib, holder_pid=holder_pid, holder_started=started,
                   label=label)

    def holder_alive(self) -> bool:
        try:
            proc = psutil.Process(self.holder_pid)
            return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - self.holder_started) < 1.0
        except psutil.Error:
            return False

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["id"] = d.pop("lease_id")
        d["pid"] = d["holder_pid"]
        d["state"] = "granted"
        d["evicted"] = list(self.evicted)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lease:
        return cls(lease_id=str(d["id"]), gib=float(d["gib"]), holder_pid=int(d["holder_pid"]),
                   holder_started=float(d["holder_started"]), label=str(d.get("label", "")),
                   granted_at=float(d.get("granted_at", time.time())), evicted=tuple(d.get("evicted", ())))
