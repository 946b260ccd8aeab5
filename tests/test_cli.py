"""``onecard check`` and ``onecard plan``, through ``main()`` and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "model_registry.yaml"

BAD = """\
gpu: {budget_gib: 24}
models:
  - name: a
    source: org/a
    max_model_len: 4096
    params_b: 7
    lora: {adapters: {a-r8: {path: ./nowhere}}}
  - name: b
    aliases: [a]
    source: org/b
    max_model_lenght: 4096
    params_b: 7
"""


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_plan_json(data: dict[str, Any]) -> None:
    assert data["budget_gib"] == 24
    models = {m["name"]: m for m in data["models"]}
    for m in models.values():
        keys = {"name", "weights_gib", "kv_gib", "overhead_gib", "total_gib", "verdict", "offload_gib"}
        assert keys <= set(m)
    assert models["llama-3.1-8b-fp8"]["verdict"] == "fits"
    assert models["qwen2.5-14b-awq"]["verdict"] == "fits"
    judge = models["llama-3.1-70b-awq"]
    assert judge["verdict"] != "fits"
    assert judge["offload_gib"] > 0
    assert data["co_resident_sets"]
    for names in data["co_resident_sets"]:
        assert set(names) <= set(models)
        assert not {"llama-3.1-8b-fp8", "llama-3.1-70b-awq"} <= set(names)


def test_plan_json_on_the_shipped_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", str(SHIPPED), "--json")
    assert code == 0
    check_plan_json(json.loads(out))


def test_plan_json_as_a_real_process(tmp_path: Path) -> None:
    # from another directory, with the registry named by the environment
    env = {"ONECARD_REGISTRY": str(SHIPPED), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "plan", "--json"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    check_plan_json(json.loads(proc.stdout))


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "onecard"
    if not exe.exists():
        pytest.skip("the package is not installed in this environment")
    proc = subprocess.run(
        [str(exe), "check", str(SHIPPED)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: {SHIPPED}: 8 models")


def test_registry_defaults_to_the_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ONECARD_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "check")
    assert code == 1
    assert "model_registry.yaml: cannot read the registry" in err
    (tmp_path / "model_registry.yaml").write_text(SHIPPED.read_text())
    code, out, _ = run_main(capsys, "check")
    assert code == 0 and out.startswith("ok: model_registry.yaml")


def test_human_plan_is_a_table_then_the_sets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", str(SHIPPED))
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    for word in ("weights", "kv", "overhead", "offload", "total", "verdict"):
        assert word in lines[header].split()
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 10]}
    assert rows["llama-3.1-8b-fp8"][-1] == "fits"
    assert rows["llama-3.1-70b-awq"][-1] == "needs_offload"
    sets = lines.index("Can share the card:")
    assert sets > header + 9
    assert lines[sets + 1].strip().startswith("llama-3.1-8b-fp8 + phi-3-mini-fp8")


def test_plan_shows_the_quantization_decision_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", str(SHIPPED))
    assert code == 0
    lines = out.splitlines()
    start = lines.index("Quantization (--quantization passed to vLLM):")
    rows = {line.split()[0]: line.split(maxsplit=2) for line in lines[start + 1 : start + 9]}
    assert set(rows) == {m["name"] for m in json.loads(_plan_json(capsys))["models"]}
    assert rows["llama-3.1-70b-awq"][1] == "awq_marlin" and "override" in rows["llama-3.1-70b-awq"][2]
    assert rows["llama-3.1-8b-fp8"][1] == "(none)" and "compressed-tensors" in rows["llama-3.1-8b-fp8"][2]


def _plan_json(capsys: pytest.CaptureFixture[str]) -> str:
    code, out, _ = run_main(capsys, "plan", str(SHIPPED), "--json")
    assert code == 0
    return out


def test_plan_json_gives_engine_args_and_the_quantization_reason(capsys: pytest.CaptureFixture[str]) -> None:
    models = {m["name"]: m for m in json.loads(_plan_json(capsys))["models"]}
    for m in models.values():
        args = m["engine_args"]
        assert "/" in args[0] and not args[0].startswith("-")  # the hub id comes first, as after `vllm serve`
        assert "--host" not in args and "--port" not in args
        assert args[args.index("--served-model-name") + 1] == m["name"]
        assert "--kv-cache-memory-bytes" in args or "--gpu-memory-utilization" in args
        assert m["quantization"]["reason"]
    judge = models["llama-3.1-70b-awq"]
    assert judge["quantization"] == {
        "flag": "awq_marlin",
        "reason": judge["quantization"]["reason"],
        "checkpoint_quant_method": "awq",
        "checkpoint_known_from": "registry",
    }
    args = judge["engine_args"]
    assert args[0] == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    assert args[args.index("--quantization") + 1] == "awq_marlin"
    assert args[args.index("--cpu-offload-gb") + 1] == "17"
    assert "--enable-sleep-mode" in args
    candidate = models["llama-3.1-8b-fp8"]
    assert candidate["quantization"]["flag"] is None
    assert "--quantization" not in candidate["engine_args"]
    assert candidate["engine_args"][-2:] == ["--seed", "0"]  # extra_args come last
    assert {"--enable-lora", "--max-lora-rank", "--max-loras"} <= set(candidate["engine_args"])


def test_plan_budget_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", str(SHIPPED), "--budget-gib", "48", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["budget_gib"] == 48
    assert {m["name"]: m["verdict"] for m in data["models"]}["llama-3.1-70b-awq"] == "fits"
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(SHIPPED), "--budget-gib", "0"])
    assert exit_info.value.code == 2
    assert "the budget must be positive" in capsys.readouterr().err


def test_check_ok_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check", str(SHIPPED))
    assert code == 0, err
    assert out.splitlines()[0] == f"ok: {SHIPPED}: 8 models, 5 aliases, 3 adapters"
    assert "2 need offload (llama-3.1-70b-awq 17 GiB, mixtral-8x7b-awq 3 GiB)" in out
    assert err == ""


def test_check_bad_file_prints_every_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, out, err = run_main(capsys, "check", str(path))
    assert code == 1
    assert out == ""
    messages = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1  # shape errors first: the typo hides nothing else in this pass
    assert "model 'b': unknown key 'max_model_lenght'; did you mean 'max_model_len'?" in messages[0]

    path.write_text(BAD.replace("max_model_lenght", "max_model_len"))
    code, _, err = run_main(capsys, "check", str(path))
    assert code == 1
    messages = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(messages) == 3, err
    assert any("model 'b': field 'aliases'" in m and "'a' is already used" in m for m in messages)
    assert any("model 'a': field 'lora.adapters'" in m and "lora.enabled: true" in m for m in messages)
    assert any("field 'lora.adapters.a-r8.path'" in m and "does not exist" in m for m in messages)
    assert all(str(path) in m for m in messages)
    assert err.splitlines()[-1] == f"3 problems in {path}"


def test_check_never_fits_exits_1_as_a_process(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(
        "models:\n  - name: huge\n    source: org/huge\n    max_model_len: 131072\n    concurrent_seqs: 64\n"
        "    architecture: {num_hidden_layers: 32, hidden_size: 4096, intermediate_size: 14336,\n"
        "                   num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "model 'huge': field 'max_model_len': this model can never fit" in proc.stderr
    assert "lower max_model_len" in proc.stderr


def test_awq_warning_is_printed_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "awq.yaml"
    path.write_text(
        "models:\n  - {name: m, source: org/m, max_model_len: 4096, params_b: 7, quantization: awq}\n"
    )
    code, out, err = run_main(capsys, "check", str(path))
    assert code == 0
    assert (out + err).count("planned and launched as 'awq_marlin'") == 1


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys)
    assert code == 2
    for cmd in SUBCOMMANDS:
        assert cmd.name in err


def test_cli_import_stays_light() -> None:
    code = (
        "import sys, gateway.cli\n"
        "heavy = {'fastapi', 'uvicorn', 'httpx', 'pydantic', 'yaml', 'engines.registry'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"
