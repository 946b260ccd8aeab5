"""When ``--quantization`` reaches vLLM: read from the checkpoint's ``config.json`` or the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from engines.planner import plan_registry
from engines.registry import load_registry
from engines.vllm import LaunchConfig, build_argv

#: A Llama-shaped config.json small enough to plan, as a published checkpoint would carry it.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

#: What llm-compressor writes for an FP8 checkpoint (RedHatAI / neuralmagic FP8 models look like this).
COMPRESSED_TENSORS_FP8: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}


def model_folder(root: Path, name: str, quantization_config: dict[str, Any] | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config = dict(TINY_CONFIG)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def registry_with(tmp_path: Path, entries: list[dict[str, Any]], *, platform: str = "cuda") -> Path:
    path = tmp_path / "registry.yaml"
    data = {"gpu": {"budget_gib": 24, "headroom_gib": 1, "platform": platform}, "models": entries}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def argv_for(registry_path: Path, name: str) -> list[str]:
    reg = load_registry(registry_path)
    plan = plan_registry(reg)
    launch = LaunchConfig(
        registry=reg,
        executable="vllm",
        platform=reg.gpu.platform,
        budget_gib=plan.budget_gib,
        run_dir=registry_path.parent / "run",
    )
    return build_argv(launch, model=reg.model(name), plan=plan.model(name), port=8123)


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_no_fp8_flag_for_a_compressed_tensors_checkpoint(tmp_path: Path) -> None:
    """vLLM refuses ``--quantization fp8`` on a compressed-tensors checkpoint: it must not be passed."""
    model_folder(tmp_path, "llama-fp8-ct", COMPRESSED_TENSORS_FP8)
    reg = registry_with(
        tmp_path, [{"name": "ct", "source": "./llama-fp8-ct", "quantization": "fp8", "max_model_len": 1024}]
    )
    argv = argv_for(reg, "ct")
    assert flag_value(argv, "--quantization") is None, argv


def test_fp8_flag_for_online_quantization_of_an_unquantized_checkpoint(tmp_path: Path) -> None:
    model_folder(tmp_path, "llama-bf16", None)
    reg = registry_with(
        tmp_path, [{"name": "bf16", "source": "./llama-bf16", "quantization": "fp8", "max_model_len": 1024}]
    )
    assert flag_value(argv_for(reg, "bf16"), "--quantization") == "fp8"
