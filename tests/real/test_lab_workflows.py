"""The lab's own tools against ``onecard serve`` with real CPU vLLM engines: lm-eval-harness and a judge loop.

- lm-eval-harness (in a venv of its own, ``tests/real/lm_eval_env.py``) runs ``--model local-completions`` on a
  small multiple-choice task that the test writes (a task YAML plus a local JSONL dataset; nothing from the hub).
  Multiple choice means loglikelihood requests: ``echo: true, logprobs: 1, max_tokens: 1`` completions on token-id
  prompts, which onecard must pass through untouched. The model is random, so the score is arbitrary: the test
  checks that a score in [0, 1] comes back and that every request went through the gateway.
- ``examples/judge.py`` (the ``openai`` SDK) lets ``candidate`` answer and ``judge`` grade; the two cannot be
  resident together, so the loop also exercises swapping.

One gateway serves the module. The judge test runs first and leaves ``tiny-llama-b`` (``judge``) resident, which
lm-eval then uses without another swap (each swap is 15-25 s on the CPU).

lm-eval runs against ``tiny-llama-b``, which the judge test left resident. (vLLM 0.32's CPU build kills a LoRA-enabled
EngineCore when several prompt-logprob requests share a batch, "einsum(): subscript b has size 3 for operand 1 which
does not broadcast with previously seen size 17" in ``_get_prompt_logprobs_dict`` -> ``compute_logits``; so the demo
registry keeps LoRA on ``tiny-llama-lora`` and ``tests/real/test_demo_eval.py`` evaluates every demo model.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Protocol

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.real.conftest import RealVllm
from tests.real.lm_eval_env import LM_EVAL_VERSION, OFFLINE_ENV, setup_lm_eval
from tests.support import ROOT, GatewayProcess

pytestmark = [pytest.mark.vllm]

JUDGE_SCRIPT = ROOT / "examples" / "judge.py"
LM_EVAL_MODEL = "tiny-llama-b"  # resident after the judge test; see the module docstring
TASK = "onecard_mc"

# (question, choices, index of the right answer): 14 items x 4 choices = 56 loglikelihood requests.
MC_ITEMS: list[tuple[str, list[str], int]] = [
    ("The colour of a clear daytime sky is", ["blue", "green", "red", "black"], 0),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Celsius", "Rankine"], 2),
    ("The largest planet in the solar system is", ["Mars", "Venus", "Mercury", "Jupiter"], 3),
    ("A week has this many days:", ["seven", "five", "ten", "three"], 0),
    ("The opposite of hot is", ["warm", "cold", "loud", "fast"], 1),
    ("Bees make", ["milk", "silk", "honey", "wool"], 2),
    ("The capital of France is", ["Rome", "Madrid", "Berlin", "Paris"], 3),
    ("A triangle has this many sides:", ["three", "four", "five", "six"], 0),
    ("The sun rises in the", ["west", "east", "north", "south"], 1),
    ("Ice is the solid form of", ["air", "sand", "water", "salt"], 2),
    ("A baby cat is called a", ["puppy", "calf", "foal", "kitten"], 3),
    ("The first letter of the English alphabet is", ["A", "B", "Z", "Q"], 0),
    ("Plants take in carbon dioxide and give off", ["helium", "oxygen", "smoke", "gold"], 1),
]
CHOICES_PER_ITEM = 4


class Served(Protocol):
    """Anything that serves the gateway's API at ``url`` (``onecard serve`` or ``onecard demo``)."""

    @property
    def url(self) -> str: ...


def metric_values(gw: Served, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one gateway metric family (e.g. ``onecard_requests``), keyed by its sorted labels."""
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
        if s.name == name + "_total" or s.name == name
    }


def requests_by_status(gw: Served, model: str) -> dict[str, float]:
    return {dict(labels)["status"]: value for labels, value in metric_values(gw, "onecard_requests").items()
            if dict(labels).get("model") == model}


def counter(gw: GatewayProcess, name: str, model: str) -> float:
    return sum(v for labels, v in metric_values(gw, name).items() if dict(labels).get("model") == model)


def swaps(gw: GatewayProcess) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = httpx.get(gw.url + "/admin/swaps", timeout=10).json()["swaps"]
    return rows


@pytest.fixture(scope="module")
def gateway(demo_gateway: GatewayProcess) -> GatewayProcess:
    return demo_gateway


@pytest.fixture(scope="module")
def lm_eval_exe() -> Path:
    """lm-eval's executable in its own venv (about 1 min the first time; cached after)."""
    return setup_lm_eval()


def write_task(folder: Path) -> Path:
    """A multiple-choice task over a local JSONL file; returns the folder to pass as ``--include_path``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_ITEMS))
    (folder / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """))
    return folder


