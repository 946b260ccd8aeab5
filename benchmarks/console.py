"""The console page on loopback: its weight and its time to first render (aims: under 200 KB, 300 ms).

    .venv/bin/python -m benchmarks.console            # 20 loads in headless Chromium, about 20 s
    .venv/bin/python -m benchmarks.console --loads 5

One run starts ``onecard serve`` (uvloop + httptools, as deployed) with two stand-in engines, one of
them resident (so the page has an engine, a swap and flags to draw), then:

1. **Weight**: the bytes the page needs before it can draw: the HTML, every asset it names, and the
   first snapshot, each fetched once with a plain client (no compression: the gateway sends none).
   The browser's own count (Resource Timing ``transferSize``, headers included) is recorded beside it,
   and the gateway's own time to answer each of these requests (50 each, one keep-alive client).
2. **Time to first render**: Debian's ``chromium`` (headless, driven by Playwright) loads the page
   ``--loads`` times, each in a fresh browser context (empty cache). Per load: milliseconds from the
   start of navigation to the first contentful paint (the page's frame, before any data) and to the
   page's own ``console-first-render`` mark (the first snapshot drawn: what a person waits for).
   Median and p90 over the loads; the browser's own start-up is not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Processes, free_port, http_json, machine_info, summarize, write_results
from tests.support import standin_executable, standin_model, write_registry

WEIGHT_AIM_BYTES = 200 * 1024
RENDER_AIM_MS = 300.0

#: How long each part of a load took, read in the page (Navigation Timing and the page's own mark).
TIMINGS_JS = """() => {
  const paint = performance.getEntriesByName('first-contentful-paint')[0];
  const mark = performance.getEntriesByName('console-first-render')[0];
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource');
  return {fcp_ms: paint ? paint.startTime : null, first_render_ms: mark ? mark.startTime : null,
          html_ms: nav.responseEnd, dom_ready_ms: nav.domContentLoadedEventEnd,
          transfer_bytes: nav.transferSize + res.reduce((n, r) => n + r.transferSize, 0),
          resources: [nav.name, ...res.map((r) => r.name)]};
}"""


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        body: bytes = r.read()
        return body


def page_weight(base: str) -> dict[str, Any]:
    """The HTML, the assets it references and the first snapshot, in bytes."""
    html = fetch(base + "/")
    parts = {"/": len(html)}
    for ref in re.findall(rb'(?:src|href)="([^"]+)"', html):
        name = ref.decode()
        if name.startswith("data:"):
            continue
        parts["/" + name] = len(fetch(f"{base}/{name}"))
    page = sum(parts.values())
    snapshot = len(fetch(base + "/console/snapshot"))
    return {"files": parts, "page_bytes": page, "snapshot_bytes": snapshot, "total_bytes": page + snapshot}


def serve_times(base: str, paths: list[str], n: int = 50) -> dict[str, dict[str, float]]:
    """Milliseconds the gateway takes to answer each of the page's requests (one keep-alive client)."""
    out: dict[str, dict[str, float]] = {}
    with httpx.Client(trust_env=False) as client:
        for path in paths:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                client.get(base + path).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            out[path] = summarize(times)
    return out


def render_times(base: str, loads: int, chromium: str) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    runs: list[dict[str, Any]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for _ in range(loads + 1):  # the first load warms the browser process itself and is not kept
                context = browser.new_context(viewport={"width": 1440, "height": 900})
                page = context.new_page()
                page.goto("about:blank")  # the tab's renderer process is up before the clock starts
                page.goto(base + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=10_000)
                runs.append(page.evaluate(TIMINGS_JS))
                context.close()
        finally:
            browser.close()
    runs = runs[1:]
    return {
        "loads": loads,
        "html_received_ms": summarize([r["html_ms"] for r in runs]),
        "dom_ready_ms": summarize([r["dom_ready_ms"] for r in runs]),
        "first_contentful_paint_ms": summarize([r["fcp_ms"] for r in runs]),
        "first_render_ms": summarize([r["first_render_ms"] for r in runs]),
        "browser_transfer_bytes": runs[-1]["transfer_bytes"],
        "browser_resources": runs[-1]["resources"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, default=20, help="page loads in the browser (default 20)")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    work = Path(tempfile.mkdtemp(prefix="onecard-console-bench-"))
    models = [standin_model("alpha", aliases=["candidate"]), standin_model("beta", aliases=["judge"])]
    registry = write_registry(work / "reg.yaml", models, executable=standin_executable(work), budget_gib=1.5)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    with Processes(work) as procs:
        procs.gateway(registry, port, work / "run", cpus=None)
        http_json(base + "/admin/engines/alpha/load", method="POST")
        weight = page_weight(base)
        served = serve_times(base, [*weight["files"], "/console/snapshot"])
        render = render_times(base, args.loads, chromium) if chromium else None
    load_after = os.getloadavg()
    result = {
        "machine": machine_info(),
        "load_average_1m": [load_before[0], load_after[0]],
        "weight": weight,
        "served_ms": served,
        "render": render,
        "aims": {"weight_bytes": WEIGHT_AIM_BYTES, "first_render_ms": RENDER_AIM_MS},
    }
    path = write_results("console", result)
    print("console page on loopback")
    for name, size in weight["files"].items():
        print(f"  {name:<30} {size:>8,} B")
    print(f"  page (HTML, CSS, JS)           {weight['page_bytes']:>8,} B")
    print(f"  first snapshot                 {weight['snapshot_bytes']:>8,} B")
    print(f"  total before the first render  {weight['total_bytes']:>8,} B  (aim: under {WEIGHT_AIM_BYTES:,} B)")
    for name, t in served.items():
        print(f"  served {name:<28} median {t['median']:.2f} ms, p90 {t['p90']:.2f} ms (gateway, keep-alive client)")
    if render is None:
        print("  time to first render: not measured (no chromium executable; Debian: apt-get install chromium)")
    else:
        fcp, first = render["first_contentful_paint_ms"], render["first_render_ms"]
        print(f"  browser's count (headers included): {render['browser_transfer_bytes']:,} B")
        html, dom = render["html_received_ms"], render["dom_ready_ms"]
        print(
            f"  HTML received:          median {html['median']:.0f} ms; script and style run (DOM ready): "
            f"median {dom['median']:.0f} ms"
        )
        print(f"  first contentful paint: median {fcp['median']:.0f} ms, p90 {fcp['p90']:.0f} ms ({args.loads} loads)")
        print(
            f"  first snapshot drawn:   median {first['median']:.0f} ms, p90 {first['p90']:.0f} ms "
            f"(aim: under {RENDER_AIM_MS:.0f} ms)"
        )
    print(f"  load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  results: {path}")


if __name__ == "__main__":
    main()
