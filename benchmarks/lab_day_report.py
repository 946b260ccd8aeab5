"""The table and the timeline drawing of ``benchmarks.lab_day``.

::

    print(table(days))
    draw(days, scale, RESULTS / "lab_day.png", [p.name for p in PROFILES])   # needs matplotlib
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.lab_day import Day


def table(days: list[Day]) -> str:
    """One row per policy: batch makespan, chat TTFT, swaps, wakes, cold starts, idle card, lost."""
    head = (
        "policy",
        "batch makespan s",
        "chat TTFT p50",
        "p95",
        "max",
        "swaps",
        "wakes",
        "cold",
        "card idle s",
        "lost",
        "requests",
    )
    rows = [head] + [
        (
            d.policy,
            f"{d.batch_makespan_s:.0f}",
            f"{d.ttft_p50_s:.1f}",
            f"{d.ttft_p95_s:.1f}",
            f"{d.ttft_max_s:.1f}",
            str(d.swaps),
            str(d.wakes),
            str(d.cold_starts),
            f"{d.card_idle_s:.0f}",
            str(d.lost),
            str(d.requests),
        )
        for d in days
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    )


def draw(days: list[Day], scale: float, path: Path, models: Sequence[str]) -> None:
    """A timeline per policy: which of ``models`` is resident when, the swaps, and each chat's wait."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    fig, grid = plt.subplots(len(days), 1, figsize=(12, 2.6 * len(days)), sharex=True, squeeze=False)
    axes = [row[0] for row in grid]
    for ax, d in zip(axes, days, strict=True):
        for row, name in enumerate(names):
            spans: list[tuple[float, float]] = []
            for (t, resident, _), nxt in zip(d.timeline, d.timeline[1:], strict=False):
                if name in resident:
                    spans.append((t / scale / 60, (nxt[0] - t) / scale / 60))
            ax.broken_barh(spans, (row - 0.35, 0.7), color=f"C{row}")
        for t, _ in d.swap_times:
            ax.axvline(t / scale / 60, color="grey", lw=0.5, alpha=0.6)
        chat_rows = {name: i for i, name in enumerate(names)}
        xs = [ch.sent / scale / 60 for ch in d.chats if ch.ttft is not None]
        ys = [chat_rows[ch.model] + 0.45 for ch in d.chats if ch.ttft is not None]
        sizes = [8 + 4 * (ch.ttft or 0) / scale for ch in d.chats if ch.ttft is not None]
        ax.scatter(xs, ys, s=sizes, c="black", marker="v", label="chat (size: wait)")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(
            f"{d.policy}: makespan {d.batch_makespan_s:.0f} s, chat TTFT p95 {d.ttft_p95_s:.1f} s, "
            f"{d.swaps} swaps, {d.lost} lost",
            fontsize=9,
        )
    axes[-1].set_xlabel("lab time (minutes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
