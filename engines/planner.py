"""VRAM arithmetic as pure functions that explain themselves.

Per engine::

    weights  = quantized linear params x bits/8  +  unquantized parts (embeddings, lm_head, norms) x 2 bytes
    kv       = 2 x layers x kv_heads x head_dim x bytes(kv dtype)  x  max_model_len x concurrent_seqs
    overhead = RUNTIME_OVERHEAD_GIB (CUDA context, activations, graphs)  +  LoRA slots when LoRA is enabled
    total    = weights - cpu_offload + kv + overhead

Verdicts: ``fits`` alone within budget - headroom; ``needs_offload`` when only moving weights to host RAM
(``--cpu-offload-gb``) makes it fit; ``never_fits`` when KV cache and runtime alone exceed the card.

Use:

    >>> from pathlib import Path
    >>> from engines.registry import parse_registry
    >>> entry = {"name": "llama-8b", "source": "org/llama-8b", "quantization": "fp8", "max_model_len": 8192,
    ...          "params_b": 8.0}
    >>> registry = parse_registry({"gpu": {"budget_gib": 24}, "models": [entry]}, path=Path("registry.yaml"))
    >>> plan = plan_registry(registry)
    >>> plan.model("llama-8b").verdict, round(plan.model("llama-8b").weights_gib, 2)
    (<Verdict.FITS: 'fits'>, 7.45)

What the plan adds to ``onecard check``, and the table ``onecard plan`` prints, are in :mod:`engines.plan_text`;
the flags that give each engine its planned memory are in :mod:`engines.engine_args`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import combinations

from engines.registry import (
    Architecture,
    LoraSpec,
    ModelSpec,
    Platform,
    Quantization,
    Registry,
    model_architecture,
)

GIB = 1024**3

#: CUDA context, activation peak, sampler buffers and CUDA graphs of one vLLM engine on the GPU.
RUNTIME_OVERHEAD_GIB = 1.5
#: The same for vLLM on the CPU (no CUDA context; torch and the engine's own buffers).
CPU_RUNTIME_OVERHEAD_GIB = 1.0

#: Effective bits per weight, including group scales/zeros (AWQ/GPTQ: group 128, fp16 scale + 4-bit zero).
BITS_PER_WEIGHT: dict[Quantization, float] = {
    Quantization.NONE: 16.0,
    Quantization.FP8: 8.0,
    Quantization.AWQ: 4.0 + 20.0 / 128,
    Quantization.AWQ_MARLIN: 4.0 + 20.0 / 128,
    Quantization.GPTQ: 4.0 + 20.0 / 128,
    Quantization.GPTQ_MARLIN: 4.0 + 20.0 / 128,
    Quantization.BITSANDBYTES: 4.0 + 16.0 / 64,
}

KV_BYTES: dict[str, float] = {
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
}

#: Co-residency sets are enumerated exactly up to this many fitting models, greedily above.
MAX_EXACT_SETS = 16

#: The budget used for ``gpu.budget_gib: auto`` when NVML finds no GPU.
FALLBACK_BUDGET_GIB = 24.0


class Verdict(StrEnum):
    FITS = "fits"
    NEEDS_OFFLOAD = "needs_offload"
    NEVER_FITS = "never_fits"


@dataclass(frozen=True)
class ParamCount:
    """Parameters split by how they are stored."""

    linear: float  # quantizable projection weights (attention + MLP/experts)
    unquantized: float  # embeddings, lm_head, norms, routers: kept at 16 bit

    @property
    def total(self) -> float:
        return self.linear + self.unquantized


def count_params(arch: Architecture) -> ParamCount:
    """Parameters of a Llama/Mistral/Qwen/Mixtral-style decoder from its published figures."""
    h = arch.hidden_size
    d = arch.kv_head_dim
    q_out = arch.num_attention_heads * d
    kv_out = arch.num_key_value_heads * d
    attn = h * q_out + 2 * h * kv_out + q_out * h
    mlp = 3 * h * arch.intermediate_size * arch.num_local_experts
    linear = arch.num_hidden_layers * (attn + mlp)
    router = h * arch.num_local_experts if arch.num_local_experts > 1 else 0
    norms = arch.num_hidden_layers * 2 * h + h
    embed = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    unquantized = embed + norms + arch.num_hidden_layers * router
    return ParamCount(linear=float(linear), unquantized=float(unquantized))


def _bits(quant: Quantization, dtype_bytes: float) -> float:
    return BITS_PER_WEIGHT[quant] if quant is not Quantization.NONE else dtype_bytes * 8


def weight_bytes(params: ParamCount, quant: Quantization, dtype_bytes: float = 2.0) -> float:
    """Linear layers at the quantization's bits (scales included), the rest at ``dtype_bytes``."""
    return params.linear * _bits(quant, dtype_bytes) / 8 + params.unquantized * dtype_bytes


