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
   per route, and the ratio;
4. time to first chunk: 64 streams started together on 64 open connections; per stream, the time
   from its request written to the first bytes of its body; the gateway's added median, p90 and
   slowest (``--phases`` runs a subset, e.g. ``--phases stream`` under a profiler).

CPU layout (2 cores here): the client and both stand-in engines share one CPU, the gateway has the
other. Direct and gateway rounds therefore put exactly the same work on the client's CPU (same engine
code, same client code) and the gateway adds a hop that has a CPU of its own, as a gateway deployed
beside a GPU engine would. Direct rates are bounded by that one CPU; a ratio near 1.0 means the
gateway keeps up with an engine and client that together saturate a core. ``--cpus`` changes it.

Each phase also records the CPU time every process spent per unit of work, and what other processes
on the machine used meanwhile. From the former it derives a CPU-bound ratio (the rate the busiest CPU
set could sustain on each route, gateway / direct), which a shared machine disturbs less than rates.

It prints a table and writes ``benchmarks/results/gateway_overhead.json``. Aims (:data:`AIMS`): at
most 0.3 ms added median and under 5 ms added p99; at 64 concurrent, at least 1.0x direct streaming
throughput and 0.6x non-stream; under 20 ms added median time to first chunk with 64 streams started
together; gateway CPU at most 200 us per request (sequential and 64 concurrent) and 8 us per
streamed chunk.
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
from benchmarks.cpu import CpuMeter, capacity, cpu_per_unit, default_cpus, parse_cpus
from benchmarks.overhead_report import AIMS, meets_aims, report
from tests.support import standin_executable, standin_model, write_registry

MODEL = "bench"
PATH = b"/v1/chat/completions"
PHASES = ("latency", "stream", "nonstream", "ttfc")


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
    ttfc_streams: int  # streams started together
    ttfc_tokens: int
    ttfc_rounds: int


FULL = Params(latency_n=3000, latency_blocks=10, latency_max_tokens=16, streams=64, stream_tokens=256,
              stream_per_conn=2, stream_rounds=5, ns_concurrency=64, ns_per_worker=40, ns_rounds=5,
              ns_max_tokens=16, ttfc_streams=64, ttfc_tokens=16, ttfc_rounds=10)
QUICK = Params(latency_n=600, latency_blocks=4, latency_max_tokens=16, streams=64, stream_tokens=256,
               stream_per_conn=1, stream_rounds=3, ns_concurrency=64, ns_per_worker=15, ns_rounds=3,
               ns_max_tokens=16, ttfc_streams=64, ttfc_tokens=16, ttfc_rounds=4)


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


async def burst_round(route: Route, body: bytes, n: int) -> list[float]:
    """``n`` streams started together, one per open connection: each one's seconds to its first chunk."""
    conns = await open_connections(route.host, route.port, n)
    try:
        responses = await asyncio.gather(*(c.request(b"POST", PATH, body) for c in conns))
    finally:
        close_all(conns)
    for r in responses:
        expect_ok(r, route)
    return [r.first_at - r.sent_at for r in responses]


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
                  log: Callable[[str], None], phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
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
    if "latency" in phases:
        results["latency"] = await measure_latency(routes, p, pids, lat_body, log)
    if "stream" in phases:
        log(f"streaming: {p.streams} concurrent streams x {p.stream_tokens} tokens "
            f"({stream_events} events each), {p.stream_per_conn} per connection, {p.stream_rounds} rounds per route")
        st = await alternate(routes, p.stream_rounds,
                             lambda r: concurrent_round(r, stream_body, p.streams, p.stream_per_conn, pids))
        results["stream"] = summarize_rounds(st, "events_per_s", extra={
            "streams": p.streams, "tokens": p.stream_tokens, "events_per_stream": stream_events,
            "streams_per_connection": p.stream_per_conn}, groups=groups)
    if "nonstream" in phases:
        log(f"non-stream throughput: {p.ns_concurrency} concurrent workers x {p.ns_per_worker} requests, "
            f"{p.ns_rounds} rounds per route")
        ns = await alternate(routes, p.ns_rounds,
                             lambda r: concurrent_round(r, ns_body, p.ns_concurrency, p.ns_per_worker, pids))
        results["nonstream"] = summarize_rounds(ns, "req_per_s", extra={
            "concurrency": p.ns_concurrency, "max_tokens": p.ns_max_tokens}, groups=groups)
    if "ttfc" in phases:
        log(f"time to first chunk: {p.ttfc_streams} streams started together, {p.ttfc_rounds} rounds per route")
        results["ttfc"] = await measure_ttfc(routes, p)
    return results


