"""The one source of the vLLM flags an engine gets: the gateway launches them, ``onecard plan`` shows them.

``engine_args`` is what follows ``vllm serve``: the model source, then every flag, without ``--host``
and ``--port`` (the gateway adds ``--host 127.0.0.1 --port <a free port>`` right after the source when
it launches the engine, in :func:`engines.vllm.build_argv`)::

    args = engine_args(registry, spec, plan.model(spec.name), platform=plan.platform, budget_gib=plan.budget_gib)
    # ['neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8', '--served-model-name', 'llama-3.1-8b-fp8', ...]
    report = plan_report(registry, plan)   # plan.as_dict() with per-model engine_args and quantization
"""

from __future__ import annotations

import math
from typing import Any

from engines.planner import GIB, ModelPlan, Plan
from engines.quantization import QuantDecision, decide_for
from engines.registry import ModelSpec, Platform, Registry

#: vLLM on the CPU: bf16 picks an AMX kernel that dies with "Illegal instruction"; float32 works.
CPU_DTYPE = "float32"

#: The smallest KV pool an engine is given: vLLM rounds to blocks and keeps a null block, so a pool
#: sized to exactly one max-length sequence of a tiny model is refused. vLLM on the CPU also needs an
#: explicit figure, or it sizes its pool from free host memory and refuses to start.
MIN_KV_CACHE_BYTES = 64 * 1024**2

#: Decimals of ``--gpu-memory-utilization``: rounding up adds under 1e-6 of the card (25 KiB of 24 GiB) per
#: engine, which any headroom absorbs, so co-resident shares still pass each other's start-up check.
UTILIZATION_DECIMALS = 6


def utilization_share(need_bytes: float, card_total_gib: float) -> float:
    """The smallest ``--gpu-memory-utilization`` whose share of the card covers ``need_bytes``.

    vLLM 0.32 requests ``ceil(total x utilization)`` bytes and refuses to start when fewer are free
    (``vllm/v1/worker/utils.py``, ``request_memory``); its default, 0.92, refuses any second engine.

    >>> utilization_share(12 * GIB, 24.0)
    0.5
    """
    scale = 10.0**UTILIZATION_DECIMALS
    share = math.ceil(need_bytes / (card_total_gib * GIB) * scale) / scale
    return min(1.0, max(1.0 / scale, share))


def vllm_memory_args(
    plan: ModelPlan, *, budget_gib: float, platform: Platform, card_total_gib: float | None = None
) -> list[str]:
    """The memory flags an engine gets: an exact KV pool and, on a GPU, its planned share of the card.

    ``card_total_gib`` is the card's real total memory (NVML); None means the card is the budget. The
    share is of the real card, because that is what vLLM multiplies it by; the budget may be smaller.
    """
    args: list[str] = []
    card = card_total_gib if card_total_gib else budget_gib
    if plan.kv_cache_bytes or platform is Platform.CPU:
        kv = max(plan.kv_cache_bytes, MIN_KV_CACHE_BYTES)
        args += ["--kv-cache-memory-bytes", str(kv)]
        if platform is Platform.CUDA:
            on_card = (plan.weights_gib - plan.offload_gib + plan.overhead_gib) * GIB + kv
            args += ["--gpu-memory-utilization", f"{utilization_share(on_card, card):.{UTILIZATION_DECIMALS}f}"]
    elif platform is Platform.CUDA:
        # no KV figure: vLLM sizes the pool from the share (share - weights - activations)
        share = min(0.95, max(0.05, plan.total_gib / card))
        args += ["--gpu-memory-utilization", f"{share:.3f}"]
    if plan.offload_gib > 0:
        args += ["--cpu-offload-gb", f"{plan.offload_gib:g}"]
    return args


def engine_args(
    registry: Registry,
    model: ModelSpec,
    plan: ModelPlan,
    *,
    platform: Platform,
    budget_gib: float,
    quantization: QuantDecision | None = None,
    card_total_gib: float | None = None,
) -> list[str]:
    """``vllm serve`` arguments for one registry entry, host and port left out.

    ``quantization`` is the decision to apply (default: :func:`engines.quantization.decide_for`);
    ``card_total_gib`` the card's real total memory, of which ``--gpu-memory-utilization`` is a share
    (default: the budget).
    """
    args = [registry.locate(model.source)]
    args += ["--served-model-name", model.name, "--max-model-len", str(model.max_model_len)]
    decision = quantization or decide_for(registry, model, platform=platform)
    if decision.flag is not None:
        args += ["--quantization", decision.flag]
    dtype = CPU_DTYPE if platform is Platform.CPU and model.dtype in ("auto", "bfloat16") else model.dtype
    args += ["--dtype", dtype]
    if model.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", model.kv_cache_dtype]
    if model.revision:
        args += ["--revision", model.revision]
    args += vllm_memory_args(plan, budget_gib=budget_gib, platform=platform, card_total_gib=card_total_gib)
    args.append("--enable-prefix-caching" if model.enable_prefix_caching else "--no-enable-prefix-caching")
    if model.lora.enabled:
        args += ["--enable-lora", "--max-lora-rank", str(model.lora.max_rank), "--max-loras", str(model.lora.max_loras)]
        startup = [f"{name}={registry.locate(ad.path)}" for name, ad in model.lora.adapters.items() if ad.preload]
        if startup:
            args += ["--lora-modules", *startup]
    if platform is Platform.CUDA and model.sleep_level > 0:  # vLLM refuses sleep mode on the CPU
        args.append("--enable-sleep-mode")
    if platform is Platform.CPU:
        args.append("--enforce-eager")
    # The gateway relays GET /tokenizer_info, which vLLM serves only with this flag
    # (vllm/entrypoints/serve/tokenize/api_router.py, attach_router).
    args.append("--enable-tokenizer-info-endpoint")
    # Requests are scheduled by their ``priority`` (lower first, arrival breaking ties), which the gateway
    # sets from each user's class: vllm/config/scheduler.py ``SchedulerConfig.policy`` ("fcfs" by default),
    # flag ``--scheduling-policy`` in vllm/engine/arg_utils.py ``EngineArgs.add_cli_args``.
    args += ["--scheduling-policy", "priority"]
    args += list(model.extra_args)
    return args


def plan_report(registry: Registry, plan: Plan, *, card_total_gib: float | None = None) -> dict[str, Any]:
    """``plan.as_dict()`` with, per model, ``engine_args`` and the ``quantization`` decision and reason.

    ``card_total_gib``: the real card's total memory when there is one (NVML), as the gateway will use it.
    """
    report = plan.as_dict()
    models: list[dict[str, Any]] = []
    for spec in registry.models:
        decision = decide_for(registry, spec, platform=plan.platform)
        args = engine_args(
            registry,
            spec,
            plan.model(spec.name),
            platform=plan.platform,
            budget_gib=plan.budget_gib,
            quantization=decision,
            card_total_gib=card_total_gib,
        )
        models.append({**plan.model(spec.name).as_dict(), "quantization": decision.as_dict(), "engine_args": args})
    report["models"] = models
    return report


def format_quantization(registry: Registry, plan: Plan) -> str:
    """The plan's quantization section: per model the flag passed (or none) and why."""
    lines = ["Quantization (--quantization passed to vLLM):"]
    width = max(len(m.name) for m in registry.models)
    for spec in registry.models:
        d = decide_for(registry, spec, platform=plan.platform)
        lines.append(f"  {spec.name.ljust(width)}  {d.flag or '(none)':<12}  {d.reason}")
    return "\n".join(lines)
