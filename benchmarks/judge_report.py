"""The table and the aims of ``benchmarks.judge_loop``.

::

    print(table(runs, max_wait_s))
    judge_aims(runs, max_wait_s, WORKLOADS)   # {"ratios": {...}, "aims": {"no_errors": True, ...}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.judge_loop import Run


def table(runs: list[Run], max_wait_s: float) -> str:
    """One row per (policy, workload): requests, swaps against their floor, makespan and queue waits."""
    head = ("policy", "workload", "requests", "swaps", "floor", "makespan", "p50 wait", "p99 wait")
    rows = [head] + [
        (r.policy, r.workload, str(r.requests), str(r.swaps), str(r.floor), f"{r.makespan_s:.2f} s",
         f"{r.wait_p50_s:.3f} s", f"{r.wait_p99_s:.3f} s")
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"(wait: gateway queue wait per request, 0 when admitted at once; max_wait_s = {max_wait_s:g} s)")
    return "\n".join(lines)


def judge_aims(runs: list[Run], max_wait_s: float, workloads: Sequence[str]) -> dict[str, Any]:
    """The ratios of FIFO to the swap-aware policy per workload, and which aims the runs met."""
    by = {(r.policy, r.workload): r for r in runs}
    out: dict[str, Any] = {"ratios": {}, "aims": {}}
    for w in workloads:
        pol, fifo = by.get(("swap-aware", w)), by.get(("fifo", w))
        if pol and fifo:
            out["ratios"][w] = {
                "fifo_makespan_over_policy": round(fifo.makespan_s / pol.makespan_s, 3),
                "policy_swaps_over_floor": round(pol.swaps / pol.floor, 3),
                "fifo_swaps_over_floor": round(fifo.swaps / fifo.floor, 3),
                "fifo_swaps_per_request": round(fifo.swaps / max(1, fifo.requests), 3),
            }
    a, a_fifo, b = by.get(("swap-aware", "closed-loop")), by.get(("fifo", "closed-loop")), by.get(("swap-aware",
                                                                                                     "phases"))
    if a is not None:
        out["aims"]["a_swaps_within_10pct_of_floor"] = a.swaps <= 1.1 * a.floor
        out["aims"]["a_p99_wait_under_max_wait"] = a.wait_p99_s < max_wait_s
        if a_fifo is not None:
            out["aims"]["a_makespan_3x_shorter_than_fifo"] = a_fifo.makespan_s >= 3 * a.makespan_s
    if b is not None:
        out["aims"]["b_at_most_2_swaps"] = b.swaps <= 2
    c, c_fifo = by.get(("swap-aware", "pipelined")), by.get(("fifo", "pipelined"))
    if c is not None and c_fifo is not None:  # not an aim of the issue: where the policies differ
        out["aims"]["extra_c_makespan_3x_shorter_than_fifo"] = c_fifo.makespan_s >= 3 * c.makespan_s
    out["aims"]["no_errors"] = all(r.errors == 0 for r in runs)
    return out
