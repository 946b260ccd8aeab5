"""The demo registry (``onecard demo``): what it offers, and that LoRA lives on an engine of its own."""

from __future__ import annotations

import json
from pathlib import Path

from engines.planner import plan_registry
from engines.registry import load_registry
from engines.vllm import LaunchConfig, build_argv
from gateway.serve import DEMO_ADAPTER, DEMO_CANDIDATE, DEMO_JUDGE, DEMO_LORA_BASE, demo_registry

#: The figures of ``engines/tiny_models.py``'s two models (their config.json, as the planner reads it).
TINY = {"tiny-llama": (2, 128, 4), "tiny-llama-b": (3, 192, 6)}


def fake_models(folder: Path) -> Path:
    for name, (layers, hidden, heads) in TINY.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(
            json.dumps(
                {
                    "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama",
                    "vocab_size": 1280,
                    "hidden_size": hidden,
                    "intermediate_size": hidden * 2,
                    "num_hidden_layers": layers,
                    "num_attention_heads": heads,
                    "num_key_value_heads": 2,
                    "head_dim": 32,
                    "max_position_embeddings": 1024,
                    "torch_dtype": "float32",
                }
            )
        )
    (folder / "tiny-lora").mkdir()
    return folder


def test_candidate_and_judge_are_lora_free_and_the_adapter_has_a_base_of_its_own(tmp_path: Path) -> None:
    models = fake_models(tmp_path / "models")
    reg = load_registry(
        demo_registry(tmp_path / "run" / "demo_registry.yaml", models_dir=models, executable=Path("/usr/bin/true"))
    )
    by_name = {m.name: m for m in reg.models}
    assert reg.resolve("candidate").model.name == DEMO_CANDIDATE and reg.resolve("judge").model.name == DEMO_JUDGE
    assert not by_name[DEMO_CANDIDATE].lora.enabled and not by_name[DEMO_JUDGE].lora.enabled
    lora_base = by_name[DEMO_LORA_BASE]
    assert lora_base.lora.enabled and DEMO_ADAPTER in lora_base.lora.adapters
    assert reg.resolve(DEMO_ADAPTER).model.name == DEMO_LORA_BASE
    assert lora_base.source == by_name[DEMO_CANDIDATE].source  # the adapter's own base weights
    assert lora_base.lora.watch_dirs == (str(tmp_path / "run" / "adapters"),)

    plan = plan_registry(reg)
    assert all(len(s) == 1 for s in plan.co_resident_sets), plan.co_resident_sets  # one resident at a time
    launch = LaunchConfig(
        registry=reg,
        executable=reg.vllm.executable,
        platform=reg.gpu.platform,
        budget_gib=plan.budget_gib,
        run_dir=tmp_path / "run",
    )

    def argv(name: str) -> list[str]:
        return build_argv(launch, model=by_name[name], plan=plan.model(name), port=8000)

    assert "--enable-lora" not in argv(DEMO_CANDIDATE) and "--enable-lora" not in argv(DEMO_JUDGE)
    lora_argv = argv(DEMO_LORA_BASE)
    assert "--enable-lora" in lora_argv
    assert lora_argv[lora_argv.index("--max-num-seqs") + 1] == "1"  # vLLM's CPU LoRA path: one sequence a step
