"""A day in the lab on one card, per scheduling policy, on a compressed clock.

Stand-in engines (tests/fakes/standin_engine.py) behind the real gateway (in-process, on a real socket),
on the simulated 24 GiB card (:mod:`tests.fakes.simcard`, platform ``cuda``): the models are the shipped
registry's (``model_registry.yaml``), each taking from the card what ``onecard plan`` sizes for it, so an
eviction puts an engine to sleep and a swap back is a wake, as on the lab's GPU. Cold starts, wakes,
prefill and decode are the lab's real-time figures times ``--scale``. The day:

- two lm-eval-like batch runs, on the 8B (16 requests in flight) and on the 14B AWQ (8 in flight), which
  cannot share the card;
- a phased judge run: every candidate answer on the 8B, then every verdict on the 70B judge (alone on
  the card);
- three people chatting on and off (streams, seeded random pauses) with Phi-3 and Mistral 7B;
- one fine-tune lease of 8 GiB for a while (the benchmark's own process takes the 8 GiB on the card).

Batch clients retry a 503/429 after its Retry-After, as harnesses do. Policies, each on a fresh gateway:

- ``classes``: onecard with users: the chatters are interactive (``interactive_max_wait_s``), the runs batch;
- ``no-classes``: today's onecard, everyone batch (one bound, ``max_wait_s``);
- ``fifo``: the model of the oldest waiting request goes next (``engines.scheduler.decide_fifo``);
- ``on-demand``: what a plain on-demand swapper does: a request for another model swaps it in as soon as
  the resident requests finish, however long the resident model's queue (:func:`decide_on_demand`).

Printed per policy: batch makespan (first batch request to last batch answer), interactive time to
first token p50/p95/max, swaps (loads that evicted something; how many of all loads were wakes and how
many cold starts), card-idle seconds (nothing in flight on
any engine while some request waited), requests lost (no 200 after retries). Each policy's day is drawn
in ``benchmarks/results/lab_day.png``: which models are on the card over time, the swaps, and each
interactive request's wait. Times in the table are real seconds (scaled back by ``1 / scale``)::

    .venv/bin/python -m benchmarks.lab_day --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.common import percentile
from benchmarks.judge_loop import Profile, calibrate_spawn
from benchmarks.lab_day_report import draw, table
from engines.people import UserClass, add_user
from engines.planner import GIB, plan_registry
from engines.registry import load_registry
from engines.scheduler import Decision, EngineView, Fits, decide, decide_fifo
from engines.state import EngineState
from tests.fakes.simcard import ENV_LEDGER, SIDECAR, Ledger, hold
from tests.support import ROOT, ServerThread, running_gateway, standin_executable

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("classes", "no-classes", "fifo", "on-demand")
BUDGET_GIB = 24.0
SHIPPED = ROOT / "model_registry.yaml"
#: A fake ``pynvml`` that reads the simulated card, so the gateway's own NVML code sees it.
FAKE_NVML = ROOT / "tests" / "fakes" / "fake_nvml"
#: Each checkpoint's ``quantization_config`` by the registry's ``checkpoint_quant_method`` (as in
#: tests/gateway/test_simcard.py): the simulated card checks ``--quantization`` against it as vLLM does.
CHECKPOINT_QUANT = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "static"},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized"},
}

# The shipped models on the lab's RTX 4090 (``gib`` is not used here: the plan sizes each model).
EIGHT_B = Profile(
    "llama-3.1-8b-fp8", "candidate", gib=0.0, cold_start_s=30.0, prefill_s=0.1, tokens_per_s=60.0, tokens=(100, 200)
)
FOURTEEN_B = Profile(
    "qwen2.5-14b-awq", "workhorse", gib=0.0, cold_start_s=45.0, prefill_s=0.15, tokens_per_s=40.0, tokens=(100, 200)
)
JUDGE = Profile(
    "llama-3.1-70b-awq", "judge", gib=0.0, cold_start_s=120.0, prefill_s=1.5, tokens_per_s=3.0, tokens=(10, 30)
)
PHI = Profile("phi-3-mini-fp8", "phi", gib=0.0, cold_start_s=15.0, prefill_s=0.05, tokens_per_s=90.0, tokens=(60, 120))
MISTRAL = Profile(
    "mistral-7b-fp8", "mistral", gib=0.0, cold_start_s=30.0, prefill_s=0.1, tokens_per_s=60.0, tokens=(60, 120)
)
PROFILES = (EIGHT_B, FOURTEEN_B, JUDGE, PHI, MISTRAL)
#: A wake from sleep level 1 in real seconds: the weights the plan puts on the card come back from pinned
#: host RAM at about this rate (PCIe 4.0 x16, in the allocator's chunks), and the KV cache and runtime
#: pools are allocated again (vllm/device_allocator/sleep_mode_backend.py, CuMemBackend.wake_up).
WAKE_GIB_PER_S = 10.0
WAKE_FIXED_S = 1.0


def decide_on_demand(
    views: Sequence[EngineView], *, fits: Fits, max_wait_s: float, wait_bounds: dict[str, float] | None = None
) -> Decision:
    """A plain on-demand swapper: every waiting request is past its bound, so a request for a model that is
    not resident swaps it in as soon as the resident models' in-flight requests finish."""
    return decide(views, fits=fits, max_wait_s=1e-9)


