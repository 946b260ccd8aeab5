"""``/v1/models`` names the vLLM version of every model from the gateway's start, read from the executable."""

from __future__ import annotations

import sys
import venv
from pathlib import Path

import httpx

from engines.provenance import vllm_version_of
from tests.support import ROOT, running_gateway, standin_model, write_registry


def vllm_env(folder: Path, version: str) -> Path:
    """A virtual environment holding a ``vllm`` distribution of ``version`` and a ``bin/vllm`` entry point.

    The entry point's interpreter is the environment's own Python (as pip writes it); it hands the
    command line to the stand-in engine, run by the test's Python, which has the stand-in's packages.
    """
    venv.create(folder, with_pip=False, symlinks=True)
    site = next((folder / "lib").glob("python3*/site-packages"))
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    exe = folder / "bin" / "vllm"
    exe.write_text(
        f"#!{folder / 'bin' / 'python'}\n"
        "import os, sys\n"
        f"os.environ['PYTHONPATH'] = {str(ROOT)!r}\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, '-m', 'tests.fakes.standin_engine', *sys.argv[1:]])\n"
    )
    exe.chmod(0o755)
    return exe


def test_models_name_the_vllm_version_before_any_engine_ran(tmp_path: Path) -> None:
    exe = vllm_env(tmp_path / "vllm-env", "0.31.7")
    models = [
        standin_model("a", aliases=["first"]),
        standin_model("b", lora={"enabled": True, "max_rank": 8, "adapters": {"b-r8": {"path": "org/b-r8"}}}),
    ]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=exe)
    with running_gateway(reg, tmp_path / "run") as gw:
        cards = httpx.get(f"{gw.url}/v1/models", timeout=10, trust_env=False).json()["data"]
        assert {c["id"] for c in cards} == {"a", "first", "b", "b-r8"}
        assert all(c["onecard"]["state"] == "stopped" for c in cards)  # no engine has run
        assert {c["id"]: c["onecard"]["vllm_version"] for c in cards} == dict.fromkeys(
            ("a", "first", "b", "b-r8"), "0.31.7"
        )


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_version_from_the_interpreter_next_to_the_executable(tmp_path: Path) -> None:
    exe = vllm_env(tmp_path / "env", "0.32.0+cpu")
    assert vllm_version_of(str(exe)) == "0.32.0+cpu"
    # the same interpreter named through /usr/bin/env and found on the PATH the engines get
    env_exe = script(tmp_path / "vllm-env-shebang", "#!/usr/bin/env python3\nraise SystemExit(3)\n")
    assert vllm_version_of(str(env_exe), env={"PATH": f"{tmp_path / 'env' / 'bin'}:/usr/bin:/bin"}) == "0.32.0+cpu"


def test_version_from_dash_dash_version_for_other_executables(tmp_path: Path) -> None:
    wrapper = script(tmp_path / "vllm-wrapper", '#!/bin/sh\n[ "$1" = --version ] && echo 0.33.0 && exit 0\nexit 2\n')
    assert vllm_version_of(str(wrapper)) == "0.33.0"
    chatty = script(tmp_path / "vllm-chatty", "#!/bin/sh\necho 'INFO starting up'\necho 'not a version'\n")
    assert vllm_version_of(str(chatty)) is None
    failing = script(tmp_path / "vllm-failing", "#!/bin/sh\necho 0.33.0\nexit 1\n")
    assert vllm_version_of(str(failing)) is None
    assert vllm_version_of(str(tmp_path / "absent")) is None
    assert vllm_version_of("no-such-vllm-executable") is None
