"""CPU accounting and pinning for the benchmarks that measure CPU time per unit of work.

::

    meter = CpuMeter({"gateway": gw.pid, "client": os.getpid()})
    ...                                      # the work
    used = meter.used()                      # {"gateway": 0.41, "client": 0.12, "others": 0.02} seconds
    cpu_per_unit([round1, round2], 2000)     # microseconds per unit for each process, and more
    capacity({"gateway": 180.0, "client": 40.0}, {"gateway": frozenset({1}), "client": frozenset({0})})

CPU time comes from ``/proc/<pid>/stat`` (user + system, in clock ticks); what every other process
on the machine used meanwhile from ``/proc/stat`` less ours, so that a run on a shared machine can say
when it was disturbed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.common import available_cpus

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (all CPUs, from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


class CpuMeter:
    """CPU seconds used by our processes, and by everything else on the machine, since it was made."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {k: cpu_seconds(p) for k, p in pids.items()}
        self.machine_start = machine_busy_seconds()

    def used(self) -> dict[str, float]:
        ours = {k: cpu_seconds(p) - self.start[k] for k, p in self.pids.items()}
        ours["others"] = max(0.0, machine_busy_seconds() - self.machine_start - sum(ours.values()))
        return ours


def cpu_per_unit(rounds: list[dict[str, Any]], work: int) -> dict[str, Any]:
    """CPU microseconds per unit of work for each process (and for everything else on the machine),
    from rounds that each hold ``cpu_s`` (a :meth:`CpuMeter.used`) and ``seconds`` (wall time)."""
    cpu = {k: sum(r["cpu_s"][k] for r in rounds) for k in rounds[0]["cpu_s"]}
    wall = sum(r["seconds"] for r in rounds)
    ncpu = os.cpu_count() or 1
    return {"per_unit": {k: v / work * 1e6 for k, v in cpu.items()},
            "utilisation": {k: v / wall for k, v in cpu.items()},
            "others_share": cpu["others"] / (wall * ncpu)}


def capacity(per_unit: dict[str, float], groups: dict[str, frozenset[int]]) -> float:
    """Units per second the busiest CPU set could serve if nothing else ran: processes pinned to the
    same CPUs add up; the set with the most CPU time per unit (divided by its CPUs) bounds the rate."""
    load: dict[frozenset[int], float] = {}
    for name, cpus in groups.items():
        load[cpus] = load.get(cpus, 0.0) + per_unit.get(name, 0.0)
    worst = max(us / len(cpus) for cpus, us in load.items() if cpus)
    return 1e6 / worst if worst > 0 else float("inf")


def parse_cpus(text: str) -> dict[str, set[int] | None]:
    """``client=0,engine=0,gateway=1`` (each a CPU list like ``0``, ``0-1`` or ``0+2``) or ``none``."""
    roles = ("client", "engine", "gateway")
    if text == "none":
        return dict.fromkeys(roles)
    out: dict[str, set[int] | None] = dict.fromkeys(roles)
    for part in text.split(","):
        role, _, cpus = part.partition("=")
        if role not in roles:
            raise argparse.ArgumentTypeError(f"unknown role {role!r} (use {', '.join(roles)})")
        sel: set[int] = set()
        for piece in cpus.split("+"):
            lo, _, hi = piece.partition("-")
            sel.update(range(int(lo), int(hi or lo) + 1))
        out[role] = sel
    return out


def default_cpus() -> dict[str, set[int] | None]:
    """The client and the engines on the first CPU, the gateway on the second (nothing pinned on one CPU)."""
    cpus = available_cpus()
    if len(cpus) < 2:
        return {"client": None, "engine": None, "gateway": None}
    return {"client": {cpus[0]}, "engine": {cpus[0]}, "gateway": {cpus[1]}}
