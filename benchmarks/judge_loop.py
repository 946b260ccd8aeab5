"""AlpacaEval-style judging through the real gateway: the swap-aware policy against naive FIFO, in one run.

A candidate model (an 8B) answers each instruction and a judge (a 70B) grades the answer; the two cannot be
resident together, so every change of model is a swap (stop one engine, cold-start the other). Workloads:

(a) closed loop: ``--workers`` clients share ``--items`` items; each takes an item, asks the candidate, then
    asks the judge to grade that answer, then takes the next item. Each worker has one request in flight at
    a time and alternates models, so every worker needs a candidate load and a judge load per item it
    handles: at least ``2 * ceil(items / workers) - 1`` swaps (the first load evicts nothing).
(b) phases, as AlpacaEval runs: every candidate generation submitted at once, then every judgment.
    Floor: 1 swap.
(c) pipelined (an extra, not in the issue): generation and judging decoupled, ``--workers`` generators
    feeding a queue of answers that ``--workers`` judges drain, so both models have requests arriving at
    once. This is where the policies differ: FIFO swaps whenever the oldest waiting request is for the
    other model; swap-aware keeps serving the resident model while its requests keep coming (up to
    ``max_wait_s``). Floor: 1 swap (all generation, then all judging).

Why (a) cannot separate the policies: a closed loop batches itself. Each worker has exactly one request
in flight, and any policy that drains a model before swapping (both do) serves every worker once per
load, so the workers stay in step and FIFO also meets the floor. The FIFO baseline would swap about
once per request only if the workers' requests interleaved, which a drain-then-swap closed loop never
lets happen (nor does a strict one-request-at-a-time FIFO). tests/engines/test_scheduler_replay.py replays
all three workloads through both policies on a virtual clock, at real-world times.

Each (policy, workload) runs on a fresh gateway (in-process, on a real socket, tests/support.py) in front of
stand-in engine processes (tests/fakes/standin_engine.py) whose cold starts, prefill and decode times are
realistic figures multiplied by ``--scale`` (the stand-in's own launch time, measured first, is taken off its
start delay, so the measured cold starts keep the 1:4 ratio)::

    .venv/bin/python -m benchmarks.judge_loop                        # 200 items, 8 workers
    .venv/bin/python -m benchmarks.judge_loop --quick                # 48 items (under 2 minutes)
    .venv/bin/python -m benchmarks.judge_loop --items 400 --workers 16 --scale 0.01

Definitions (all in the printed table and benchmarks/results/judge_loop.json):

- swaps: loads that evicted another model (the manager's swap records with a non-empty ``evicted``).
- makespan: first request sent to last answer received, at the client.
- wait: a request's queue wait in the gateway, from when it was queued for a model that was not admitting
  until the scheduler admitted it (what ``onecard_queue_wait_seconds`` observes), and 0 for a request
  that went straight through. p50/p99 are over every request of the workload, and p99 is compared with
  the registry's ``scheduler.max_wait_s``, by default three candidate+judge cold-start round trips (9 s at
  scale 0.02, 450 s in real time). The bound says when the policy stops serving the resident model; a
  request that hits it still waits for the drain and the cold start on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import percentile
from benchmarks.judge_report import judge_aims, table
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

RESULTS = Path(__file__).resolve().parent / "results" / "judge_loop.json"
POLICY_NAMES = ("swap-aware", "fifo")
WORKLOADS = ("closed-loop", "phases", "pipelined")
DEFINITIONS = {
    "swaps": "loads that evicted another model (manager swap records with a non-empty evicted)",
    "floor": "closed-loop: 2 * ceil(items / workers) - 1; phases and pipelined: 1",
    "makespan": "first request sent to last answer received, at the client",
    "wait": "gateway queue wait per request: queued (model not admitting) to admitted, 0 when admitted at once; "
            "the value onecard_queue_wait_seconds observes",
}


@dataclass(frozen=True)
class Profile:
    """One model as it behaves on the lab's GPU, in real seconds; :meth:`env` scales it for the stand-in."""

    name: str
    alias: str
    gib: float  # the planner's size for it on the stand-in's CPU platform (only the conflict matters)
    cold_start_s: float  # process start to ready, weights and CUDA graphs included
    prefill_s: float  # time to the first token of a typical prompt, in a batch of concurrent requests
    tokens_per_s: float  # decode rate of one stream, in a batch of concurrent requests
    tokens: tuple[int, int]  # completion length, lowest and highest

    def env(self, scale: float, spawn_s: float = 0.0) -> dict[str, str]:
        """The stand-in's knobs; ``spawn_s`` (its own launch time) is taken off the scaled cold start."""
        return {
            "STANDIN_START_DELAY": f"{max(0.0, self.cold_start_s * scale - spawn_s):.6f}",
            "STANDIN_FIRST_TOKEN_DELAY": f"{self.prefill_s * scale:.6f}",
            "STANDIN_TOKEN_DELAY": f"{scale / self.tokens_per_s:.8f}",
        }

    def service_s(self, tokens: int) -> float:
        return self.prefill_s + (tokens - 1) / self.tokens_per_s