@dataclass
class Chat:
    user: str
    model: str
    sent: float
    ttft: float | None
    status: int


@dataclass
class Day:
    policy: str
    batch_makespan_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p95_s: float = 0.0
    ttft_max_s: float = 0.0
    swaps: int = 0
    wakes: int = 0  # loads that were wakes from sleep
    cold_starts: int = 0  # loads that were cold starts
    card_idle_s: float = 0.0
    lost: int = 0
    requests: int = 0
    chats: list[Chat] = field(default_factory=list)
    timeline: list[tuple[float, list[str], bool]] = field(default_factory=list)  # (t, resident, idle-while-waiting)
    swap_times: list[tuple[float, str]] = field(default_factory=list)
    why: list[str] = field(default_factory=list)  # the first answers of lost requests


def write_users(path: Path, *, classes: bool) -> dict[str, str]:
    spec = {
        "ops": ("interactive", True),
        "eval-8b": ("batch", False),
        "eval-14b": ("batch", False),
        "judge-run": ("batch", False),
        "ann": ("interactive", False),
        "ben": ("interactive", False),
        "cem": ("interactive", False),
    }
    return {
        name: add_user(path, name, klass=UserClass(k if classes else "batch"), admin=admin)
        for name, (k, admin) in spec.items()
    }


def wake_s(weights_on_card_gib: float) -> float:
    """Real seconds a level-1 wake takes for a model with this much of its weights on the card."""
    return WAKE_FIXED_S + weights_on_card_gib / WAKE_GIB_PER_S


