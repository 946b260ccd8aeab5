"""Where the gateway's CPU goes: a py-spy profile of ``onecard serve`` under ``benchmarks.gateway_overhead``.

::

    python -m benchmarks.profile_top record --phases stream --out benchmarks/results/profile_stream
    python -m benchmarks.profile_top top benchmarks/results/profile_stream.txt --per 33024

``record`` runs ``benchmarks.gateway_overhead --quick`` with the given phases and attaches py-spy
(``--py-spy``, default ``py-spy`` on the PATH; it is not one of the project's dependencies) to the
gateway process once it serves, writing collapsed stacks (``<out>.txt``) and, with ``--svg``, a flame
graph instead (py-spy writes one format per recording). ``top`` reads collapsed stacks and prints the
functions with the most samples, self and inclusive, as shares of all samples and, with ``--per N``
(the units of work in the run: requests or chunks) and ``--cpu-us`` (the gateway's CPU per unit that the
benchmark measured), as microseconds per unit. py-spy leaves out samples of an idle thread (waiting in
``epoll``), so the samples are of CPU time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

GATEWAY_PID = re.compile(r"gateway pid (\d+)")


def record(phases: str, out: Path, *, py_spy: str, svg: bool, rate: int) -> int:
    """Run the benchmark (quick) and profile its gateway; returns the benchmark's exit status."""
    bench = subprocess.Popen([sys.executable, "-m", "benchmarks.gateway_overhead", "--quick", "--phases", phases,
                              "--out", str(out.with_suffix(".json"))], stderr=subprocess.PIPE, text=True)
    assert bench.stderr is not None
    spy = None
    for line in bench.stderr:
        sys.stderr.write(line)
        found = GATEWAY_PID.search(line)
        if found and spy is None:
            fmt, path = ("flamegraph", out.with_suffix(".svg")) if svg else ("raw", out.with_suffix(".txt"))
            spy = subprocess.Popen([py_spy, "record", "-p", found.group(1), "-r", str(rate), "-f", fmt,
                                    "-o", str(path), "--nonblocking"])
            time.sleep(0.5)
    code = bench.wait()
    if spy is not None:
        spy.wait(60)
    return code


def frame_name(frame: str) -> str:
    """``handle (gateway/api/openai.py:95)`` -> ``handle (gateway/api/openai.py)``: functions, not lines."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def owner(frame: str) -> str:
    """Whose code a frame is: the project's own file (``gateway/proxy.py``), else the package
    (``aiohttp``, ``uvicorn``, ``asyncio``: the event loop's own work shows as ``asyncio/runners.py``)."""
    found = re.search(r"\(([^():]+)(?::\d+)?\)$", frame)
    if found is None:
        return "?"
    path = found.group(1)
    if path.startswith(("gateway/", "engines/")):
        return path
    if path == "asyncio/runners.py":
        return "event loop (uvloop: I/O, callbacks)"
    return path.split("/", 1)[0] if "/" in path else path


def top(path: Path, *, n: int, per: int | None, cpu_us: float | None) -> str:
    self_count: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        total += count
        self_count[frames[-1]] += count
        owners[owner(frames[-1])] += count
        for name in set(frames):
            incl[name] += count
    if not total:
        return "no samples"

    def figure(count: int) -> str:
        share = count / total
        text = f"{share:6.1%}"
        if cpu_us is not None:
            text += f"  {share * cpu_us:7.1f} us"
        elif per:
            text += f"  {count / per:7.3f} samples/unit"
        return text

    lines = [f"{total} samples" + (f"; {cpu_us:g} us of gateway CPU per unit" if cpu_us is not None else "")]
    lines += ["", "self samples by whose code runs:"]
    lines += [f"  {figure(c)}  {name}" for name, c in owners.most_common(25)]
    for title, counts in (("self", self_count), ("inclusive", incl)):
        lines += ["", f"top {n} functions, {title}:"]
        lines += [f"  {figure(c)}  {name}" for name, c in counts.most_common(n)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_top", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="run gateway_overhead --quick under py-spy")
    rec.add_argument("--phases", default="latency,stream,nonstream,ttfc")
    rec.add_argument("--out", type=Path, required=True, help="path without suffix")
    rec.add_argument("--py-spy", default="py-spy")
    rec.add_argument("--svg", action="store_true", help="a flame graph instead of collapsed stacks")
    rec.add_argument("--rate", type=int, default=250, help="samples per second")
    tp = sub.add_parser("top", help="the top functions of collapsed stacks")
    tp.add_argument("path", type=Path)
    tp.add_argument("-n", type=int, default=30)
    tp.add_argument("--per", type=int, default=None)
    tp.add_argument("--cpu-us", type=float, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        return record(args.phases, args.out, py_spy=args.py_spy, svg=args.svg, rate=args.rate)
    print(top(args.path, n=args.n, per=args.per, cpu_us=args.cpu_us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
