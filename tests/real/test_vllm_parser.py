"""vLLM's own code checks our engine command lines and our ``--quantization`` rule (no engine started).

One subprocess with the CPU vLLM venv's Python (vLLM 0.32) does two things:

* parses every engine argv built for the shipped ``model_registry.yaml`` (planned for CUDA, as on the
  lab's box) and for the demo registry with the parser ``vllm serve`` itself builds
  (``vllm/entrypoints/cli/serve.py``, ``ServeSubcommand.subparser_init`` -> ``make_arg_parser`` in
  ``vllm/entrypoints/launchers/cli_args.py``), runs ``ServeSubcommand.validate`` and turns the result
  into ``AsyncEngineArgs`` (``vllm/engine/arg_utils.py``, ``from_cli_args``), whose values we compare;
* builds vLLM's ``ModelConfig`` for small local checkpoints whose ``config.json`` declares a quantization
  method, with and without ``--quantization``: ``ModelConfig._verify_quantization`` is the rule that
  ``engines/quantization.py`` restates, so the two must agree (on the CPU platform, the one this build has).

The CPU build's parser takes the CUDA plan's flags as they are (``--enable-sleep-mode``,
``--kv-cache-dtype fp8``, ``--cpu-offload-gb``, ``--quantization awq_marlin``): parsing does not depend on
the platform. What the CPU platform refuses (sleep mode, AWQ-Marlin) it refuses later, at engine start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engines.cpu_setup import build_demo_models, default_home, vllm_venv
from engines.engine_args import MIN_KV_CACHE_BYTES, engine_args
from engines.planner import plan_registry
from engines.provenance import vllm_version_of
from engines.quantization import FROM_CONFIG, CheckpointInfo, decide, decide_for
from engines.registry import Platform, Quantization, Registry, load_registry
from gateway.serve import demo_registry
from tests.support import ROOT

VLLM_PYTHON = vllm_venv() / "bin" / "python"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"the CPU vLLM venv is absent ({vllm_venv()}); `onecard setup-cpu-engine` builds it",
    ),
]

#: Runs inside the vLLM venv: reads {"parse": [argv...], "verify": [{"model", "quantization"}...]} on stdin.
VLLM_SIDE = r"""
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

FIELDS = ("model", "served_model_name", "max_model_len", "quantization", "dtype", "kv_cache_dtype",
          "kv_cache_memory_bytes", "gpu_memory_utilization", "cpu_offload_gb", "enable_prefix_caching",
          "enable_lora", "max_lora_rank", "max_loras", "enable_sleep_mode", "enforce_eager", "seed", "revision",
          "scheduling_policy")
request = json.load(sys.stdin)
# Parsing only: with HF_HUB_OFFLINE set, EngineArgs.__post_init__ (vllm/engine/arg_utils.py) resolves a hub id
# to its downloaded snapshot, and the lab's models are not downloaded here. The ModelConfig checks below
# use local folders and run offline again.
import huggingface_hub.constants as hub
hub.HF_HUB_OFFLINE = False
serve = ServeSubcommand()
parser = FlexibleArgumentParser(prog="vllm")
serve.subparser_init(parser.add_subparsers(dest="subparser"))
parsed = []
for argv in request["parse"]:
    try:
        args = parser.parse_args(argv)
        serve.validate(args)
        if args.model_tag is not None:  # as ServeSubcommand.cmd does before it starts anything
            args.model = args.model_tag
        engine = AsyncEngineArgs.from_cli_args(args)
        parsed.append({"ok": True, "values": {f: getattr(engine, f) for f in FIELDS}})
    except BaseException as e:  # argparse exits with SystemExit on a refused flag
        parsed.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
hub.HF_HUB_OFFLINE = True
from vllm.config import ModelConfig
verified = []
for case in request["verify"]:
    try:
        ModelConfig(model=case["model"], quantization=case["quantization"], dtype="float32", max_model_len=512)
        verified.append({"ok": True})
    except Exception as e:
        verified.append({"ok": False, "error": str(e)})