def kv_bytes_per_token(arch: Architecture, kv_dtype_bytes: float) -> float:
    """K and V, every layer, every KV head: ``2 x layers x kv_heads x head_dim x bytes``."""
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.kv_head_dim * kv_dtype_bytes


def lora_bytes(arch: Architecture, lora: LoraSpec, dtype_bytes: float = 2.0) -> float:
    """GPU memory vLLM reserves for LoRA slots: ``max_loras`` adapters of ``max_rank`` on every projection.

    Each projection ``in -> out`` holds A (rank x in) and B (out x rank) per slot, at the model's
    activation dtype; q, k, v, o and gate, up, down (per expert) on every layer. Zero when LoRA is off.
    """
    if not lora.enabled:
        return 0.0
    h = arch.hidden_size
    q_out = arch.num_attention_heads * arch.kv_head_dim
    kv_out = arch.num_key_value_heads * arch.kv_head_dim
    i = arch.intermediate_size
    attn = (h + q_out) + 2 * (h + kv_out) + (q_out + h)
    mlp = (2 * (h + i) + (i + h)) * arch.num_local_experts
    return float(arch.num_hidden_layers * (attn + mlp) * lora.max_rank * lora.max_loras * dtype_bytes)


def _dtype_bytes(model: ModelSpec) -> float:
    return {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}.get(model.dtype, 2.0)


def _kv_dtype_bytes(model: ModelSpec) -> float:
    if model.kv_cache_dtype == "auto":
        return _dtype_bytes(model)
    return KV_BYTES[model.kv_cache_dtype]


