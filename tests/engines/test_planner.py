"""The planner's arithmetic, checked against figures worked out by hand from published architectures.

Llama 3.1 8B and 70B (Meta's config.json):

    8B:  32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256, untied lm_head
    70B: 80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV heads, vocab 128256, untied lm_head

head_dim = hidden / heads = 128 for both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines import planner
from engines.engine_args import MIN_KV_CACHE_BYTES, vllm_memory_args
from engines.plan_text import format_plan
from engines.planner import (
    GIB,
    RUNTIME_OVERHEAD_GIB,
    ModelPlan,
    Plan,
    Verdict,
    co_resident_sets,
    count_params,
    kv_bytes_per_token,
    lora_bytes,
    plan_registry,
    weight_bytes,
)
from engines.registry import Architecture, LoraSpec, Platform, Quantization, load_registry

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_registry.yaml"

LLAMA_8B = Architecture(
    num_hidden_layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
)
LLAMA_70B = Architecture(
    num_hidden_layers=80,
    hidden_size=8192,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
)

# ---- Llama 3.1 8B, by hand -------------------------------------------------------------------------
# attention per layer: q 4096x4096 + k 4096x(8x128) + v 4096x(8x128) + o 4096x4096
Q_8B = 4096 * 4096  # 16_777_216
K_8B = 4096 * 1024  # 4_194_304
ATTN_8B = Q_8B + K_8B + K_8B + Q_8B
assert ATTN_8B == 41_943_040
# MLP per layer: gate, up (4096 -> 14336) and down (14336 -> 4096)
MLP_8B = 3 * 4096 * 14336
assert MLP_8B == 176_160_768
LINEAR_8B = 32 * (ATTN_8B + MLP_8B)  # 32 x 218_103_808
assert LINEAR_8B == 6_979_321_856
# unquantized: embeddings + lm_head (untied) + two RMSNorms per layer + the final norm
EMBED_8B = 2 * 128256 * 4096
assert EMBED_8B == 1_050_673_152
NORMS_8B = 32 * 2 * 4096 + 4096
assert NORMS_8B == 266_240
UNQUANT_8B = EMBED_8B + NORMS_8B
assert LINEAR_8B + UNQUANT_8B == 8_030_261_248  # Meta publishes "8.03B"
# FP8: 1 byte per linear weight, 2 bytes per unquantized one
WEIGHTS_8B_FP8 = LINEAR_8B * 1 + UNQUANT_8B * 2
assert WEIGHTS_8B_FP8 == 9_081_200_640  # 8.4575 GiB (the FP8 checkpoint is 9.08 GB)
# KV per token = 2 (K and V) x 32 layers x 8 KV heads x 128 head_dim x 1 byte (fp8)
KV_TOKEN_8B_FP8 = 2 * 32 * 8 * 128 * 1
assert KV_TOKEN_8B_FP8 == 65_536

# ---- Llama 3.1 70B, by hand ------------------------------------------------------------------------
Q_70B = 8192 * 8192  # 67_108_864
K_70B = 8192 * 1024  # 8_388_608
ATTN_70B = Q_70B + K_70B + K_70B + Q_70B
assert ATTN_70B == 150_994_944
MLP_70B = 3 * 8192 * 28672
assert MLP_70B == 704_643_072
LINEAR_70B = 80 * (ATTN_70B + MLP_70B)  # 80 x 855_638_016
assert LINEAR_70B == 68_451_041_280
EMBED_70B = 2 * 128256 * 8192
assert EMBED_70B == 2_101_346_304
NORMS_70B = 80 * 2 * 8192 + 8192
assert NORMS_70B == 1_318_912
UNQUANT_70B = EMBED_70B + NORMS_70B
assert LINEAR_70B + UNQUANT_70B == 70_553_706_496  # Meta publishes "70.6B"
# AWQ INT4, group size 128: per group 128 x 4 bits = 64 bytes + fp16 scale + 4-bit zero = 20 bits = 2.5 bytes
GROUPS_70B = LINEAR_70B // 128
assert GROUPS_70B == 534_773_760
WEIGHTS_70B_AWQ = GROUPS_70B * 66.5 + UNQUANT_70B * 2
assert WEIGHTS_70B_AWQ == 35_562_455_040 + 4_205_330_432 == 39_767_785_472  # 37.04 GiB
KV_TOKEN_70B_FP8 = 2 * 80 * 8 * 128 * 1
assert KV_TOKEN_70B_FP8 == 163_840


def test_llama_8b_params_and_bytes() -> None:
    params = count_params(LLAMA_8B)
    assert params.linear == LINEAR_8B
    assert params.unquantized == UNQUANT_8B
    assert weight_bytes(params, Quantization.FP8) == WEIGHTS_8B_FP8
    # unquantized bf16: every parameter at 2 bytes
    assert weight_bytes(params, Quantization.NONE) == 2 * (LINEAR_8B + UNQUANT_8B)
    assert kv_bytes_per_token(LLAMA_8B, 1) == KV_TOKEN_8B_FP8
    assert kv_bytes_per_token(LLAMA_8B, 2) == 2 * KV_TOKEN_8B_FP8  # bf16 KV: 128 KiB per token


def test_llama_70b_params_and_bytes() -> None:
    params = count_params(LLAMA_70B)
    assert params.linear == LINEAR_70B
    assert params.unquantized == UNQUANT_70B
    assert weight_bytes(params, Quantization.AWQ_MARLIN) == WEIGHTS_70B_AWQ
    assert weight_bytes(params, Quantization.AWQ) == WEIGHTS_70B_AWQ  # same checkpoint, other kernel
    assert 35 <= WEIGHTS_70B_AWQ / GIB <= 37.5  # "about 35-37 GiB": it cannot fit a 24 GB card
    assert kv_bytes_per_token(LLAMA_70B, 1) == KV_TOKEN_70B_FP8


def test_lora_slots_by_hand() -> None:
    # per layer, per rank: A (rank x in) + B (out x rank) on each projection: in + out elements
    #   q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up 4096+14336 each, down 14336+4096
    per_layer_per_rank = 8192 + 5120 + 5120 + 8192 + 3 * 18432
    assert per_layer_per_rank == 81_920
    # 32 layers x rank 16 x 2 slots x 2 bytes (bf16)
    expected = 32 * per_layer_per_rank * 16 * 2 * 2
    assert expected == 167_772_160  # 0.15625 GiB
    assert lora_bytes(LLAMA_8B, LoraSpec(enabled=True, max_rank=16, max_loras=2)) == expected
    assert lora_bytes(LLAMA_8B, LoraSpec(enabled=False, max_rank=16, max_loras=2)) == 0


def test_shipped_architectures_match_the_published_ones() -> None:
    reg = load_registry(SHIPPED)
    assert reg.model("llama-3.1-8b-fp8").architecture == LLAMA_8B
    assert reg.model("llama-3.1-70b-awq").architecture == LLAMA_70B


def test_shipped_plan_8b_fits() -> None:
    reg = load_registry(SHIPPED)
    spec = reg.model("llama-3.1-8b-fp8")
    assert (spec.max_model_len, spec.concurrent_seqs, spec.kv_cache_dtype) == (8192, 8, "fp8")
    p = plan_registry(reg).model("llama-3.1-8b-fp8")
    kv = KV_TOKEN_8B_FP8 * 8192 * 8
    assert kv == 4 * GIB
    lora = 167_772_160  # 2 slots of rank 16, as above
    assert p.weights_gib == pytest.approx(WEIGHTS_8B_FP8 / GIB)
    assert p.weights_gib == pytest.approx(8.4575, abs=1e-4)
    assert p.kv_gib == 4.0
    assert p.kv_cache_bytes == kv
    assert p.lora_gib == lora / GIB == 0.15625
    assert p.overhead_gib == RUNTIME_OVERHEAD_GIB + 0.15625
    assert p.total_gib == pytest.approx(8.4575 + 4 + RUNTIME_OVERHEAD_GIB + 0.15625, abs=1e-4)
    assert p.verdict is Verdict.FITS
    assert p.offload_gib == 0
    # the exact pool, and a share of the card that covers the plan (14.1138 / 24, rounded up): vLLM's
    # start-up check refuses a second engine under its default share of 0.92
    assert vllm_memory_args(p, budget_gib=24, platform=Platform.CUDA) == [
        "--kv-cache-memory-bytes",
        str(kv),
        "--gpu-memory-utilization",
        "0.588075",
    ]


def test_shipped_plan_70b_needs_offload() -> None:
    reg = load_registry(SHIPPED)
    spec = reg.model("llama-3.1-70b-awq")
    assert (spec.max_model_len, spec.concurrent_seqs, spec.kv_cache_dtype) == (8192, 1, "fp8")
    plan = plan_registry(reg)
    p = plan.model("llama-3.1-70b-awq")
    kv = KV_TOKEN_70B_FP8 * 8192 * 1
    assert kv == 1_342_177_280  # 1.25 GiB
    weights_gib = WEIGHTS_70B_AWQ / GIB  # 37.0366...
    need = weights_gib + 1.25 + RUNTIME_OVERHEAD_GIB  # 39.79 GiB
    short = need - plan.usable_gib  # 39.79 - 23 = 16.79 GiB
    assert short == pytest.approx(16.7866, abs=1e-4)
    assert p.weights_gib == pytest.approx(weights_gib)
    assert p.kv_gib == 1.25
    assert p.verdict is Verdict.NEEDS_OFFLOAD
    assert p.offload_gib == 17.0  # 16.79 rounded up to the next half GiB, as the registry entry says
    assert spec.cpu_offload_gib == 17
    assert p.total_gib == pytest.approx(need - 17.0)
    assert p.total_gib <= plan.usable_gib
    assert vllm_memory_args(p, budget_gib=24, platform=Platform.CUDA) == [
        "--kv-cache-memory-bytes",
        "1342177280",
        "--gpu-memory-utilization",
        "0.949444",  # 22.7866 / 24, rounded up
        "--cpu-offload-gb",
        "17",
    ]


def test_shipped_plan_verdicts_and_sets() -> None:
    plan = plan_registry(load_registry(SHIPPED))
    verdicts = {m.name: m.verdict for m in plan.models}
    assert verdicts == {
        "llama-3.1-70b-awq": Verdict.NEEDS_OFFLOAD,
        "mixtral-8x7b-awq": Verdict.NEEDS_OFFLOAD,  # ~23 GiB of weights: borderline, a little offload
        "qwen2.5-32b-awq": Verdict.FITS,
        "qwen2.5-14b-awq": Verdict.FITS,
        "llama-3.1-8b-fp8": Verdict.FITS,
        "mistral-7b-fp8": Verdict.FITS,
        "phi-3-mini-fp8": Verdict.FITS,
        "mistral-nemo-12b-fp8": Verdict.FITS,
    }
    assert 22.5 < plan.model("mixtral-8x7b-awq").weights_gib < 24
    assert plan.co_resident_sets  # something can share the card
    for names in plan.co_resident_sets:
        assert not {"llama-3.1-8b-fp8", "llama-3.1-70b-awq"} <= set(names)
        assert sum(plan.model(n).total_gib for n in names) <= plan.usable_gib
    assert ("llama-3.1-8b-fp8", "phi-3-mini-fp8") in plan.co_resident_sets
    assert not plan.can_coreside({"llama-3.1-8b-fp8", "llama-3.1-70b-awq"})
    assert plan.can_coreside({"llama-3.1-70b-awq"})  # alone, with its offload


def test_mistral_nemo_uses_its_declared_head_dim() -> None:
    nemo = load_registry(SHIPPED).model("mistral-nemo-12b-fp8").architecture
    assert nemo is not None and nemo.kv_head_dim == 128  # not 5120 / 32 = 160
    # q is 5120 -> 32 x 128 = 4096 wide; k, v 5120 -> 8 x 128 = 1024; o 4096 -> 5120
    attn = 5120 * 4096 + 2 * 5120 * 1024 + 4096 * 5120
    mlp = 3 * 5120 * 14336
    assert count_params(nemo).linear == 40 * (attn + mlp)
    assert kv_bytes_per_token(nemo, 1) == 2 * 40 * 8 * 128


def test_mixtral_counts_every_expert_and_its_router() -> None:
    mixtral = load_registry(SHIPPED).model("mixtral-8x7b-awq").architecture
    assert mixtral is not None
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024
    experts = 8 * 3 * 4096 * 14336
    params = count_params(mixtral)
    assert params.linear == 32 * (attn + experts)
    router = 32 * 4096 * 8
    assert params.unquantized == 2 * 32000 * 4096 + 32 * 2 * 4096 + 4096 + router
    assert params.total == pytest.approx(46.7e9, rel=0.01)  # Mistral publishes 46.7B


def test_tied_embeddings_are_counted_once() -> None:
    tied = LLAMA_8B.model_copy(update={"tie_word_embeddings": True})
    assert count_params(LLAMA_8B).unquantized - count_params(tied).unquantized == 128256 * 4096


def _plan_of(tmp_path: Path, text: str) -> Plan:
    path = tmp_path / "reg.yaml"
    path.write_text(text)
    return plan_registry(load_registry(path))


SMALL = """\
gpu: {budget_gib: 24, headroom_gib: 1, platform: %s}
models:
  - name: small
    source: org/small
    max_model_len: 4096
    concurrent_seqs: %d
    architecture: {num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512, num_attention_heads: 4,
                   num_key_value_heads: 2, vocab_size: 1000}
  - name: declared
    source: org/declared
    max_model_len: 4096
    params_b: 7
    quantization: fp8