json.dump({"parse": parsed, "verify": verified}, sys.stdout)
"""

#: quantization_config blocks as published checkpoints carry them.
QUANT_CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "compressed-tensors": {
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
    },
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}

#: (checkpoint, requested) pairs, and whether vLLM refuses the requested value as the flag.
REFUSED = {
    ("compressed-tensors", Quantization.FP8): True,  # the defect: fp8 on a compressed-tensors FP8 checkpoint
    ("compressed-tensors", Quantization.NONE): False,
    ("none", Quantization.FP8): False,  # online quantization
    ("fp8", Quantization.FP8): False,
    ("awq", Quantization.AWQ_MARLIN): True,  # on the CPU: AutoAWQConfig registers no override there
    ("awq", Quantization.NONE): False,
    ("awq", Quantization.FP8): True,
    ("gptq", Quantization.GPTQ_MARLIN): False,  # AutoGPTQConfig's override holds on every platform
}


def registry_argvs(registry: Registry) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(model, argv after ``vllm``, expected parsed values) for every model of a registry."""
    plan = plan_registry(registry)
    out = []
    for spec in registry.models:
        mp = plan.model(spec.name)
        args = engine_args(registry, spec, mp, platform=plan.platform, budget_gib=plan.budget_gib)
        argv = ["serve", args[0], "--host", "127.0.0.1", "--port", "8123", *args[1:]]
        expected: dict[str, Any] = {
            "model": registry.locate(spec.source),
            "served_model_name": [spec.name],
            "max_model_len": spec.max_model_len,
            "quantization": decide_for(registry, spec, platform=plan.platform).flag,
            "kv_cache_memory_bytes": max(mp.kv_cache_bytes, MIN_KV_CACHE_BYTES),
            "cpu_offload_gb": mp.offload_gib,
            "enable_prefix_caching": spec.enable_prefix_caching,
            "enable_lora": spec.lora.enabled,
            "enable_sleep_mode": plan.platform is Platform.CUDA and spec.sleep_level > 0,
            "kv_cache_dtype": spec.kv_cache_dtype,
            "scheduling_policy": "priority",  # requests carry their user's class as vLLM's priority
        }
        if spec.lora.enabled:
            expected |= {"max_lora_rank": spec.lora.max_rank, "max_loras": spec.lora.max_loras}
        if "--gpu-memory-utilization" in args:
            expected["gpu_memory_utilization"] = float(args[args.index("--gpu-memory-utilization") + 1])
        if "--seed" in spec.extra_args:
            expected["seed"] = int(spec.extra_args[list(spec.extra_args).index("--seed") + 1])
        out.append((spec.name, argv, expected))
    return out