async def measure_latency(routes: list[Route], p: Params, pids: dict[str, int], lat_body: bytes,
                          log: Callable[[str], None]) -> dict[str, Any]:
    log(f"latency: {p.latency_n} sequential requests per route in {p.latency_blocks} alternating blocks")
    block = p.latency_n // p.latency_blocks
    lat_blocks = await alternate(routes, p.latency_blocks, lambda r: latency_block(r, lat_body, block, pids))
    lat = {name: [b["latencies"] for b in blocks] for name, blocks in lat_blocks.items()}
    lat_all = {name: [x for b in blocks for x in b] for name, blocks in lat.items()}
    ls = {name: summarize(v) for name, v in lat_all.items()}
    lat_cpu = {name: cpu_per_unit(blocks, block * len(blocks)) for name, blocks in lat_blocks.items()}
    return {
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


async def measure_ttfc(routes: list[Route], p: Params) -> dict[str, Any]:
    """Time to first chunk of streams started together: all streams of all rounds per route, and the
    slowest stream of each round (median over rounds)."""
    body = chat_body(p.ttfc_tokens, stream=True)
    for route in routes:  # one unrecorded burst each: the gateway's pool opens its engine connections
        await burst_round(route, body, p.ttfc_streams)
    rounds = await alternate(routes, p.ttfc_rounds, lambda r: burst_round(r, body, p.ttfc_streams))
    out: dict[str, Any] = {"streams": p.ttfc_streams, "tokens": p.ttfc_tokens, "rounds": p.ttfc_rounds}
    for name, rs in rounds.items():
        every = [x * 1e3 for r in rs for x in r]
        out[name] = {"median_ms": percentile(every, 50), "p90_ms": percentile(every, 90),
                     "slowest_ms": percentile([max(r) * 1e3 for r in rs], 50)}
    for key in ("median_ms", "p90_ms", "slowest_ms"):
        out[f"added_{key}"] = out["gateway"][key] - out["direct"][key]
    return out


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds (seconds, not a minute)")
    ap.add_argument("--cpus", type=parse_cpus, default=None,
                    help="pinning, e.g. client=0,engine=0,gateway=1 (default) or 'none'")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"the phases to run, comma-separated (default all: {','.join(PHASES)})")
    args = ap.parse_args(argv)
    phases = tuple(x for x in PHASES if x in args.phases.split(","))
    if not phases or set(args.phases.split(",")) - set(PHASES):
        ap.error(f"--phases takes some of {', '.join(PHASES)}")
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
            res = run(measure(routes, p, pids, groups, log, phases))
        except Exception:
            print(gw.log_tail(), file=sys.stderr)
            raise
        try:
            stats = http_json(f"http://127.0.0.1:{direct_port}/standin/stats")
        except OSError:
            stats = None

    out = {
        "benchmark": "gateway_overhead",
        "command": "python -m benchmarks.gateway_overhead" + (" --quick" if args.quick else "")
                   + (f" --phases {','.join(phases)}" if phases != PHASES else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "cpu_layout": layout,
        "aims": AIMS,
        "params": p.__dict__,
        **res,
        "direct_engine_stats": stats,
        "meets_aims": meets_aims(res),
    }
    path = write_results("gateway_overhead", out, args.out)
    print(report(res))
    print(f"\nCPU layout: {layout}; {out['seconds']:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
