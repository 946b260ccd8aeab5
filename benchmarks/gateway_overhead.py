"""Gateway overhead: the same client against the stand-in engine directly and through ``onecard serve``.

::

    .venv/bin/python -m benchmarks.gateway_overhead            # full run, about 20 s
    .venv/bin/python -m benchmarks.gateway_overhead --quick    # about 8 s

One run starts a stand-in engine (``tests.fakes.standin_engine``) directly and ``onecard serve`` as a
subprocess whose registry holds one model backed by the stand-in, makes that model resident, checks
that both routes answer alike, then measures each route with the same client code, alternating
direct and gateway rounds so that drift hits both alike:

1. latency: sequential non-stream chat requests (``max_tokens`` 16) on one keep-alive connection;
   median and p99 per route, and the gateway's added median and p99;
2. streaming throughput: 64 concurrent streams of 256 tokens each; SSE events (chunks) per second
   per route, and the ratio gateway / direct;
3. non-stream throughput: 64 concurrent workers sending back-to-back requests; requests per second
   per route, and the ratio.

CPU layout (2 cores here): the client and both stand-in engines share one CPU, the gateway has the
other. Direct and gateway rounds therefore put exactly the same work on the client's CPU (same engine
code, same client code) and the gateway adds a hop that has a CPU of its own, as a gateway deployed
beside a GPU engine would. Direct rates are bounded by that one CPU; a ratio near 1.0 means the
gateway keeps up with an engine and client that together saturate a core. ``--cpus`` changes it.

Each phase also records the CPU time every process spent per unit of work, and what other processes
on the machine used meanwhile. From the former it derives a CPU-bound ratio (the rate the busiest CPU
set could sustain on each route, gateway / direct), which a shared machine disturbs less than rates.

It prints a table and writes ``benchmarks/results/gateway_overhead.json``. Aims (DESIGN §9): under
1 ms added median, under 5 ms added p99, at least 0.9 of direct streaming throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import (
    Connection,
    Processes,
    Response,
    affinity,
    available_cpus,
    close_all,
    free_port,
    http_json,
    machine_info,
    open_connections,
    percentile,
    pin,
    summarize,
    write_results,
)
from tests.support import standin_executable, standin_model, write_registry

MODEL = "bench"
PATH = b"/v1/chat/completions"
AIMS = {"added_median_ms": 1.0, "added_p99_ms": 5.0, "stream_ratio": 0.9}


@dataclass(frozen=True)
class Params:
    latency_n: int  # sequential requests per route
    latency_blocks: int  # alternating blocks they are split into
    latency_max_tokens: int
    streams: int  # concurrent streams
    stream_tokens: int
    stream_per_conn: int  # streams each connection runs back to back in one round
    stream_rounds: int  # rounds per route
    ns_concurrency: int
    ns_per_worker: int
    ns_rounds: int
    ns_max_tokens: int


FULL = Params(latency_n=3000, latency_blocks=10, latency_max_tokens=16, streams=64, stream_tokens=256,
              stream_per_conn=2, stream_rounds=5, ns_concurrency=64, ns_per_worker=40, ns_rounds=5,
              ns_max_tokens=16)
QUICK = Params(latency_n=600, latency_blocks=4, latency_max_tokens=16, streams=64, stream_tokens=256,
               stream_per_conn=1, stream_rounds=3, ns_concurrency=64, ns_per_worker=15, ns_rounds=3,
               ns_max_tokens=16)


def chat_body(max_tokens: int, *, stream: bool, content: str = "Tell me about gateways.") -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


@dataclass(frozen=True)
class Route:
    name: str  # "direct" or "gateway"
    host: str
    port: int


# --------------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def expect_ok(resp: Response, route: Route) -> None:
    if resp.status != 200:
        raise RuntimeError(f"{route.name}: HTTP {resp.status}: {resp.body[:300]!r}")


async def latency_block(route: Route, body: bytes, n: int, cpu_pids: dict[str, int]) -> dict[str, Any]:
    conn = await Connection.open(route.host, route.port)
    try:
        for _ in range(20):  # warm the connection (and the gateway's upstream connection)
            expect_ok(await conn.request(b"POST", PATH, body), route)
        out = []
        meter = CpuMeter(cpu_pids)
        t0 = time.perf_counter()
        for _ in range(n):
            r = await conn.request(b"POST", PATH, body)
            expect_ok(r, route)
            out.append(r.done_at - r.sent_at)
        return {"latencies": out, "cpu_s": meter.used(), "seconds": time.perf_counter() - t0}
    finally:
        conn.close()


async def concurrent_round(route: Route, body: bytes, workers: int, per_worker: int,
                           cpu_pids: dict[str, int]) -> dict[str, Any]:
    """``workers`` connections each send ``per_worker`` requests back to back; wall time of the lot."""
    conns = await open_connections(route.host, route.port, workers)
    events = 0
    first_bytes: list[float] = []

    async def worker(conn: Connection) -> None:
        nonlocal events
        for _ in range(per_worker):
            r = await conn.request(b"POST", PATH, body)
            expect_ok(r, route)
            events += r.events
            first_bytes.append(r.head_at - r.sent_at)

    try:
        meter = CpuMeter(cpu_pids)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - t0
        cpu = meter.used()
    finally:
        close_all(conns)
    n = workers * per_worker
    return {"requests": n, "events": events, "seconds": wall, "req_per_s": n / wall, "events_per_s": events / wall,
            "cpu_s": cpu, "first_byte_median_ms": percentile(first_bytes, 50) * 1e3}


async def alternate(
    routes: list[Route], rounds: int, one: Callable[[Route], Awaitable[Any]]
) -> dict[str, list[Any]]:
    """``rounds`` rounds per route, alternating (and flipping the order every other round)."""
    out: dict[str, list[Any]] = {r.name: [] for r in routes}
    for i in range(rounds):
        for route in routes if i % 2 == 0 else routes[::-1]:
            out[route.name].append(await one(route))
    return out


def check_alike(direct: Response, gateway: Response, what: str) -> None:
    """The gateway must return what the engine returns (ids and timestamps aside)."""
    def content(resp: Response) -> str:
        if resp.body.startswith(b"data: "):
            parts = []
            for ev in resp.body.split(b"\n\n"):
                if ev.startswith(b"data: {"):
                    for ch in orjson.loads(ev[6:]).get("choices") or []:
                        parts.append((ch.get("delta") or {}).get("content") or "")
            return "".join(parts)
        return str(orjson.loads(resp.body)["choices"][0]["message"]["content"])

    if direct.events != gateway.events or content(direct) != content(gateway):
        raise RuntimeError(f"{what}: the gateway's answer differs from the engine's "
                           f"({gateway.events} vs {direct.events} events)")


async def measure(routes: list[Route], p: Params, pids: dict[str, int], groups: dict[str, frozenset[int]],
                  log: Callable[[str], None]) -> dict[str, Any]:
    lat_body = chat_body(p.latency_max_tokens, stream=False)
    stream_body = chat_body(p.stream_tokens, stream=True)
    ns_body = chat_body(p.ns_max_tokens, stream=False)

    # Same answers both ways (also warms both routes).
    for body, what in ((lat_body, "non-stream"), (stream_body, "stream")):
        answers = []
        for route in routes:
            conn = await Connection.open(route.host, route.port)
            r = await conn.request(b"POST", PATH, body)
            conn.close()
            expect_ok(r, route)
            answers.append(r)
        check_alike(answers[0], answers[1], what)
    stream_events = answers[0].events

    results: dict[str, Any] = {}

    log(f"latency: {p.latency_n} sequential requests per route in {p.latency_blocks} alternating blocks")
    block = p.latency_n // p.latency_blocks
    lat_blocks = await alternate(routes, p.latency_blocks, lambda r: latency_block(r, lat_body, block, pids))
    lat = {name: [b["latencies"] for b in blocks] for name, blocks in lat_blocks.items()}
    lat_all = {name: [x for b in blocks for x in b] for name, blocks in lat.items()}
    ls = {name: summarize(v) for name, v in lat_all.items()}
    lat_cpu = {name: cpu_per_unit(blocks, block * len(blocks)) for name, blocks in lat_blocks.items()}
    results["latency"] = {
        "requests_per_route": len(lat_all["direct"]),
        "max_tokens": p.latency_max_tokens,
        "direct_ms": {k: (v * 1e3 if k != "n" else v) for k, v in ls["direct"].items()},
        "gateway_ms": {k: (v * 1e3 if k != "n" else v) for k, v in ls["gateway"].items()},
        "added_median_ms": (ls["gateway"]["median"] - ls["direct"]["median"]) * 1e3,
        "added_p99_ms": (ls["gateway"]["p99"] - ls["direct"]["p99"]) * 1e3,
        "block_medians_ms": {name: [percentile(b, 50) * 1e3 for b in blocks] for name, blocks in lat.items()},
        "cpu_us_per_request": {name: c["per_unit"] for name, c in lat_cpu.items()},
        "others_cpu_share": {name: c["others_share"] for name, c in lat_cpu.items()},
    }

    log(f"streaming: {p.streams} concurrent streams x {p.stream_tokens} tokens "
        f"({stream_events} events each), {p.stream_per_conn} per connection, {p.stream_rounds} rounds per route")
    st = await alternate(routes, p.stream_rounds,
                         lambda r: concurrent_round(r, stream_body, p.streams, p.stream_per_conn, pids))
    results["stream"] = summarize_rounds(st, "events_per_s", extra={
        "streams": p.streams, "tokens": p.stream_tokens, "events_per_stream": stream_events,
        "streams_per_connection": p.stream_per_conn}, groups=groups)

    log(f"non-stream throughput: {p.ns_concurrency} concurrent workers x {p.ns_per_worker} requests, "
        f"{p.ns_rounds} rounds per route")
    ns = await alternate(routes, p.ns_rounds,
                         lambda r: concurrent_round(r, ns_body, p.ns_concurrency, p.ns_per_worker, pids))
    results["nonstream"] = summarize_rounds(ns, "req_per_s", extra={
        "concurrency": p.ns_concurrency, "max_tokens": p.ns_max_tokens}, groups=groups)
    return results


def cpu_per_unit(rounds: list[dict[str, Any]], work: int) -> dict[str, Any]:
    """CPU microseconds per unit of work for each process (and for everything else on the machine)."""
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


def summarize_rounds(rounds: dict[str, list[dict[str, Any]]], key: str, extra: dict[str, Any],
                     groups: dict[str, frozenset[int]]) -> dict[str, Any]:
    """Median rate per route over its rounds, the ratio, CPU per unit of work and the CPU-bound ratio."""
    unit = "events" if key == "events_per_s" else "requests"
    out: dict[str, Any] = dict(extra)
    for name, rs in rounds.items():
        rates = [r[key] for r in rs]
        cpu = cpu_per_unit(rs, sum(r[unit] for r in rs))
        out[name] = {
            f"median_{key}": percentile(rates, 50),
            f"rounds_{key}": rates,
            "cpu_us_per_unit": cpu["per_unit"],
            "cpu_utilisation": cpu["utilisation"],
            "others_cpu_share": cpu["others_share"],
            "cpu_capacity_per_s": capacity(cpu["per_unit"], groups),
            "first_byte_median_ms": percentile([r["first_byte_median_ms"] for r in rs], 50),
        }
    out["ratio"] = out["gateway"][f"median_{key}"] / out["direct"][f"median_{key}"]
    out["cpu_capacity_ratio"] = out["gateway"]["cpu_capacity_per_s"] / out["direct"]["cpu_capacity_per_s"]
    out["unit"] = unit
    return out


# --------------------------------------------------------------------------------------------------
# Setup and report
# --------------------------------------------------------------------------------------------------


def parse_cpus(text: str) -> dict[str, set[int] | None]:
    """``client=0,engine=0,gateway=1`` (each a CPU list like ``0`` or ``0-1``) or ``none``."""
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
    cpus = available_cpus()
    if len(cpus) < 2:
        return {"client": None, "engine": None, "gateway": None}
    return {"client": {cpus[0]}, "engine": {cpus[0]}, "gateway": {cpus[1]}}


def report(res: dict[str, Any]) -> str:
    lat, st, ns = res["latency"], res["stream"], res["nonstream"]
    d, g = lat["direct_ms"], lat["gateway_ms"]

    def verdict(ok: bool) -> str:
        return "meets aim" if ok else "MISSES aim"

    rows = [
        ("", "direct", "gateway", "gateway - direct, or gateway / direct"),
        (f"latency median (ms, max_tokens {lat['max_tokens']})", f"{d['median']:.3f}", f"{g['median']:.3f}",
         f"+{lat['added_median_ms']:.3f} ms  ({verdict(lat['added_median_ms'] < AIMS['added_median_ms'])}: "
         f"< {AIMS['added_median_ms']:g} ms)"),
        ("latency p99 (ms)", f"{d['p99']:.3f}", f"{g['p99']:.3f}",
         f"+{lat['added_p99_ms']:.3f} ms  ({verdict(lat['added_p99_ms'] < AIMS['added_p99_ms'])}: "
         f"< {AIMS['added_p99_ms']:g} ms)"),
        (f"streaming chunks/s ({st['streams']} streams x {st['tokens']} tokens)",
         f"{st['direct']['median_events_per_s']:,.0f}", f"{st['gateway']['median_events_per_s']:,.0f}",
         f"{st['ratio']:.3f}x  ({verdict(st['ratio'] >= AIMS['stream_ratio'])}: >= {AIMS['stream_ratio']:g}x)"),
        (f"non-stream req/s ({ns['concurrency']} concurrent)", f"{ns['direct']['median_req_per_s']:,.0f}",
         f"{ns['gateway']['median_req_per_s']:,.0f}", f"{ns['ratio']:.3f}x"),
        ("gateway CPU per sequential request (us)", "",
         f"{lat['cpu_us_per_request']['gateway']['gateway']:.0f}", ""),
        ("gateway CPU per stream chunk (us)", "", f"{st['gateway']['cpu_us_per_unit']['gateway']:.1f}",
         f"CPU-bound ratio {st['cpu_capacity_ratio']:.3f}x"),
        ("gateway CPU per concurrent request (us)", "", f"{ns['gateway']['cpu_us_per_unit']['gateway']:.0f}",
         f"CPU-bound ratio {ns['cpu_capacity_ratio']:.3f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 3 else c for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    others = max([*lat["others_cpu_share"].values(), st["direct"]["others_cpu_share"],
                  st["gateway"]["others_cpu_share"], ns["direct"]["others_cpu_share"],
                  ns["gateway"]["others_cpu_share"]])
    if others > 0.05:
        lines.append(f"\nWARNING: other processes used up to {others:.0%} of the machine's CPU during a phase; "
                     "rates and tails are then unreliable (CPU per unit and CPU-bound ratios less so).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds (seconds, not a minute)")
    ap.add_argument("--cpus", type=parse_cpus, default=None,
                    help="pinning, e.g. client=0,engine=0,gateway=1 (default) or 'none'")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    cpus = args.cpus or default_cpus()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
            return asyncio.run(coro)
        return uvloop.run(coro)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onecard-bench-") as tmp, Processes(Path(tmp)) as procs:
        folder = Path(tmp)
        pin(0, cpus["client"])
        direct_port, gw_port = free_port(), free_port()
        log(f"pinning: client {sorted(cpus['client'] or [])}, engines {sorted(cpus['engine'] or [])}, "
            f"gateway {sorted(cpus['gateway'] or [])}")
        direct_engine = procs.standin(MODEL, direct_port, cpus=cpus["engine"])
        registry = write_registry(folder / "registry.yaml", [standin_model(MODEL)],
                                  executable=standin_executable(folder))
        gw = procs.gateway(registry, gw_port, folder / "run", cpus=cpus["gateway"])
        base = f"http://127.0.0.1:{gw_port}"
        http_json(f"{base}/admin/engines/{MODEL}/load", "POST")
        row = next(r for r in http_json(f"{base}/admin/engines")["engines"] if r["model"] == MODEL)
        gw_engine_pid = int(row["pid"])
        procs.extra_pids.append(gw_engine_pid)
        pin(gw_engine_pid, cpus["engine"])
        log(f"direct stand-in pid {direct_engine.pid} on :{direct_port}; gateway pid {gw.pid} on :{gw_port} "
            f"with its stand-in pid {gw_engine_pid} on :{row['port']}")
        layout = {"client": affinity(os.getpid()), "direct_engine": affinity(direct_engine.pid),
                  "gateway": affinity(gw.pid), "gateway_engine": affinity(gw_engine_pid)}
        pids = {"client": os.getpid(), "gateway": gw.pid, "direct_engine": direct_engine.pid,
                "gateway_engine": gw_engine_pid}
        routes = [Route("direct", "127.0.0.1", direct_port), Route("gateway", "127.0.0.1", gw_port)]
        try:
            groups = {name: frozenset(sel) for name, sel in layout.items()}
            res = run(measure(routes, p, pids, groups, log))
        except Exception:
            print(gw.log_tail(), file=sys.stderr)
            raise
        try:
            stats = http_json(f"http://127.0.0.1:{direct_port}/standin/stats")
        except OSError:
            stats = None

    out = {
        "benchmark": "gateway_overhead",
        "command": "python -m benchmarks.gateway_overhead" + (" --quick" if args.quick else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "cpu_layout": layout,
        "aims": AIMS,
        "params": p.__dict__,
        **res,
        "direct_engine_stats": stats,
        "meets_aims": {
            "added_median": res["latency"]["added_median_ms"] < AIMS["added_median_ms"],
            "added_p99": res["latency"]["added_p99_ms"] < AIMS["added_p99_ms"],
            "stream_ratio": res["stream"]["ratio"] >= AIMS["stream_ratio"],
        },
    }
    path = write_results("gateway_overhead", out) if args.out is None else args.out
    if args.out is not None:
        args.out.write_text(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(report(res))
    print(f"\nCPU layout: {layout}; {out['seconds']:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