def checkpoint(root: Path, method: str, template: Path) -> Path:
    """A tiny model folder (config and tokenizer of the demo model) whose config.json declares ``method``."""
    folder = root / f"ckpt-{method}"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (template / name).is_file():
            shutil.copy(template / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    if QUANT_CONFIGS[method] is not None:
        config["quantization_config"] = QUANT_CONFIGS[method]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def ask_vllm(request: dict[str, Any], folder: Path) -> tuple[dict[str, Any], str]:
    """Run ``VLLM_SIDE`` in the CPU build's interpreter on ``request``; its JSON answer and its stderr."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(Path.home()),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TMPDIR": str(folder),
    }
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", VLLM_SIDE],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer, proc.stderr


@pytest.fixture(scope="module")
def vllm_says(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything asked of vLLM in one subprocess (importing vLLM takes most of its time)."""
    root = tmp_path_factory.mktemp("vllm-parser")
    demo = build_demo_models(default_home() / "demo-models")
    shipped = load_registry(ROOT / "model_registry.yaml")
    assert shipped.gpu.platform is Platform.CUDA  # planned as the lab's box runs it
    demo_reg = load_registry(demo_registry(root / "demo.yaml", models_dir=demo.base.parent, executable=VLLM_PYTHON))
    cases = [("shipped", *c) for c in registry_argvs(shipped)] + [("demo", *c) for c in registry_argvs(demo_reg)]
    folders = {method: checkpoint(root, method, demo.base) for method in QUANT_CONFIGS}
    verify: list[dict[str, Any]] = []
    for (method, requested), _ in REFUSED.items():
        decision = decide(
            requested, CheckpointInfo(None if method == "none" else method, FROM_CONFIG), platform=Platform.CPU
        )
        raw = None if requested is Quantization.NONE else requested.value
        verify.append({"model": str(folders[method]), "quantization": raw, "case": (method, requested)})
        verify.append(
            {"model": str(folders[method]), "quantization": decision.flag, "case": (method, requested), "ours": True}
        )
    request = {
        "parse": [argv for _, _, argv, _ in cases],
        "verify": [{"model": v["model"], "quantization": v["quantization"]} for v in verify],
    }
    answer, _ = ask_vllm(request, root)
    return {
        "cases": cases,
        "parsed": answer["parse"],
        "verify": verify,
        "verified": answer["verify"],
        "demo_models": len(demo_reg.models),
    }


def test_vllm_parser_accepts_every_engine_argv(vllm_says: dict[str, Any]) -> None:
    cases, parsed = vllm_says["cases"], vllm_says["parsed"]
    assert {reg for reg, *_ in cases} == {"shipped", "demo"}
    shipped = len(load_registry(ROOT / "model_registry.yaml").models)
    assert len(cases) == shipped + vllm_says["demo_models"] and vllm_says["demo_models"] >= 3
    refused = [f"{reg}/{name}: {p['error']}" for (reg, name, _, _), p in zip(cases, parsed, strict=True) if not p["ok"]]
    assert refused == []
    for (reg, name, argv, expected), p in zip(cases, parsed, strict=True):
        got = p["values"]
        for key, want in expected.items():
            value = bool(got[key]) if isinstance(want, bool) else got[key]  # vLLM leaves some flags None when off
            assert value == want, f"{reg}/{name}: {key} parsed as {got[key]!r}, expected {want!r}; argv {argv}"


def test_vllm_parser_refuses_a_bad_flag_value(tmp_path: Path) -> None:
    """The check can fail: vLLM's parser refuses what it does not take (here an unknown KV-cache dtype)."""
    request = {"parse": [["serve", "org/m", "--kv-cache-dtype", "fp9"]], "verify": []}
    answer, stderr = ask_vllm(request, tmp_path)
    (result,) = answer["parse"]
    assert result["ok"] is False and "SystemExit" in result["error"]
    assert "fp9" in stderr


def test_vllm_model_config_agrees_with_our_quantization_rule(vllm_says: dict[str, Any]) -> None:
    mismatch = "does not match the quantization method specified in the `quantization` argument"
    for v, answer in zip(vllm_says["verify"], vllm_says["verified"], strict=True):
        method, requested = v["case"]
        what = f"{method} checkpoint, --quantization {v['quantization']}"
        if v.get("ours"):
            assert answer["ok"], f"vLLM refuses our decision for a {what}: {answer.get('error')}"
        elif REFUSED[(method, requested)]:
            assert not answer["ok"], f"vLLM takes a {what}, which our rule drops"
            assert mismatch in answer["error"], answer["error"]
        else:
            assert answer["ok"], f"vLLM refuses a {what}: {answer.get('error')}"


def test_the_cpu_builds_version_is_read_from_its_executable() -> None:
    """What ``/v1/models`` shows before any engine ran: the version of the executable's ``vllm`` distribution."""
    assert vllm_version_of(str(vllm_venv() / "bin" / "vllm")) == "0.32.0+cpu"
