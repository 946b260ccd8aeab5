"""examples/judge.py in pairwise mode against the gateway with stand-in engines: the candidate's answer is
shown first in some items and second in others, drawn per item and the same on every run."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import ROOT, ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)


def judge_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("judge_example", ROOT / "examples" / "judge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[ServerThread]:
    models = [
        standin_model("alpha", aliases=["candidate"]),
        standin_model("beta", aliases=["judge"]),
        standin_model("gamma", aliases=["reference"]),
    ]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=3.5)
    with running_gateway(reg, tmp_path / "run") as server:
        yield server


def test_pairwise_order_is_drawn_per_item(gateway: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    judge = judge_module()
    argv = [
        "--base-url",
        gateway.url + "/v1",
        "--reference",
        "reference",
        "--items",
        "8",
        "--seed",
        "3",
        "--answer-tokens",
        "4",
        "--verdict-tokens",
        "2",
        "--json",
    ]
    assert judge.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["graded"] == 8 and summary["reference"] == "reference"
    firsts = [r["candidate_shown_first"] for r in summary["results"]]
    assert set(firsts) == {True, False}  # both orders occur
    assert firsts == [judge.candidate_first(3, i) for i in range(8)]  # and each is the seeded draw
    assert all(r["reference"] and r["answer"] and r["answer"] != r["reference"] for r in summary["results"])
    # The stand-in judge answers neither letter: unparsed verdicts count as a draw.
    assert all(r["score"] == (0.5 if not r["parsed"] else r["score"]) for r in summary["results"])
    assert judge.parse_choice("B") == "B" and judge.parse_choice("Both are fine") is None