#: Llama 3.1 8B FP8 on an RTX 4090: about 30 s from launch to ready (weights, profiling, CUDA graphs);
#: about 60 tokens/s per stream with eight in flight; answers of 200-300 tokens.
CANDIDATE = Profile("llama-8b", "candidate", gib=1.5, cold_start_s=30.0, prefill_s=0.1, tokens_per_s=60.0,
                    tokens=(200, 300))
#: Llama 3.1 70B AWQ INT4 with about 14 GiB offloaded to the CPU: about 120 s to ready, a few tokens/s
#: (every step streams the offloaded weights over PCIe), a long prefill (instruction plus answer);
#: verdicts of 10-50 tokens.
JUDGE = Profile("llama-70b", "judge", gib=2.0, cold_start_s=120.0, prefill_s=1.5, tokens_per_s=3.0,
                tokens=(10, 50))
BUDGET_GIB = 2.5  # either model fits alone, never both


@dataclass
class Item:
    index: int
    instruction: str
    answer_tokens: int
    verdict_tokens: int


@dataclass
class Sent:
    model: str
    item: int
    submitted: float
    done: float
    status: int
    tokens: int


@dataclass
class Run:
    policy: str
    workload: str
    items: int
    workers: int
    requests: int
    swaps: int
    floor: int
    loads: int
    makespan_s: float
    wait_p50_s: float
    wait_p99_s: float
    wait_max_s: float
    queued_requests: int
    latency_p50_s: float
    latency_p99_s: float
    errors: int
    cold_start_s: dict[str, float]
    swap_s: dict[str, float]
    metrics_queue_wait_count: int
    reasons: list[str] = field(default_factory=list)


# --- workloads ----------------------------------------------------------------------------------------


