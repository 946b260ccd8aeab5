"""The gateway's record of the GPU lease: at most one, saved in the state file, ended by its TTL or its
holder's death. The owner task asks it what to do; the evictions a grant needs are the owner's.

Time is injected (``wall_clock``): a lease's expiry is wall-clock time, so it holds across restarts::

    book = LeaseBook(state_file, events, wall_clock=time.time)
    lease = book.check(usable_gib=22.0, budget_gib=24.0, headroom_gib=2.0, pinned={}, gib=12)  # or LeaseError
    book.grant(Lease.new(gib=12, holder_pid=pid, label="train.py", now=book.wall_clock()))
    book.due()        # the lease, with why it must end now (TTL run out, holder gone), or None
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from engines.errors import LeaseError
from engines.leases import DEFAULT_TTL_S, Lease, restorable
from engines.leftovers import StateFile

if TYPE_CHECKING:
    from engines.events import ManagerEvents

log = logging.getLogger(__name__)


class LeaseBook:
    def __init__(self, state_file: StateFile, events: ManagerEvents, *,
                 wall_clock: Callable[[], float]) -> None:
        self.state_file = state_file
        self.events = events
        self.wall_clock = wall_clock
        self.lease: Lease | None = None
        self.reserved_gib = 0.0
        self.ttl_s = DEFAULT_TTL_S
        self.granting = False  # reserved, its evictions still running
        self.freed = asyncio.Event()

    async def restore(self) -> None:
        """Keep a lease saved by an earlier run while its holder lives and its TTL has not run out."""
        saved = self.state_file.get_section("lease")
        try:
            lease, why = await asyncio.to_thread(restorable, saved, now=self.wall_clock())
        except ValueError as e:
            lease, why = None, ""
            log.warning("state file %s: the saved lease is dropped: %s", self.state_file.path, e)
        if why:
            log.info("%s", why)
        if lease is not None:
            self.lease, self.reserved_gib = lease, lease.gib
            self.state_file.set_section("lease", lease.as_dict())
        elif saved is not None:
            self.state_file.set_section("lease", None)

    @staticmethod
    def check(*, gib: float | None, usable_gib: float, budget_gib: float, headroom_gib: float,
              pinned: Mapping[str, float]) -> float:
        """The GiB a lease request gets, or LeaseError saying why it cannot be had; ``pinned``: the
        footprint of each loaded pinned model (never evicted)."""
        want = usable_gib if gib is None else gib
        if want <= 0:
            raise LeaseError("a lease needs a positive number of GiB")
        if want > usable_gib + 1e-9:
            raise LeaseError(f"{want:g} GiB is more than the card's usable {usable_gib:g} GiB "
                             f"(budget {budget_gib:g} - headroom {headroom_gib:g})")
        pinned_gib = sum(pinned.values())
        if pinned_gib + want > usable_gib + 1e-9:
            raise LeaseError(
                f"{want:g} GiB cannot be leased: pinned models {sorted(pinned)} hold {pinned_gib:.1f} GiB "
                f"of the {usable_gib:g} GiB usable, leaving {usable_gib - pinned_gib:.1f} GiB; ask for less or "
                "unpin them")
        return want

    def busy(self) -> LeaseError:
        assert self.lease is not None
        return LeaseError(f"lease {self.lease.lease_id} ({self.lease.gib:g} GiB, pid {self.lease.holder_pid}) "
                          "is active; retry later or pass --wait")

    def reserve(self, lease: Lease) -> None:
        """Hold ``lease``'s memory from now on (before its evictions, so nothing is loaded into it)."""
        self.lease, self.reserved_gib = lease, lease.gib
        self.granting = True
        self.freed.clear()

    def granted(self, evicted: tuple[str, ...]) -> Lease:
        """The reserved lease, its evictions done: saved, announced, its TTL running from now."""
        assert self.lease is not None
        self.granting = False
        lease = self.lease = dataclasses.replace(self.lease, evicted=evicted).renewed(self.wall_clock())
        self.state_file.set_section("lease", lease.as_dict())
        self.events.lease_changed(True, lease.gib)
        log.info("lease %s granted: %g GiB to pid %d (%s); evicted %s", lease.lease_id, lease.gib, lease.holder_pid,
                 lease.label or "-", list(evicted) or "nothing")
        return lease

    def release(self, lease_id: str, *, reason: str = "released") -> Lease:
        lease = self.lease
        if lease is None or lease.lease_id != lease_id:
            raise LeaseError(f"no active lease {lease_id[:64]!r}")
        self.lease = None
        self.reserved_gib = 0.0
        self.granting = False
        self.state_file.set_section("lease", None)
        self.freed.set()
        self.events.lease_changed(False, 0.0)
        log.info("lease %s ended (%s) after %.0f s", lease_id, reason, self.wall_clock() - lease.granted_at)
        return lease

    def heartbeat(self, lease_id: str) -> Lease:
        """The holder is still there: the lease lasts another ``ttl_s``."""
        lease = self.lease
        if lease is None or lease.lease_id != lease_id:
            raise LeaseError(f"no active lease {lease_id[:64]!r}")
        self.lease = lease = lease.renewed(self.wall_clock())
        self.state_file.set_section("lease", lease.as_dict())
        return lease

    async def due(self) -> tuple[Lease, str] | None:
        """The lease that must end now, and why: its TTL ran out, or its holder is gone."""
        lease = self.lease
        if lease is None or self.granting:  # its evictions run; its TTL starts once granted
            return None
        if lease.expired(self.wall_clock()):
            return lease, f"no heartbeat for {lease.ttl_s:g} s"
        if not await asyncio.to_thread(lease.holder_alive):
            return lease, f"holder pid {lease.holder_pid} is gone"
        return None
