"""How near the gateway's CPU per request and per chunk is to what its HTTP stack alone costs.

::

    .venv/bin/python -m benchmarks.relay_floor            # about 40 s here
    .venv/bin/python -m benchmarks.relay_floor --quick    # about 15 s

Three routes to the same stand-in engine code, measured with the same client code in alternating
rounds (``benchmarks.gateway_overhead``'s): the engine directly; the *floor*, ``benchmarks.floor_app``
(uvicorn with uvloop and httptools, and :class:`gateway.engine_http.EngineClient`, the gateway's own
stack, relaying bytes and doing nothing else); and ``onecard serve``. The floor and the gateway each have
CPU 1 to themselves while they are measured (the client and the engines share CPU 0). For each relay it
records its CPU per request 10 ms apart, per sequential request, per request at 64 concurrent and per
streamed chunk, and prints
the gateway's figures as multiples of the floor's: what the gateway's own work (keys, parsing,
admission, usage, metrics, provenance headers) adds to the least any relay on this stack costs on this
machine. Results go to ``benchmarks/results/relay_floor.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Connection,
    Processes,
    free_port,
    http_json,
    machine_info,
    percentile,
    pin,
    wait_http,
    write_results,
)
from benchmarks.cpu import CpuMeter, cpu_per_unit
from benchmarks.gateway_overhead import MODEL, PATH, Route, alternate, chat_body, concurrent_round, latency_block
from tests.support import standin_executable, standin_model, write_registry

RELAYS = ("floor", "gateway")


async def paced_block(route: Route, body: bytes, n: int, cpu_pids: dict[str, int]) -> dict[str, Any]:
    """``n`` requests 10 ms apart on one connection: the relay's CPU sleeps between them."""
    conn = await Connection.open(route.host, route.port)
    try:
        for _ in range(20):
            await conn.request(b"POST", PATH, body)
        meter = CpuMeter(cpu_pids)
        t0 = time.perf_counter()
        for _ in range(n):
            r = await conn.request(b"POST", PATH, body)
            if r.status != 200:
                raise RuntimeError(f"{route.name}: HTTP {r.status}")
            await asyncio.sleep(0.01)
        return {"cpu_s": meter.used(), "seconds": time.perf_counter() - t0}
    finally:
        conn.close()


async def measure(routes: list[Route], pids: dict[str, int], *, quick: bool,
                  log: Any) -> dict[str, Any]:
    seq_n, seq_rounds = (400, 3) if quick else (1000, 6)
    ns_per, ns_rounds = (15, 3) if quick else (30, 5)
    st_rounds = 3 if quick else 5
    lat_body = chat_body(16, stream=False)
    stream_body = chat_body(256, stream=True)
    out: dict[str, Any] = {}

    log(f"sequential: {seq_rounds} rounds of {seq_n} requests per route")
    seq = await alternate(routes, seq_rounds, lambda r: latency_block(r, lat_body, seq_n, pids))
    out["sequential"] = {name: {
        "median_ms": percentile([x for b in blocks for x in b["latencies"]], 50) * 1e3,
        "cpu_us_per_request": cpu_per_unit(blocks, seq_n * len(blocks))["per_unit"]} for name, blocks in seq.items()}

    paced_n = 100 if quick else 300
    log(f"paced: {paced_n} requests 10 ms apart per relay")
    paced = await alternate(routes[1:], 1, lambda r: paced_block(r, lat_body, paced_n, pids))
    out["paced"] = {name: {"cpu_us_per_request": cpu_per_unit(blocks, paced_n)["per_unit"]}
                    for name, blocks in paced.items()}

    log(f"non-stream: 64 workers x {ns_per} requests, {ns_rounds} rounds per route")
    ns = await alternate(routes, ns_rounds, lambda r: concurrent_round(r, lat_body, 64, ns_per, pids))
    out["nonstream"] = {name: {
        "req_per_s": percentile([r["req_per_s"] for r in rs], 50),
        "cpu_us_per_request": cpu_per_unit(rs, sum(r["requests"] for r in rs))["per_unit"]} for name, rs in ns.items()}

    log(f"stream: 64 streams x 256 tokens, {st_rounds} rounds per route")
    st = await alternate(routes, st_rounds, lambda r: concurrent_round(r, stream_body, 64, 1, pids))
    out["stream"] = {name: {
        "events_per_s": percentile([r["events_per_s"] for r in rs], 50),
        "cpu_us_per_chunk": cpu_per_unit(rs, sum(r["events"] for r in rs))["per_unit"]} for name, rs in st.items()}
    return out


