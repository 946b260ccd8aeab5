"""The table of ``benchmarks.gateway_overhead``: each figure beside its aim.

::

    print(report(results))     # results: what gateway_overhead.measure returned (any of its phases)
    meets_aims(results)        # {"added_median": True, "stream_ratio": False, ...}
"""

from __future__ import annotations

from typing import Any

#: The aims of the gateway's hot path (benchmarks/README.md): added latency, throughput against calling
#: the engine directly at 64 concurrent, added time to first chunk of 64 streams started together, and
#: the gateway's own CPU per request and per streamed chunk.
AIMS = {"added_median_ms": 0.3, "added_p99_ms": 5.0, "stream_ratio": 1.0, "nonstream_ratio": 0.6,
        "added_ttfc_ms": 20.0, "gateway_cpu_us_per_request": 200.0, "gateway_cpu_us_per_chunk": 8.0}

def meets_aims(res: dict[str, Any]) -> dict[str, bool]:
    """Each aim of :data:`AIMS` that the phases run could check: met or not."""
    out: dict[str, bool] = {}
    if "latency" in res:
        lat = res["latency"]
        out["added_median"] = lat["added_median_ms"] <= AIMS["added_median_ms"]
        out["added_p99"] = lat["added_p99_ms"] < AIMS["added_p99_ms"]
        out["gateway_cpu_per_sequential_request"] = (lat["cpu_us_per_request"]["gateway"]["gateway"]
                                                     <= AIMS["gateway_cpu_us_per_request"])
    if "stream" in res:
        out["stream_ratio"] = res["stream"]["ratio"] >= AIMS["stream_ratio"]
        out["gateway_cpu_per_chunk"] = (res["stream"]["gateway"]["cpu_us_per_unit"]["gateway"]
                                        <= AIMS["gateway_cpu_us_per_chunk"])
    if "nonstream" in res:
        out["nonstream_ratio"] = res["nonstream"]["ratio"] >= AIMS["nonstream_ratio"]
        out["gateway_cpu_per_concurrent_request"] = (res["nonstream"]["gateway"]["cpu_us_per_unit"]["gateway"]
                                                     <= AIMS["gateway_cpu_us_per_request"])
    if "ttfc" in res:
        out["added_ttfc"] = res["ttfc"]["added_median_ms"] < AIMS["added_ttfc_ms"]
    return out


def report(res: dict[str, Any]) -> str:
    """The table of figures, each with its aim where it has one."""
    def aim(ok: bool, text: str) -> str:
        return f"({'meets' if ok else 'MISSES'} aim: {text})"

    rows = [("", "direct", "gateway", "gateway - direct, or gateway / direct")]
    cpu_aim = AIMS["gateway_cpu_us_per_request"]
    if "latency" in res:
        lat = res["latency"]
        d, g = lat["direct_ms"], lat["gateway_ms"]
        cpu = lat["cpu_us_per_request"]["gateway"]["gateway"]
        rows += [
            (f"latency median (ms, max_tokens {lat['max_tokens']})", f"{d['median']:.3f}", f"{g['median']:.3f}",
             f"+{lat['added_median_ms']:.3f} ms  "
             + aim(lat["added_median_ms"] <= AIMS["added_median_ms"], f"<= {AIMS['added_median_ms']:g} ms")),
            ("latency p99 (ms)", f"{d['p99']:.3f}", f"{g['p99']:.3f}",
             f"+{lat['added_p99_ms']:.3f} ms  "
             + aim(lat["added_p99_ms"] < AIMS["added_p99_ms"], f"< {AIMS['added_p99_ms']:g} ms")),
            ("gateway CPU per sequential request (us)", "", f"{cpu:.0f}", aim(cpu <= cpu_aim, f"<= {cpu_aim:g} us")),
        ]
    if "stream" in res:
        st = res["stream"]
        cpu = st["gateway"]["cpu_us_per_unit"]["gateway"]
        rows += [
            (f"streaming chunks/s ({st['streams']} streams x {st['tokens']} tokens)",
             f"{st['direct']['median_events_per_s']:,.0f}", f"{st['gateway']['median_events_per_s']:,.0f}",
             f"{st['ratio']:.3f}x  " + aim(st["ratio"] >= AIMS["stream_ratio"], f">= {AIMS['stream_ratio']:g}x")),
            ("gateway CPU per stream chunk (us)", "", f"{cpu:.1f}",
             aim(cpu <= AIMS["gateway_cpu_us_per_chunk"], f"<= {AIMS['gateway_cpu_us_per_chunk']:g} us")
             + f"; CPU-bound ratio {st['cpu_capacity_ratio']:.3f}x"),
        ]
    if "nonstream" in res:
        ns = res["nonstream"]
        cpu = ns["gateway"]["cpu_us_per_unit"]["gateway"]
        rows += [
            (f"non-stream req/s ({ns['concurrency']} concurrent)", f"{ns['direct']['median_req_per_s']:,.0f}",
             f"{ns['gateway']['median_req_per_s']:,.0f}",
             f"{ns['ratio']:.3f}x  " + aim(ns["ratio"] >= AIMS["nonstream_ratio"], f">= {AIMS['nonstream_ratio']:g}x")),
            ("gateway CPU per concurrent request (us)", "", f"{cpu:.0f}",
             aim(cpu <= cpu_aim, f"<= {cpu_aim:g} us") + f"; CPU-bound ratio {ns['cpu_capacity_ratio']:.3f}x"),
        ]
    if "ttfc" in res:
        tf = res["ttfc"]
        rows += [
            (f"time to first chunk, median (ms, {tf['streams']} started together)",
             f"{tf['direct']['median_ms']:.2f}", f"{tf['gateway']['median_ms']:.2f}",
             f"+{tf['added_median_ms']:.2f} ms  "
             + aim(tf["added_median_ms"] < AIMS["added_ttfc_ms"], f"< {AIMS['added_ttfc_ms']:g} ms")),
            ("time to first chunk, p90 (ms)", f"{tf['direct']['p90_ms']:.2f}", f"{tf['gateway']['p90_ms']:.2f}",
             f"+{tf['added_p90_ms']:.2f} ms"),
            ("time to first chunk, slowest of each burst (ms)", f"{tf['direct']['slowest_ms']:.2f}",
             f"{tf['gateway']['slowest_ms']:.2f}", f"+{tf['added_slowest_ms']:.2f} ms"),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 3 else c for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    shares = [*res.get("latency", {}).get("others_cpu_share", {}).values()]
    shares += [res[k][route]["others_cpu_share"] for k in ("stream", "nonstream") if k in res
               for route in ("direct", "gateway")]
    others = max(shares, default=0.0)
    if others > 0.05:
        lines.append(f"\nWARNING: other processes used up to {others:.0%} of the machine's CPU during a phase; "
                     "rates and tails are then unreliable (CPU per unit and CPU-bound ratios less so).")
    return "\n".join(lines)
