"""Each engine's memory flags against vLLM 0.32's start-up check, for every set the plan lets share the card.

vLLM checks at start-up that the card's free memory is at least ``gpu_memory_utilization x total``
(``vllm/v1/worker/utils.py``, ``request_memory``), also when ``--kv-cache-memory-bytes`` is given; the
default utilization is 0.92 (``vllm/config/cache.py``, ``CacheConfig.gpu_memory_utilization``). The
rule is the simulated card's (:func:`tests.fakes.simcard.request_memory`).
"""

from __future__ import annotations

import math
from itertools import permutations
from pathlib import Path

import pytest

from engines.engine_args import vllm_memory_args
from engines.planner import GIB, ModelPlan, Plan, plan_registry
from engines.registry import Platform, load_registry
from tests.fakes.simcard import DEFAULT_GPU_MEMORY_UTILIZATION, StartRefused, request_memory

SHIPPED = Path(__file__).resolve().parents[2] / "model_registry.yaml"


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def utilization(args: list[str]) -> float:
    value = flag(args, "--gpu-memory-utilization")
    return DEFAULT_GPU_MEMORY_UTILIZATION if value is None else float(value)


def on_card_bytes(plan: ModelPlan, args: list[str]) -> int:
    """What the engine holds once started: weights less offload, the exact KV pool, the runtime."""
    kv = int(flag(args, "--kv-cache-memory-bytes") or 0)
    return math.ceil((plan.weights_gib - plan.offload_gib + plan.overhead_gib) * GIB) + kv


def start_in_order(plan: Plan, order: tuple[str, ...], *, card_gib: float) -> None:
    """Start the engines one after another on a card of ``card_gib``; vLLM's check refuses or passes each."""
    total = int(card_gib * GIB)
    used = 0
    for name in order:
        mp = plan.model(name)
        args = vllm_memory_args(mp, budget_gib=plan.budget_gib, platform=Platform.CUDA, card_total_gib=card_gib)
        requested = request_memory(free=total - used, total=total, utilization=utilization(args))
        held = on_card_bytes(mp, args)
        assert requested >= held, f"{name}: its share ({requested} B) does not cover its plan ({held} B)"
        used += held


def test_every_co_resident_set_starts_in_any_order_on_the_24_gib_card() -> None:
    plan = plan_registry(load_registry(SHIPPED))
    assert plan.co_resident_sets, "the shipped plan has sets that share the card"
    for names in plan.co_resident_sets:
        for order in permutations(names):
            start_in_order(plan, order, card_gib=24.0)


def test_the_8b_beside_phi3_is_refused_with_vllms_default_utilization() -> None:
    """What happens without the flag: the second engine is refused, with vLLM's error text."""
    plan = plan_registry(load_registry(SHIPPED))
    first = plan.model("llama-3.1-8b-fp8").total_gib * GIB
    with pytest.raises(
        StartRefused,
        match=r"Free memory on device cuda:0 \(9\.89/24\.0 GiB\) on startup is less "
        r"than desired GPU memory utilization \(0\.92, 22\.08 GiB\)",
    ):
        request_memory(free=int(24 * GIB - first), total=24 * GIB, utilization=DEFAULT_GPU_MEMORY_UTILIZATION)


def test_the_share_is_of_the_real_card_when_the_budget_is_smaller() -> None:
    plan = plan_registry(load_registry(SHIPPED), budget_gib=20.0)
    mp = plan.model("phi-3-mini-fp8")
    on_48 = vllm_memory_args(mp, budget_gib=20.0, platform=Platform.CUDA, card_total_gib=48.0)
    on_20 = vllm_memory_args(mp, budget_gib=20.0, platform=Platform.CUDA)  # no card figure: the card is the budget
    assert utilization(on_48) == pytest.approx(mp.total_gib / 48.0, abs=2e-6)
    assert utilization(on_20) == pytest.approx(mp.total_gib / 20.0, abs=2e-6)
    assert utilization(on_48) * 48.0 * GIB >= mp.total_gib * GIB  # rounded up: it covers the plan
    for names in plan.co_resident_sets:
        for order in permutations(names):
            start_in_order(plan, order, card_gib=48.0)
            start_in_order(plan, order, card_gib=20.0)


def test_the_offloaded_judge_gets_its_share_and_its_offload() -> None:
    plan = plan_registry(load_registry(SHIPPED))
    mp = plan.model("llama-3.1-70b-awq")
    args = vllm_memory_args(mp, budget_gib=24.0, platform=Platform.CUDA, card_total_gib=24.0)
    assert flag(args, "--cpu-offload-gb") == "17"
    assert flag(args, "--kv-cache-memory-bytes") == str(mp.kv_cache_bytes)
    start_in_order(plan, ("llama-3.1-70b-awq",), card_gib=24.0)
    assert utilization(args) < 0.96


def test_the_cpu_platform_gets_no_utilization_flag() -> None:
    """vLLM on the CPU reads the flag as a share of host memory; the exact KV figure is all it needs."""
    plan = plan_registry(load_registry(SHIPPED))
    args = vllm_memory_args(plan.model("phi-3-mini-fp8"), budget_gib=24.0, platform=Platform.CPU)
    assert "--gpu-memory-utilization" not in args and "--kv-cache-memory-bytes" in args
