"""When ``--quantization`` reaches vLLM: read from the checkpoint's ``config.json`` or the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines.checkpoints import CheckpointRead, read_quant_method
from engines.engine_args import plan_report
from engines.plan_text import check_plan, check_registry
from engines.planner import plan_registry
from engines.quantization import (
    FROM_CONFIG,
    FROM_REGISTRY,
    UNKNOWN,
    CheckpointInfo,
    decide,
    decide_for,
    quantization_findings,
)
from engines.registry import Platform, Quantization, RegistryError, load_registry
from engines.vllm import LaunchConfig, build_argv

SHIPPED = Path(__file__).resolve().parents[2] / "model_registry.yaml"

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


# --- the decision, pure ------------------------------------------------------------------------------------


def ckpt(method: str | None, known_from: str = FROM_CONFIG) -> CheckpointInfo:
    return CheckpointInfo(method, known_from)


@pytest.mark.parametrize(
    ("requested", "checkpoint", "platform", "flag"),
    [
        # an override vLLM registers for the checkpoint's method (AutoAWQConfig / AutoGPTQConfig)
        (Quantization.AWQ_MARLIN, ckpt("awq"), Platform.CUDA, "awq_marlin"),
        (Quantization.AWQ, ckpt("awq"), Platform.CUDA, "awq_marlin"),
        (Quantization.GPTQ_MARLIN, ckpt("gptq"), Platform.CUDA, "gptq_marlin"),
        (Quantization.GPTQ_MARLIN, ckpt("gptq"), Platform.CPU, "gptq_marlin"),
        # AutoAWQConfig.override_quantization_method returns None on the CPU: awq_marlin would be refused
        (Quantization.AWQ_MARLIN, ckpt("awq"), Platform.CPU, None),
        # online quantization of an unquantized checkpoint
        (Quantization.FP8, ckpt(None), Platform.CUDA, "fp8"),
        (Quantization.FP8, ckpt(None, FROM_REGISTRY), Platform.CUDA, "fp8"),
        # already quantized: vLLM reads the method itself; fp8 on compressed-tensors would be refused
        (Quantization.FP8, ckpt("fp8"), Platform.CUDA, None),
        (Quantization.FP8, ckpt("compressed-tensors"), Platform.CUDA, None),
        (Quantization.AWQ_MARLIN, ckpt("compressed-tensors"), Platform.CUDA, None),
        (Quantization.NONE, ckpt("awq"), Platform.CUDA, None),
        (Quantization.NONE, ckpt(None), Platform.CUDA, None),
        # what vLLM cannot do: no flag (and a registry problem, below)
        (Quantization.AWQ_MARLIN, ckpt(None), Platform.CUDA, None),
        (Quantization.BITSANDBYTES, ckpt(None), Platform.CUDA, None),
        (Quantization.FP8, ckpt("awq"), Platform.CUDA, None),
        # nothing known offline: passed as written (and `onecard check` warns)
        (Quantization.FP8, ckpt(None, UNKNOWN), Platform.CUDA, "fp8"),
    ],
)
def test_decision_table(
    requested: Quantization, checkpoint: CheckpointInfo, platform: Platform, flag: str | None
) -> None:
    effective = {Quantization.AWQ: Quantization.AWQ_MARLIN, Quantization.GPTQ: Quantization.GPTQ_MARLIN}
    d = decide(effective.get(requested, requested), checkpoint, platform=platform)
    assert d.flag == flag
    assert d.reason


def test_problems_where_vllm_cannot_run_the_planned_format() -> None:
    assert decide(Quantization.AWQ_MARLIN, ckpt(None), platform=Platform.CUDA).problem
    assert decide(Quantization.BITSANDBYTES, ckpt(None), platform=Platform.CUDA).problem
    assert decide(Quantization.FP8, ckpt("awq"), platform=Platform.CUDA).problem
    for fine in (
        decide(Quantization.FP8, ckpt("compressed-tensors"), platform=Platform.CUDA),
        decide(Quantization.AWQ_MARLIN, ckpt("awq"), platform=Platform.CPU),
        decide(Quantization.FP8, ckpt(None), platform=Platform.CUDA),
    ):
        assert fine.problem is None and fine.warning is None
    assert decide(Quantization.FP8, ckpt(None, UNKNOWN), platform=Platform.CUDA).warning
    assert decide(Quantization.NONE, ckpt("fp8"), platform=Platform.CUDA).warning


def test_config_json_is_read_as_vllm_reads_it(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_CONFIG, "quantization_config": {"quant_method": "Compressed_Tensors"}}))
    assert read_quant_method(cfg) == CheckpointRead("compressed-tensors", found=True)
    cfg.write_text(json.dumps({**TINY_CONFIG, "compression_config": {"quant_method": "compressed-tensors"}}))
    assert read_quant_method(cfg).method == "compressed-tensors"
    cfg.write_text(json.dumps({"text_config": {**TINY_CONFIG, "quantization_config": {"quant_method": "awq"}}}))
    assert read_quant_method(cfg).method == "awq"
    cfg.write_text(json.dumps(TINY_CONFIG))
    assert read_quant_method(cfg) == CheckpointRead(None, found=True)
    assert read_quant_method(tmp_path / "absent.json") == CheckpointRead(None, found=False)


# --- through the registry ------------------------------------------------------------------------------------


def test_shipped_registry_decisions() -> None:
    reg = load_registry(SHIPPED)
    flags = {m.name: decide_for(reg, m).flag for m in reg.models}
    assert flags == {
        "llama-3.1-70b-awq": "awq_marlin",
        "mixtral-8x7b-awq": "awq_marlin",
        "qwen2.5-32b-awq": "awq_marlin",
        "qwen2.5-14b-awq": "awq_marlin",
        "llama-3.1-8b-fp8": None,  # compressed-tensors: vLLM refuses --quantization fp8
        "mistral-7b-fp8": None,
        "phi-3-mini-fp8": None,
        "mistral-nemo-12b-fp8": None,
    }
    assert reg.model("llama-3.1-8b-fp8").checkpoint_quant_method == "compressed-tensors"
    assert quantization_findings(reg) == ([], [])


def test_local_config_json_wins_over_the_declared_method(tmp_path: Path) -> None:
    model_folder(tmp_path, "ct", COMPRESSED_TENSORS_FP8)
    reg_path = registry_with(
        tmp_path,
        [
            {
                "name": "ct",
                "source": "./ct",
                "quantization": "fp8",
                "checkpoint_quant_method": "none",
                "max_model_len": 1024,
            }
        ],
    )
    reg = load_registry(reg_path)
    d = decide_for(reg, reg.model("ct"))
    assert (d.flag, d.checkpoint) == (None, CheckpointInfo("compressed-tensors", FROM_CONFIG))
    (tmp_path / "ct" / "config.json").unlink()  # read once, at load: every later decision (each engine
    assert decide_for(reg, reg.model("ct")) == d  # start, each console poll) reuses what it said
    problems, warnings = quantization_findings(reg)
    assert problems == []
    assert len(warnings) == 1 and "field 'checkpoint_quant_method'" in warnings[0] and "config.json" in warnings[0]


def test_check_reports_a_flag_vllm_would_refuse(tmp_path: Path) -> None:
    model_folder(tmp_path, "bf16", None)
    reg_path = registry_with(
        tmp_path, [{"name": "m", "source": "./bf16", "quantization": "awq_marlin", "max_model_len": 1024}]
    )
    problems = check_registry(reg_path)
    assert len(problems) == 1
    assert "model 'm': field 'quantization'" in problems[0] and "unquantized" in problems[0]


def test_hub_id_without_a_declared_method_warns(tmp_path: Path) -> None:
    reg_path = registry_with(
        tmp_path, [{"name": "m", "source": "org/m-fp8", "quantization": "fp8", "params_b": 1, "max_model_len": 1024}]
    )
    reg = load_registry(reg_path)
    assert decide_for(reg, reg.model("m")).flag == "fp8"
    _, warnings = check_plan(reg, plan_registry(reg))
    assert any("field 'checkpoint_quant_method'" in w for w in warnings)


def test_checkpoint_quant_method_is_validated_with_a_friendly_error(tmp_path: Path) -> None:
    reg_path = registry_with(
        tmp_path,
        [{"name": "m", "source": "org/m", "params_b": 1, "max_model_len": 1024, "checkpoint_quant_method": "awk"}],
    )
    with pytest.raises(RegistryError) as err:
        load_registry(reg_path)
    (message,) = err.value.problems
    assert "model 'm'" in message and "'checkpoint_quant_method'" in message and "did you mean 'awq'" in message
    ok = registry_with(
        tmp_path,
        [
            {
                "name": "m",
                "source": "org/m",
                "params_b": 1,
                "max_model_len": 1024,
                "checkpoint_quant_method": "Compressed_Tensors",
            }
        ],
    )
    assert load_registry(ok).model("m").checkpoint_quant_method == "compressed-tensors"


# --- one source of truth for the flags -----------------------------------------------------------------------


def test_plan_engine_args_are_the_launch_argv_without_host_and_port(tmp_path: Path) -> None:
    model_folder(tmp_path, "ct", COMPRESSED_TENSORS_FP8)
    reg_path = registry_with(
        tmp_path,
        [
            {
                "name": "ct",
                "source": "./ct",
                "quantization": "fp8",
                "max_model_len": 1024,
                "lora": {"enabled": True, "max_rank": 8, "max_loras": 1},
            }
        ],
    )
    for path in (reg_path, SHIPPED):
        reg = load_registry(path)
        report = {m["name"]: m for m in plan_report(reg, plan_registry(reg))["models"]}
        for spec in reg.models:
            argv = argv_for(path, spec.name)
            assert argv[:2] == ["vllm", "serve"]
            assert argv[3:7] == ["--host", "127.0.0.1", "--port", "8123"]
            assert report[spec.name]["engine_args"] == [argv[2], *argv[7:]]
            assert report[spec.name]["quantization"]["flag"] == flag_value(argv, "--quantization")
    assert "--quantization" not in report["llama-3.1-8b-fp8"]["engine_args"]
    assert flag_value(report["llama-3.1-70b-awq"]["engine_args"], "--cpu-offload-gb") == "17"


def test_a_method_the_planner_cannot_size_is_left_to_vllm() -> None:
    d = decide(Quantization.FP8, ckpt("mxfp4"), platform=Platform.CUDA)
    assert d.flag is None and d.problem is None and "mxfp4" in d.reason