def report(res: dict[str, Any]) -> str:
    rows = [("CPU per request, 10 ms apart (us)", "paced", "cpu_us_per_request"),
            ("CPU per sequential request (us)", "sequential", "cpu_us_per_request"),
            ("CPU per request, 64 concurrent (us)", "nonstream", "cpu_us_per_request"),
            ("CPU per streamed chunk (us)", "stream", "cpu_us_per_chunk")]
    lines = [f"{'':44}{'floor':>9}{'gateway':>9}  gateway / floor", "-" * 80]
    for label, phase, key in rows:
        floor = res[phase]["floor"][key]["floor"]
        gw = res[phase]["gateway"][key]["gateway"]
        lines.append(f"{label:44}{floor:9.1f}{gw:9.1f}  {gw / floor:.2f}x")
    for label, phase, key in (("sequential median latency (ms)", "sequential", "median_ms"),
                              ("non-stream req/s, 64 concurrent", "nonstream", "req_per_s"),
                              ("stream chunks/s, 64 streams", "stream", "events_per_s")):
        d, f, g = (res[phase][n][key] for n in ("direct", "floor", "gateway"))
        lines.append(f"{label:44}{f:9.3g}{g:9.3g}  (direct {d:.3g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.relay_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onecard-floor-") as tmp, Processes(Path(tmp)) as procs:
        folder = Path(tmp)
        pin(0, [0])
        direct_port, floor_engine_port, floor_port, gw_port = (free_port() for _ in range(4))
        direct = procs.standin(MODEL, direct_port, cpus=[0])
        procs.standin(MODEL, floor_engine_port, cpus=[0])
        floor = procs.start("floor", [sys.executable, "-m", "uvicorn", "benchmarks.floor_app:app", "--port",
                                      str(floor_port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                                      "--log-level", "warning"], cpus=[1],
                            env={"FLOOR_UPSTREAM": f"http://127.0.0.1:{floor_engine_port}"})
        wait_http(f"http://127.0.0.1:{floor_port}/health", proc=floor.popen)  # relayed: the engine's own
        registry = write_registry(folder / "registry.yaml", [standin_model(MODEL)],
                                  executable=standin_executable(folder))
        gw = procs.gateway(registry, gw_port, folder / "run", cpus=[1])
        http_json(f"http://127.0.0.1:{gw_port}/admin/engines/{MODEL}/load", "POST")
        row = next(r for r in http_json(f"http://127.0.0.1:{gw_port}/admin/engines")["engines"] if r["model"] == MODEL)
        procs.extra_pids.append(int(row["pid"]))
        pin(int(row["pid"]), [0])
        log(f"direct stand-in pid {direct.pid}; floor pid {floor.pid}; gateway pid {gw.pid}")
        routes = [Route("direct", "127.0.0.1", direct_port), Route("floor", "127.0.0.1", floor_port),
                  Route("gateway", "127.0.0.1", gw_port)]
        pids = {"floor": floor.pid, "gateway": gw.pid}
        try:
            res = asyncio.run(measure(routes, pids, quick=args.quick, log=log))
        except Exception:
            print(gw.log_tail(), floor.log_tail(), file=sys.stderr, sep="\n")
            raise
    out = {"benchmark": "relay_floor", "command": "python -m benchmarks.relay_floor" + (" --quick" * args.quick),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.perf_counter() - started,
           "machine": machine_info(), **res}
    path = write_results("relay_floor", out, args.out)
    print(report(res))
    print(f"\n{out['seconds']:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
