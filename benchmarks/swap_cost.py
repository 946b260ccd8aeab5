"""The supervisor's own share of an engine start (DESIGN §9: gateway-side cost of a swap under 5%).

Baseline, in the same run: the engine launched by hand (same command line and environment) and polled
for ``/health`` every 10 ms, then one 1-token request. Supervised: ``Engine.ensure_ready()`` (spawn,
state file, log drain, readiness poll, 1-token probe). The difference is the supervisor's cost.

    .venv/bin/python -m benchmarks.swap_cost            # real CPU vLLM, tiny model (~2 min)
    .venv/bin/python -m benchmarks.swap_cost --standin  # the stand-in engine: many repetitions, fast
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import free_port
from engines.engine import Engine
from engines.leftovers import StateFile
from engines.planner import plan_registry
from engines.registry import load_registry
from engines.vllm import LaunchConfig, build_argv, build_env
from tests.support import standin_executable, standin_model, write_registry

RESULTS = Path(__file__).parent / "results" / "swap_cost.json"


async def direct_start(argv: list[str], env: dict[str, str], port: int, model: str,
                       client: httpx.AsyncClient) -> float:
    """Launch by hand, poll /health every 10 ms, send one 1-token request: the engine's own time."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.returncode is not None:
                raise RuntimeError("engine exited")
            await asyncio.sleep(0.01)
        r = await client.post(f"http://127.0.0.1:{port}/v1/completions",
                              json={"model": model, "prompt": "Hello", "max_tokens": 1}, timeout=60)
        r.raise_for_status()
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()


async def run(registry_path: Path, reps: int) -> dict[str, Any]:
    reg = load_registry(registry_path)
    plan = plan_registry(reg)
    spec = reg.models[0]
    work = Path(tempfile.mkdtemp(prefix="onecard-swapcost-"))
    launch = LaunchConfig(registry=reg, executable=reg.vllm.executable, platform=reg.gpu.platform,
                          budget_gib=plan.budget_gib, run_dir=work)
    direct: list[float] = []
    supervised: list[float] = []
    stops: list[float] = []
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        engine = Engine(spec, plan=plan.model(spec.name), launch=launch, client=client,
                        state_file=StateFile(work / "state.json"))
        for _ in range(reps):  # alternate, so drift in machine load hits both alike
            port = free_port()
            tmp = Path(tempfile.mkdtemp(prefix="oc-"))
            argv = build_argv(launch, model=spec, plan=plan.model(spec.name), port=port)
            env = build_env(launch, model=spec, engine_id="bench", tmpdir=tmp)
            direct.append(await direct_start(argv, env, port, spec.name, client))
            t0 = time.perf_counter()
            await engine.ensure_ready()
            supervised.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            await engine.stop()
            stops.append(time.perf_counter() - t1)
    d, s = statistics.median(direct), statistics.median(supervised)
    return {
        "model": spec.source,
        "reps": reps,
        "direct_start_s": direct,
        "supervised_start_s": supervised,
        "stop_s": stops,
        "median_direct_s": d,
        "median_supervised_s": s,
        "supervisor_share": (s - d) / s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standin", action="store_true", help="use the stand-in engine instead of real CPU vLLM")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="onecard-swapcost-reg-"))
    if args.standin:
        reg = write_registry(folder / "r.yaml", [standin_model("m")], executable=standin_executable(folder))
        reps = args.reps or 10
    else:
        from engines.cpu_setup import build_demo_models, default_home, setup_cpu_engine

        exe = setup_cpu_engine()
        models = build_demo_models(default_home() / "demo-models")
        reg = write_registry(folder / "r.yaml", [{"name": "tiny", "source": str(models.base), "dtype": "float32",
                                                  "max_model_len": 512, "start_timeout_s": 300}], executable=exe)
        reps = args.reps or 3
    result = asyncio.run(run(reg, reps))
    print(f"engine start, {result['model']} ({reps} each, alternating)")
    print(f"  direct (hand launch, 10 ms health poll): median {result['median_direct_s']:.2f} s  "
          f"{[round(x, 2) for x in result['direct_start_s']]}")
    print(f"  supervised (Engine.ensure_ready):        median {result['median_supervised_s']:.2f} s  "
          f"{[round(x, 2) for x in result['supervised_start_s']]}")
    print(f"  supervisor's share of a start: {result['supervisor_share'] * 100:.1f} %  (aim: under 5 %)")
    print(f"  stop (drain, SIGTERM group, wait): median {statistics.median(result['stop_s']):.2f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