def write_lab_registry(
    folder: Path, ledger: Ledger, *, scale: float, spawn_s: float, classes: bool, interactive_wait_s: float
) -> tuple[Path, dict[str, dict[str, float]]]:
    """The shipped registry's lab models on the simulated card (platform ``cuda``), each model folder holding
    its checkpoint's ``config.json`` and the plan's weights and runtime figures for the stand-in; returns the
    registry and, per model, the plan's figures and the scaled delays."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    by_name = {p.name: p for p in PROFILES}
    models = []
    for entry in shipped["models"]:
        if entry["name"] not in by_name:
            continue
        entry = dict(entry)
        model_dir = folder / "models" / entry["name"]
        model_dir.mkdir(parents=True)
        config = {
            "architectures": ["LlamaForCausalLM"],
            **entry["architecture"],
            "quantization_config": CHECKPOINT_QUANT[entry["checkpoint_quant_method"]],
        }
        (model_dir / "config.json").write_text(json.dumps(config))
        entry["source"] = str(model_dir)
        entry["start_timeout_s"] = 900
        entry.pop("idle_ttl_s", None)
        if "lora" in entry:  # the hub adapters are not here; the slots stay, sized as shipped
            entry["lora"] = {k: v for k, v in entry["lora"].items() if k != "adapters"}
        entry["env"] = by_name[entry["name"]].env(scale, spawn_s)
        models.append(entry)
    max_wait = 300.0 * scale
    registry: dict[str, Any] = {
        "gpu": {"budget_gib": BUDGET_GIB, "headroom_gib": 1, "platform": "cuda", "host_ram_for_sleep_gib": 64},
        "vllm": {"executable": str(standin_executable(folder)), "env": {ENV_LEDGER: str(ledger.path)}},
        "scheduler": {
            "max_wait_s": max_wait,
            "interactive_max_wait_s": (interactive_wait_s * scale) if classes else max_wait,
            "max_queue": 4096,
            "keepalive_s": 600,
        },
        "models": models,
    }
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    plan = plan_registry(load_registry(path))
    sizes: dict[str, dict[str, float]] = {}
    for m in plan.models:  # the planner's figures, so the stand-in takes from the card what the plan sizes
        (folder / "models" / m.name / SIDECAR).write_text(
            json.dumps({"weights_bytes": int(m.weights_gib * GIB), "runtime_bytes": int(m.overhead_gib * GIB)})
        )
        on_card = m.weights_gib - m.offload_gib
        sizes[m.name] = {"total_gib": round(m.total_gib, 2), "wake_s": round(wake_s(on_card), 2)}
    for entry in models:  # the wake: its real seconds on the compressed clock
        entry["env"]["STANDIN_WAKE_DELAY"] = f"{sizes[entry['name']]['wake_s'] * scale:.6f}"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path, sizes


class Lab:
    def __init__(self, server: ServerThread, keys: dict[str, str], scale: float, seed: int, ledger: Ledger) -> None:
        self.server, self.keys, self.scale, self.ledger = server, keys, scale, ledger
        self.rng = random.Random(seed)
        self.lost = 0
        self.why: list[str] = []  # what each lost request got
        self.requests = 0
        self.batch_done: list[float] = []
        self.chats: list[Chat] = []
        self.t0 = time.monotonic()

    async def batch(self, c: httpx.AsyncClient, user: str, model: Profile, prompt: str) -> None:
        body = {"model": model.name, "prompt": prompt, "max_tokens": self.rng.randint(*model.tokens)}
        self.requests += 1
        for _ in range(200):
            r = await c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {self.keys[user]}"})
            if r.status_code == 200:
                self.batch_done.append(time.monotonic())
                return
            if r.status_code not in (429, 503):
                self.why.append(f"batch {r.status_code}: {r.text[:200]}")
                break
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)) * self.scale, 0.5))
        self.lost += 1

    async def run_batch(self, c: httpx.AsyncClient, user: str, model: Profile, n: int, workers: int) -> None:
        todo = list(range(n))

        async def worker() -> None:
            while todo:
                i = todo.pop()
                await self.batch(c, user, model, f"{user} item {i}")

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def chat(self, c: httpx.AsyncClient, user: str, models: list[Profile], until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(20, 120) * self.scale)
            model = self.rng.choice(models)
            body = {
                "model": model.name,
                "messages": [{"role": "user", "content": f"{user} asks"}],
                "max_tokens": self.rng.randint(*model.tokens),
                "stream": True,
            }
            sent = time.monotonic()
            ttft, status = None, 0
            self.requests += 1
            async with c.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {self.keys[user]}"}
            ) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"content"' in line and ttft is None:
                        ttft = time.monotonic() - sent
            if status != 200 or ttft is None:
                self.lost += 1
                self.why.append(f"chat {status}: {'no token' if ttft is None else ''}")
            self.chats.append(Chat(user, model.name, sent - self.t0, ttft, status))

    async def lease(self, c: httpx.AsyncClient, at: float, duration: float) -> None:
        await asyncio.sleep(at)
        r = await c.post(
            "/admin/leases",
            json={"gib": 8, "pid": os.getpid(), "label": "fine-tune", "wait": True},
            headers={"Authorization": f"Bearer {self.keys['ops']}"},
        )
        if r.status_code != 201:
            self.lost += 1
            self.why.append(f"lease {r.status_code}: {r.text[:200]}")
            return
        # the fine-tune takes its 8 GiB of the card, as the trainer of a real lease does
        hold(self.ledger, pid=os.getpid(), name="fine-tune", nbytes=8 * GIB)
        await asyncio.sleep(duration)
        with self.ledger.transaction() as card:
            card.holders.pop(os.getpid(), None)
        await c.delete(f"/admin/leases/{r.json()['id']}", headers={"Authorization": f"Bearer {self.keys['ops']}"})

    async def day(self, *, n: int) -> float:
        s = self.scale
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=256, keepalive_expiry=1.0)
        async with httpx.AsyncClient(base_url=self.server.url, limits=limits, timeout=3600) as c:

            async def judge_run() -> None:
                await asyncio.sleep(600 * s)
                await self.run_batch(c, "judge-run", EIGHT_B, n // 2, 8)
                await self.run_batch(c, "judge-run", JUDGE, n // 2, 8)

            async def second_eval() -> None:
                await asyncio.sleep(300 * s)
                await self.run_batch(c, "eval-14b", FOURTEEN_B, n, 8)

            batch = asyncio.gather(self.run_batch(c, "eval-8b", EIGHT_B, n, 16), second_eval(), judge_run())
            t0 = time.monotonic()
            chat_until = t0 + 2400 * s
            chats = [self.chat(c, u, [PHI, MISTRAL], chat_until) for u in ("ann", "ben", "cem")]
            await asyncio.gather(batch, *chats, self.lease(c, 900 * s, 300 * s))
            return max(self.batch_done, default=t0) - t0


def sample(server: ServerThread, day: Day, t0: float, stop: threading.Event, every: float) -> None:
    """The card over time: which models are resident, and whether it idles while a request waits."""
    manager = server.gw.pool.owner
    while not stop.wait(every):
        engines = list(manager.engines.items())
        resident = [n for n, e in engines if e.state in (EngineState.READY, EngineState.STARTING)]
        busy = any(e.in_flight for _, e in engines)
        waiting = any(manager.admission.queues[n] for n, _ in engines)
        day.timeline.append((time.monotonic() - t0, resident, waiting and not busy))


def run_policy(
    policy: str, *, scale: float, spawn_s: float, n: int, seed: int, tmp: Path, interactive_wait_s: float = 3.0
) -> Day:
    folder = tmp / policy
    folder.mkdir(parents=True)
    classes = policy != "no-classes"
    keys = write_users(folder / "users.yaml", classes=classes)
    ledger = Ledger.create(folder / "card.json", total_gib=BUDGET_GIB)
    registry, _ = write_lab_registry(
        folder, ledger, scale=scale, spawn_s=spawn_s, classes=classes, interactive_wait_s=interactive_wait_s
    )
    day = Day(policy)
    os.environ[ENV_LEDGER] = str(ledger.path)  # the fake NVML reads this card
    with running_gateway(registry, folder / "run", users_path=folder / "users.yaml") as server:
        # The owner task looks at the waits once a second (and at every arrival and release); on a clock
        # compressed 50x that would be 50 lab seconds, so it looks as often in lab time as it does for real.
        server.gw.pool.owner._tick_s = max(0.01, scale)
        if policy == "fifo":
            server.gw.pool.owner.policy = decide_fifo
        elif policy == "on-demand":
            server.gw.pool.owner.policy = decide_on_demand
        lab = Lab(server, keys, scale, seed, ledger)
        stop = threading.Event()
        every = 0.05
        sampler = threading.Thread(target=sample, args=(server, day, lab.t0, stop, every), daemon=True)
        sampler.start()
        try:
            day.batch_makespan_s = asyncio.run(lab.day(n=n)) / scale
        finally:
            stop.set()
            sampler.join()
        records = list(server.gw.pool.owner.swaps)
    day.swaps = sum(1 for r in records if r.evicted)
    day.wakes = sum(1 for r in records if r.kind == "wake")
    day.cold_starts = sum(1 for r in records if r.kind != "wake")
    mono_to_wall = time.time() - time.monotonic()
    day.swap_times = [(r.at - mono_to_wall - lab.t0, r.model) for r in records if r.evicted]
    day.card_idle_s = sum(every for _, _, idle in day.timeline if idle) / scale
    ttfts = [ch.ttft / scale for ch in lab.chats if ch.ttft is not None]
    if ttfts:
        day.ttft_p50_s, day.ttft_p95_s = percentile(ttfts, 50), percentile(ttfts, 95)
    day.ttft_max_s = max(ttfts, default=0.0)
    day.lost, day.requests, day.chats, day.why = lab.lost, lab.requests, lab.chats, lab.why[:20]
    return day


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scale", type=float, default=0.02, help="seconds of run per second of lab time")
    ap.add_argument("--items", type=int, default=96, help="requests per batch run")
    ap.add_argument("--quick", action="store_true", help="48 requests per batch run")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--interactive-wait",
        type=float,
        default=3.0,
        help="scheduler.interactive_max_wait_s in lab seconds (batch: max_wait_s 300)",
    )
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    n = 48 if args.quick else args.items
    sys.path.insert(0, str(FAKE_NVML))  # the gateway's NVML code reads the simulated card
    with tempfile.TemporaryDirectory(prefix="lab-day-") as tmp:
        spawn_s = calibrate_spawn(Path(tmp))
        days = [
            run_policy(
                p,
                scale=args.scale,
                spawn_s=spawn_s,
                n=n,
                seed=args.seed,
                tmp=Path(tmp),
                interactive_wait_s=args.interactive_wait,
            )
            for p in args.policies.split(",")
        ]
    print(table(days))
    cold = {p.name: p.cold_start_s for p in PROFILES}
    worst_chat_cold = max(cold[PHI.name], cold[MISTRAL.name])
    base = next((d for d in days if d.policy == "no-classes"), None)
    aims: dict[str, Any] = {}
    for d in days:
        aims[d.policy] = {
            "chat_ttft_p95_within_cold_start_plus_5s": d.ttft_p95_s <= worst_chat_cold + 5,
            "batch_makespan_within_10pct_of_today": None
            if base is None
            else d.batch_makespan_s <= 1.1 * base.batch_makespan_s,
            "no_request_lost": d.lost == 0,
        }
    print(json.dumps(aims, indent=1))
    png = RESULTS / "lab_day.png"
    draw(days, args.scale, png, [p.name for p in PROFILES])
    out = {
        "config": {
            "scale": args.scale,
            "items": n,
            "seed": args.seed,
            "spawn_s": spawn_s,
            "interactive_wait_s": args.interactive_wait,
            "max_wait_s": 300,
        },
        "days": [{k: v for k, v in asdict(d).items() if k not in ("timeline", "chats", "swap_times")} for d in days],
        "aims": aims,
        "chat_cold_start_s": {PHI.name: cold[PHI.name], MISTRAL.name: cold[MISTRAL.name]},
    }
    (RESULTS / "lab_day.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"picture: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