@pytest.mark.timeout(600)
def test_judge_script_grades_every_item(gateway: GatewayProcess) -> None:
    items = 4
    before = {m: requests_by_status(gateway, m) for m in ("tiny-llama", "tiny-llama-b")}
    swaps_before = len(swaps(gateway))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(JUDGE_SCRIPT), "--base-url", gateway.url + "/v1", "--items", str(items),
         "--workers", str(items), "--answer-tokens", "24", "--verdict-tokens", "8", "--retries", "0", "--json"],
        capture_output=True, text=True, timeout=480, cwd=ROOT,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"judge.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["items"] == items and summary["graded"] == items and summary["errors"] == 0, summary
    assert isinstance(summary["mean_score"], float) and 1 <= summary["mean_score"] <= 10
    for r in summary["results"]:
        assert r["error"] is None and isinstance(r["score"], float) and 1 <= r["score"] <= 10, r
        assert isinstance(r["answer"], str) and isinstance(r["verdict"], str)

    # Every answer came from tiny-llama (alias candidate), every verdict from tiny-llama-b (alias judge).
    for model in ("tiny-llama", "tiny-llama-b"):
        after = requests_by_status(gateway, model)
        assert after.get("200", 0) - before[model].get("200", 0) == items, (model, after)
        assert set(after) == {"200"}, (model, after)
    # Every worker asks the candidate, then the judge: batched per model, that is two loads, not one per item.
    evicting = [s for s in swaps(gateway)[swaps_before:] if s["evicted"]]
    assert len(evicting) <= 2, evicting
    print(f"judge.py: {items} items in {elapsed:.1f} s, mean score {summary['mean_score']}, "
          f"{summary['parsed']} parsed; {len(evicting)} evicting swaps")


@pytest.mark.timeout(900)  # includes installing lm-eval the first time (about 1 min)
def test_lm_eval_local_completions_reports_a_score(
    gateway: GatewayProcess, real_vllm: RealVllm, lm_eval_exe: Path, tmp_path: Path
) -> None:
    include = write_task(tmp_path / "tasks")
    out_dir = tmp_path / "results"
    tokenizer = real_vllm.models.other  # the tiny-llama-b folder: the same tokenizer the engine uses
    assert tokenizer.name == LM_EVAL_MODEL
    model_args = ",".join([
        f"model={LM_EVAL_MODEL}",
        f"base_url={gateway.url}/v1/completions",
        f"tokenizer={tokenizer}",
        "tokenizer_backend=huggingface",
        "num_concurrent=4",
        "max_retries=2",
        "max_length=512",  # the engine's --max-model-len
        "timeout=300",  # seconds per request: the first one waits for the engine to start
    ])
    cmd = [str(lm_eval_exe), "--model", "local-completions", "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(include), "--output_path", str(out_dir), "--log_samples"]
    requests_before = requests_by_status(gateway, LM_EVAL_MODEL)
    completion_before = counter(gateway, "onecard_completion_tokens", LM_EVAL_MODEL)
    prompt_before = counter(gateway, "onecard_prompt_tokens", LM_EVAL_MODEL)

    started = time.monotonic()
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf")}
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lm_eval failed ({proc.returncode}):\n{log[-5000:]}"

    results_files = sorted(out_dir.rglob("results_*.json"))
    assert len(results_files) == 1, (results_files, log[-3000:])
    report = json.loads(results_files[0].read_text())
    result = report["results"][TASK]
    acc = result["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and not math.isnan(acc), result
    assert result["sample_len"] == len(MC_ITEMS)
    assert report["lm_eval_version"] == LM_EVAL_VERSION

    # Each choice's loglikelihood came from the engine's echoed prompt logprobs: finite, negative, not all equal.
    samples_files = sorted(out_dir.rglob(f"samples_{TASK}_*.jsonl"))
    assert len(samples_files) == 1, samples_files
    samples = [json.loads(line) for line in samples_files[0].read_text().splitlines() if line.strip()]
    assert len(samples) == len(MC_ITEMS)
    loglikelihoods = [float(resp[0][0]) for s in samples for resp in s["resps"]]  # logged as strings
    assert len(loglikelihoods) == len(MC_ITEMS) * CHOICES_PER_ITEM
    assert all(math.isfinite(x) and x < 0 for x in loglikelihoods)
    assert len(set(loglikelihoods)) > 1

    # Every loglikelihood request went through onecard, one completion token each (max_tokens=1, echo=True).
    requests_after = requests_by_status(gateway, LM_EVAL_MODEL)
    expected = len(MC_ITEMS) * CHOICES_PER_ITEM
    assert requests_after.get("200", 0) - requests_before.get("200", 0) == expected, requests_after
    assert {s for s, n in requests_after.items() if n != requests_before.get(s, 0)} == {"200"}, requests_after
    assert counter(gateway, "onecard_completion_tokens", LM_EVAL_MODEL) - completion_before == expected
    assert counter(gateway, "onecard_prompt_tokens", LM_EVAL_MODEL) - prompt_before > expected * 5
    print(f"lm_eval local-completions: acc={acc:.4f} on {len(MC_ITEMS)} items, {expected} requests, {elapsed:.1f} s")