def make_items(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    topics = ["a haiku about autumn", "how vaccines work", "a packing list for a hike", "binary search",
              "the causes of inflation", "a polite complaint letter", "photosynthesis", "a SQL join"]
    return [
        Item(i, f"Item {i}: write about {rng.choice(topics)} for a curious reader.",
             rng.randint(*CANDIDATE.tokens), rng.randint(*JUDGE.tokens))
        for i in range(n)
    ]


class Client:
    """Sends the benchmark's chat requests and records each one."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.sent: list[Sent] = []

    async def chat(self, model: str, item: int, content: str, max_tokens: int) -> str:
        t0 = time.monotonic()
        try:
            r = await self.http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0.0,
            })
        except httpx.TransportError as e:
            print(f"  request for {model} (item {item}) failed: {type(e).__name__}: {e}", file=sys.stderr)
            self.sent.append(Sent(model, item, t0, time.monotonic(), 0, 0))
            return ""
        done = time.monotonic()
        tokens = 0
        text = ""
        if r.status_code == 200:
            body = r.json()
            tokens = int(body["usage"]["completion_tokens"])
            text = str(body["choices"][0]["message"]["content"])
        self.sent.append(Sent(model, item, t0, done, r.status_code, tokens))
        return text

    async def answer(self, item: Item) -> str:
        return await self.chat(CANDIDATE.alias, item.index, item.instruction, item.answer_tokens)

    async def grade(self, item: Item, answer: str) -> str:
        prompt = (f"You are a strict judge. Instruction:\n{item.instruction}\nAnswer:\n{answer}\n"
                  "Rate the answer from 1 to 10 and say why in one sentence.")
        return await self.chat(JUDGE.alias, item.index, prompt, item.verdict_tokens)


async def closed_loop(client: Client, items: list[Item], workers: int) -> None:
    """Each worker: take an item, candidate answer, judge grading of that answer, next item."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            answer = await client.answer(item)
            await client.grade(item, answer)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def phases(client: Client, items: list[Item], workers: int) -> None:
    """AlpacaEval's shape: every candidate generation at once, then every judgment at once."""
    answers = await asyncio.gather(*(client.answer(item) for item in items))
    await asyncio.gather(*(client.grade(item, a) for item, a in zip(items, answers, strict=True)))


async def pipelined(client: Client, items: list[Item], workers: int) -> None:
    """Generation and judging decoupled: ``workers`` generators feed a queue that ``workers`` judges drain."""
    todo = iter(items)
    answers: asyncio.Queue[tuple[Item, str] | None] = asyncio.Queue()

    async def generator() -> None:
        for item in todo:
            answers.put_nowait((item, await client.answer(item)))

    async def judge() -> None:
        while (got := await answers.get()) is not None:
            await client.grade(*got)

    judges = [asyncio.ensure_future(judge()) for _ in range(workers)]
    await asyncio.gather(*(generator() for _ in range(workers)))
    for _ in judges:
        answers.put_nowait(None)
    await asyncio.gather(*judges)


WORKLOAD_FNS: dict[str, Callable[[Client, list[Item], int], Awaitable[None]]] = {
    "closed-loop": closed_loop, "phases": phases, "pipelined": pipelined,
}


def floor_swaps(workload: str, items: int, workers: int) -> int:
    if workload == "closed-loop":
        return 2 * math.ceil(items / workers) - 1
    return 1


# --- one run on a fresh gateway ------------------------------------------------------------------------


def calibrate_spawn(tmp: Path, tries: int = 5) -> float:
    """The stand-in's own launch-to-ready time as the manager measures it (process start, imports, warm-up)."""
    folder = tmp / "calibrate"
    folder.mkdir(parents=True)
    registry = write_registry(folder / "registry.yaml", [standin_model("probe")],
                              executable=standin_executable(folder), budget_gib=BUDGET_GIB)
    with running_gateway(registry, folder / "run") as server:
        manager = server.gw.pool.owner
        for _ in range(tries):
            server.call(manager.load("probe"))
            server.call(manager.unload("probe"))
        return statistics.median(manager.engines["probe"].start_seconds)


def write_bench_registry(folder: Path, *, policy: str, scale: float, spawn_s: float, max_wait_s: float) -> Path:
    models = [
        standin_model(p.name, gib=p.gib, aliases=[p.alias], max_model_len=4096, start_timeout_s=600,
                      env=p.env(scale, spawn_s))
        for p in (CANDIDATE, JUDGE)
    ]
    return write_registry(folder / "registry.yaml", models, executable=standin_executable(folder),
                          budget_gib=BUDGET_GIB,
                          scheduler={"policy": policy, "max_wait_s": max_wait_s, "max_queue": 4096,
                                     "keepalive_s": 600})


def record_waits(server: ServerThread) -> list[float]:
    """Wrap the manager's ``queue_waited`` event (the one the queue-wait histogram is fed from)."""
    waits: list[float] = []
    events = server.gw.pool.owner.events
    observe = events.queue_waited

    def queue_waited(model: str, seconds: float) -> None:
        waits.append(seconds)
        observe(model, seconds)

    events.queue_waited = queue_waited  # type: ignore[method-assign]
    return waits


def metrics_queue_wait_count(text: str) -> int:
    for family in text_string_to_metric_families(text):
        if family.name == "onecard_queue_wait_seconds":
            return int(sum(s.value for s in family.samples if s.name.endswith("_count")))
    return 0


def run_one(policy: str, workload: str, items: list[Item], *, workers: int, scale: float, spawn_s: float,
            max_wait_s: float, tmp: Path) -> Run:
    folder = tmp / f"{policy}-{workload}"
    folder.mkdir(parents=True)
    registry = write_bench_registry(folder, policy=policy, scale=scale, spawn_s=spawn_s, max_wait_s=max_wait_s)
    with running_gateway(registry, folder / "run") as server:
        waits = record_waits(server)

        async def drive() -> tuple[Client, float, float, str]:
            # Idle connections are dropped well before uvicorn's 5 s keep-alive timeout closes them, so a
            # request is never written into a connection the server is closing.
            limits = httpx.Limits(max_connections=len(items) * 2 + 16, max_keepalive_connections=len(items) * 2,
                                  keepalive_expiry=1.0)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=3600.0) as http:
                client = Client(http)
                t0 = time.monotonic()
                await WORKLOAD_FNS[workload](client, items, workers)
                t1 = time.monotonic()
                metrics = (await http.get("/metrics")).text
                return client, t0, t1, metrics

        client, t0, t1, metrics_text = asyncio.run(drive())
        manager = server.gw.pool.owner
        records = list(manager.swaps)
        starts = {name: list(e.start_seconds) for name, e in manager.engines.items()}
    sent = client.sent
    expected = {CANDIDATE.alias: {i.index: i.answer_tokens for i in items},
                JUDGE.alias: {i.index: i.verdict_tokens for i in items}}
    errors = sum(1 for s in sent if s.status != 200 or s.tokens != expected[s.model][s.item])
    all_waits = waits + [0.0] * max(0, len(sent) - len(waits))
    latencies = [s.done - s.submitted for s in sent]
    swaps = [r for r in records if r.evicted]
    by_model: dict[str, list[float]] = {}
    for r in records:
        by_model.setdefault(r.model, []).append(r.seconds)
    return Run(
        policy=policy, workload=workload, items=len(items), workers=workers, requests=len(sent),
        swaps=len(swaps), floor=floor_swaps(workload, len(items), workers), loads=len(records),
        makespan_s=t1 - t0,
        wait_p50_s=percentile(all_waits, 50), wait_p99_s=percentile(all_waits, 99),
        wait_max_s=max(all_waits, default=0.0), queued_requests=len(waits),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        errors=errors,
        cold_start_s={m: round(statistics.fmean(v), 3) for m, v in starts.items() if v},
        swap_s={m: round(statistics.fmean(v), 3) for m, v in by_model.items()},
        metrics_queue_wait_count=metrics_queue_wait_count(metrics_text),
        reasons=sorted({r.reason.split(";")[0] for r in swaps})[:6],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.judge_loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=None, help="items to judge (default 200; 48 with --quick)")
    ap.add_argument("--workers", type=int, default=8, help="concurrent workers (default 8)")
    ap.add_argument("--scale", type=float, default=0.02,
                    help="multiply the models' real start, prefill and decode times by this (default 0.02)")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="scheduler.max_wait_s (default: three candidate+judge cold-start round trips, scaled)")
    ap.add_argument("--quick", action="store_true", help="48 items: a check in under 2 minutes")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma list (default: all)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    n_items = args.items or (48 if args.quick else 200)
    max_wait_s = args.max_wait or round(3 * (CANDIDATE.cold_start_s + JUDGE.cold_start_s) * args.scale, 3)
    policies = [p for p in args.policies.split(",") if p]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(policies) - set(POLICY_NAMES)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        ap.error(f"unknown policy or workload: {', '.join(unknown)}")
    items = make_items(n_items, args.seed)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="onecard-judge-") as tmp:
        spawn_s = calibrate_spawn(Path(tmp))
        print(f"judge loop: {n_items} items, {args.workers} workers, scale {args.scale:g}, "
              f"max_wait_s {max_wait_s:g}; the stand-in itself takes {spawn_s:.3f} s to be ready, "
              "taken off its start delay")
        for p in (CANDIDATE, JUDGE):
            mean_tokens = sum(p.tokens) // 2
            print(f"  {p.alias:9} {p.name:9}: cold start {p.cold_start_s:g} s -> {p.cold_start_s * args.scale:.3f} s;"
                  f" {p.tokens[0]}-{p.tokens[1]} tokens at {p.tokens_per_s:g} tok/s after {p.prefill_s:g} s prefill"
                  f" (~{p.service_s(mean_tokens):.1f} s -> {p.service_s(mean_tokens) * args.scale:.3f} s)")
        for workload in workloads:
            for policy in policies:
                t = time.monotonic()
                run = run_one(policy, workload, items, workers=args.workers, scale=args.scale, spawn_s=spawn_s,
                              max_wait_s=max_wait_s, tmp=Path(tmp))
                runs.append(run)
                print(f"  ran {policy:10} {workload:11} in {time.monotonic() - t:5.1f} s: {run.swaps} swaps, "
                      f"{run.errors} errors; measured cold start {run.cold_start_s}, swap {run.swap_s}", flush=True)
    print()
    print(table(runs, max_wait_s))
    verdict = judge_aims(runs, max_wait_s, WORKLOADS)
    for w, r in verdict["ratios"].items():
        print(f"{w:11}: FIFO makespan / policy makespan = {r['fifo_makespan_over_policy']:.2f}x; "
              f"swaps / floor: policy {r['policy_swaps_over_floor']:.2f}, FIFO {r['fifo_swaps_over_floor']:.2f}")
    for aim, ok in verdict["aims"].items():
        print(f"  {'met   ' if ok else 'MISSED'} {aim}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "judge_loop",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "config": {"items": n_items, "workers": args.workers, "scale": args.scale, "max_wait_s": max_wait_s,
                   "budget_gib": BUDGET_GIB, "seed": args.seed, "standin_spawn_s": round(spawn_s, 4),
                   "profiles": {p.alias: {**asdict(p), "env": p.env(args.scale, spawn_s)}
                                for p in (CANDIDATE, JUDGE)}},
        "definitions": DEFINITIONS,
        "runs": [asdict(r) for r in runs],
        **verdict,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if verdict["aims"].get("no_errors", True) else 1


if __name__ == "__main__":
    sys.exit(main())