"""


def test_never_fits_when_kv_alone_exceeds_the_card(tmp_path: Path) -> None:
    # KV per token: 2 x 2 layers x 2 KV heads x 64 head_dim x 2 bytes = 1 KiB
    # x 4096 tokens x 8192 seqs = 32 GiB
    plan = _plan_of(tmp_path, SMALL % ("cuda", 8192))
    p = plan.model("small")
    assert p.kv_gib == 32
    assert p.verdict is Verdict.NEVER_FITS
    assert "lower max_model_len to at most 2560" in p.notes[-1]
    assert p.offload_gib == 0
    assert not plan.can_coreside({"small"})


def test_declared_params_only_size_the_weights(tmp_path: Path) -> None:
    plan = _plan_of(tmp_path, SMALL % ("cuda", 1))
    p = plan.model("declared")
    assert p.weights_gib == pytest.approx(7e9 / GIB)  # 7B at 8 bits
    assert p.kv_gib == 0 and p.kv_cache_bytes == 0
    assert p.verdict is Verdict.FITS
    # without a KV figure the engine gets a share of the card instead of an exact pool
    share = p.total_gib / 24
    assert vllm_memory_args(p, budget_gib=24, platform=Platform.CUDA) == [
        "--gpu-memory-utilization",
        f"{share:.3f}",
    ]
    # vLLM on the CPU refuses to start without an explicit KV figure: it always gets one.
    assert vllm_memory_args(p, budget_gib=24, platform=Platform.CPU) == [
        "--kv-cache-memory-bytes",
        str(MIN_KV_CACHE_BYTES),
    ]


def test_cpu_platform_uses_its_own_overhead_and_warns(tmp_path: Path) -> None:
    plan = _plan_of(tmp_path, SMALL % ("cpu", 1))
    assert plan.model("small").overhead_gib == planner.CPU_RUNTIME_OVERHEAD_GIB
    assert any("platform cpu" in w for w in plan.warnings)


def test_budget_override_and_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = load_registry(SHIPPED)
    big = plan_registry(shipped, budget_gib=48)
    assert big.budget_gib == 48 and big.usable_gib == 47
    assert big.model("llama-3.1-70b-awq").verdict is Verdict.FITS
    assert big.model("llama-3.1-70b-awq").offload_gib == 0

    auto = (SMALL % ("cuda", 1)).replace("budget_gib: 24", "budget_gib: auto")
    monkeypatch.setattr(planner, "detect_budget_gib", lambda: None)
    plan = _plan_of(tmp_path, auto)
    assert plan.budget_gib == planner.FALLBACK_BUDGET_GIB
    assert any("no GPU was found" in w for w in plan.warnings)
    monkeypatch.setattr(planner, "detect_budget_gib", lambda: 80.0)
    assert _plan_of(tmp_path, auto).budget_gib == 80.0


def _mp(name: str, total: float, verdict: Verdict = Verdict.FITS) -> ModelPlan:
    return ModelPlan(
        name=name,
        weights_gib=total,
        kv_gib=0,
        overhead_gib=0,
        offload_gib=0,
        total_gib=total,
        verdict=verdict,
        kv_cache_bytes=0,
    )


def test_co_resident_sets_are_maximal_and_skip_offloaded_models() -> None:
    models = (_mp("a", 10), _mp("b", 10), _mp("c", 5), _mp("big", 20, Verdict.NEEDS_OFFLOAD))
    # a+b = 20, a+c = 15, b+c = 15 fit in 23; a+b+c = 25 does not; 'big' always runs alone
    assert co_resident_sets(models, 23) == (("a", "b"), ("a", "c"), ("b", "c"))
    assert co_resident_sets(models, 25) == (("a", "b", "c"),)
    assert co_resident_sets(models, 9) == ()


def test_measured_footprint_replaces_the_estimate() -> None:
    reg = load_registry(SHIPPED)
    estimated = plan_registry(reg)
    assert ("llama-3.1-8b-fp8", "phi-3-mini-fp8") in estimated.co_resident_sets
    measured = plan_registry(reg, measured_gib={"llama-3.1-8b-fp8": 16.0})
    assert measured.model("llama-3.1-8b-fp8").resident_gib == 16.0
    assert measured.model("llama-3.1-8b-fp8").total_gib == estimated.model("llama-3.1-8b-fp8").total_gib
    assert ("llama-3.1-8b-fp8", "phi-3-mini-fp8") not in measured.co_resident_sets  # 16 + 8.24 > 23


def test_format_plan_is_an_aligned_table() -> None:
    plan = plan_registry(load_registry(SHIPPED))
    text = format_plan(plan)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = lines[header + 2 : header + 2 + len(plan.models)]
    assert [r.split()[0] for r in rows] == [m.name for m in plan.models]
    column = lines[header].index("verdict")
    assert all(r[column:].split()[0] in {v.value for v in Verdict} for r in rows)
    total_end = lines[header].index("total") + len("total")
    assert all(r[total_end - 1] != " " and r[total_end] == " " for r in rows)  # right-aligned numbers
    assert "llama-3.1-8b-fp8 + phi-3-mini-fp8" in text
    assert "offload 17 GiB" in text