@dataclass(frozen=True)
class ModelPlan:
    """One engine's footprint and verdict, with the reasoning in ``notes``.

    ``overhead_gib`` is the runtime constant plus ``lora_gib``; ``total_gib`` is what stays on the card
    (weights - offload + kv + overhead).
    """

    name: str
    weights_gib: float
    kv_gib: float
    overhead_gib: float
    offload_gib: float
    total_gib: float
    verdict: Verdict
    kv_cache_bytes: int
    notes: tuple[str, ...] = ()
    measured_gib: float | None = None
    lora_gib: float = 0.0

    @property
    def resident_gib(self) -> float:
        """What the engine holds on the card: measured when known, else planned."""
        return self.measured_gib if self.measured_gib is not None else self.total_gib

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "weights_gib": round(self.weights_gib, 2),
            "kv_gib": round(self.kv_gib, 2),
            "overhead_gib": round(self.overhead_gib, 2),
            "lora_gib": round(self.lora_gib, 2),
            "total_gib": round(self.total_gib, 2),
            "verdict": self.verdict.value,
            "offload_gib": round(self.offload_gib, 2),
            "kv_cache_bytes": self.kv_cache_bytes,
            "measured_gib": None if self.measured_gib is None else round(self.measured_gib, 2),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Plan:
    budget_gib: float
    headroom_gib: float
    platform: Platform
    models: tuple[ModelPlan, ...]
    co_resident_sets: tuple[tuple[str, ...], ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def usable_gib(self) -> float:
        return self.budget_gib - self.headroom_gib

    def model(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def can_coreside(self, names: set[str] | frozenset[str]) -> bool:
        """Whether these models can all be resident at once within the budget."""
        plans = [self.model(n) for n in names]
        if any(p.verdict is Verdict.NEVER_FITS for p in plans):
            return False
        if len(plans) > 1 and any(p.verdict is Verdict.NEEDS_OFFLOAD for p in plans):
            return False
        return sum(p.resident_gib for p in plans) <= self.usable_gib + 1e-9

    def as_dict(self) -> dict[str, object]:
        return {
            "budget_gib": self.budget_gib,
            "headroom_gib": self.headroom_gib,
            "usable_gib": round(self.usable_gib, 2),
            "platform": self.platform.value,
            "models": [m.as_dict() for m in self.models],
            "co_resident_sets": [list(s) for s in self.co_resident_sets],
            "warnings": list(self.warnings),
        }


def runtime_overhead_gib(platform: Platform) -> float:
    return CPU_RUNTIME_OVERHEAD_GIB if platform is Platform.CPU else RUNTIME_OVERHEAD_GIB


def max_len_that_fits(model: ModelSpec, arch: Architecture | None, *, usable_gib: float, platform: Platform) -> int:
    """The largest ``max_model_len`` (a multiple of 256) that fits with no offload; 0 if none does."""
    if arch is None:
        return 0
    dtype = _dtype_bytes(model)
    weights = weight_bytes(count_params(arch), model.effective_quantization, dtype)
    fixed = weights + lora_bytes(arch, model.lora, dtype)
    room = usable_gib * GIB - fixed - runtime_overhead_gib(platform) * GIB
    per_len = kv_bytes_per_token(arch, _kv_dtype_bytes(model)) * model.concurrent_seqs
    return max(0, int(room // per_len) // 256 * 256) if room > 0 else 0


def never_fits_fix(
    model: ModelSpec, arch: Architecture | None, *, usable_gib: float, platform: Platform
) -> tuple[str, str]:
    """(field, fix) for a model whose KV cache and runtime alone exceed the card."""
    if arch is None:  # no KV figure: the runtime alone is too big for the budget
        return "gpu.budget_gib", "raise gpu.budget_gib or lower gpu.headroom_gib"
    best = max_len_that_fits(model, arch, usable_gib=usable_gib, platform=platform)
    if best:
        return "max_model_len", f"lower max_model_len to at most {best} or lower concurrent_seqs"
    return "max_model_len", "lower max_model_len or concurrent_seqs (or use kv_cache_dtype: fp8)"


def plan_model(model: ModelSpec, arch: Architecture | None, *, usable_gib: float, platform: Platform) -> ModelPlan:
    """Footprint and verdict of one model alone on a card with ``usable_gib`` free."""
    notes: list[str] = []
    quant = model.effective_quantization
    dtype = _dtype_bytes(model)
    lora = 0.0
    if arch is not None:
        params = count_params(arch)
        weights = weight_bytes(params, quant, dtype)
        kv = kv_bytes_per_token(arch, _kv_dtype_bytes(model)) * model.max_model_len * model.concurrent_seqs
        lora = lora_bytes(arch, model.lora, dtype)
        notes.append(
            f"{params.total / 1e9:.2f}B params "
            f"({params.linear / 1e9:.2f}B at {_bits(quant, dtype):.2f} bits, "
            f"{params.unquantized / 1e9:.2f}B at {dtype * 8:.0f} bits); KV for {model.concurrent_seqs} x "
            f"{model.max_model_len} tokens"
        )
    else:
        assert model.params_b is not None  # the registry requires architecture or params_b
        weights = model.params_b * 1e9 * _bits(quant, dtype) / 8
        kv = 0.0
        notes.append(f"{model.params_b}B declared params at {_bits(quant, dtype):.2f} bits; KV not sized")
    if lora:
        notes.append(
            f"LoRA slots: {model.lora.max_loras} x rank {model.lora.max_rank} = {lora / GIB:.2f} GiB (in overhead)"
        )
    runtime = runtime_overhead_gib(platform)
    weights_gib, kv_gib, lora_gib = weights / GIB, kv / GIB, lora / GIB
    overhead = runtime + lora_gib
    need = weights_gib + kv_gib + overhead
    verdict = Verdict.FITS
    offload = 0.0
    if need > usable_gib:
        short = need - usable_gib
        if kv_gib + overhead >= usable_gib:
            verdict = Verdict.NEVER_FITS
            _, fix = never_fits_fix(model, arch, usable_gib=usable_gib, platform=platform)
            notes.append(
                f"KV cache ({kv_gib:.1f} GiB) and runtime ({overhead:.1f} GiB) alone exceed the "
                f"{usable_gib:.1f} GiB usable; {fix}"
            )
        else:
            verdict = Verdict.NEEDS_OFFLOAD
            offload = min(weights_gib, max(model.cpu_offload_gib, math.ceil(short * 2) / 2))
            notes.append(
                f"{need:.1f} GiB needed but {usable_gib:.1f} GiB usable: offload {offload:g} GiB of weights "
                f"to host RAM (--cpu-offload-gb); expect a few tokens/s"
            )
            if model.cpu_offload_gib < short:
                notes.append(f"set cpu_offload_gib to at least {math.ceil(short * 2) / 2:g} in the registry")
    total = need - offload
    return ModelPlan(
        name=model.name,
        weights_gib=weights_gib,
        kv_gib=kv_gib,
        overhead_gib=overhead,
        offload_gib=offload,
        total_gib=total,
        verdict=verdict,
        kv_cache_bytes=int(kv),
        notes=tuple(notes),
        lora_gib=lora_gib,
    )


def co_resident_sets(models: tuple[ModelPlan, ...], usable_gib: float) -> tuple[tuple[str, ...], ...]:
    """Maximal sets (two or more models) that fit together; offloaded models always run alone."""
    fit = sorted((m for m in models if m.verdict is Verdict.FITS), key=lambda m: m.name)
    found: list[frozenset[str]] = []
    if len(fit) <= MAX_EXACT_SETS:
        for k in range(len(fit), 1, -1):
            for combo in combinations(fit, k):
                names = frozenset(m.name for m in combo)
                fits = sum(m.resident_gib for m in combo) <= usable_gib + 1e-9
                if fits and not any(names < f for f in found):
                    found.append(names)
    else:  # greedy: smallest first
        chosen: list[ModelPlan] = []
        for m in sorted(fit, key=lambda m: m.resident_gib):
            if sum(c.resident_gib for c in chosen) + m.resident_gib <= usable_gib:
                chosen.append(m)
        if len(chosen) > 1:
            found.append(frozenset(c.name for c in chosen))
    return tuple(sorted((tuple(sorted(s)) for s in found), key=lambda s: (-len(s), s)))


def detect_budget_gib() -> float | None:
    """Total memory of GPU 0 from NVML, in GiB; None when there is no GPU or no driver (the gateway's one NVML
    path, :mod:`engines.gpu`)."""
    from engines.gpu import NvmlProbe, card_total_gib

    probe = NvmlProbe.open()
    try:
        return card_total_gib(probe)
    finally:
        probe.close()


def plan_registry(
    registry: Registry,
    *,
    budget_gib: float | None = None,
    measured_gib: dict[str, float] | None = None,
) -> Plan:
    """The whole plan.

    ``budget_gib`` overrides the registry (and 'auto', which asks NVML); ``measured_gib`` (model name ->
    GiB measured on the card) replaces estimates for co-residency.
    """
    gpu = registry.gpu
    warnings = list(registry.warnings)
    if budget_gib is None and gpu.budget_gib == "auto":
        budget_gib = detect_budget_gib()
        if budget_gib is None:
            budget_gib = FALLBACK_BUDGET_GIB
            warnings.append(f"gpu.budget_gib is 'auto' but no GPU was found; planned for {FALLBACK_BUDGET_GIB:g} GiB")
    elif budget_gib is None:
        budget_gib = float(gpu.budget_gib)
    usable = budget_gib - gpu.headroom_gib
    plans: list[ModelPlan] = []
    for m in registry.models:
        p = plan_model(m, model_architecture(registry, m), usable_gib=usable, platform=gpu.platform)
        if measured_gib and m.name in measured_gib:
            p = replace(p, measured_gib=measured_gib[m.name])
        plans.append(p)
    if gpu.platform is Platform.CPU:
        warnings.append("platform cpu: sleep frees no memory here, so it is never counted as freeing room")
    models = tuple(plans)
    return Plan(
        budget_gib=budget_gib,
        headroom_gib=gpu.headroom_gib,
        platform=gpu.platform,
        models=models,
        co_resident_sets=co_resident_sets(models, usable),
        warnings=tuple(warnings),
    )
