"""The lab's eval tools, each from its own cached venv, against ``onecard serve`` with real CPU engines.

- AlpacaEval (``alpaca_eval``): local model outputs (the candidate's own answers, made through the
  gateway) against local reference outputs, judged by ``judge`` at the gateway's base URL with
  AlpacaEval's weighted (logprob) annotator; it runs to its leaderboard output.
- lighteval's endpoint model through LiteLLM (``litellm`` as the client) on a small local generation task.

The tiny demo models have random weights: their verdicts mean nothing, but every request, parse and
file is the tools' own. The judge is steered to answer ``m`` or ``M`` with ``logit_bias`` (token ids read
from the gateway's ``/tokenize``), so AlpacaEval's logprob parser finds both tokens, as it would with a
real judge.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.real.tool_envs import ALPACA_EVAL, LIGHTEVAL, TOOL_ENV, setup_tool
from tests.support import GatewayProcess

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

INSTRUCTIONS = ["Name a color.", "Say hello.", "Count to three.", "Name a fruit."]
REFERENCES = ["Blue.", "Hello!", "One, two, three.", "An apple."]

#: A short pairwise prompt in AlpacaEval's chat-ML template format (the tiny models take 512 tokens).
JUDGE_TEMPLATE = """<|im_start|>system
Select the better output. Answer m or M only.
<|im_end|>
<|im_start|>user
Instruction: {instruction}
m: {output_1}
M: {output_2}
Best model identifier:
<|im_end|>"""


def tool_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **TOOL_ENV, **extra}


def served(gw: GatewayProcess, model: str) -> float:
    """Requests the gateway answered 200 for ``model``."""
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "onecard_requests_total" and s.labels.get("model") == model and s.labels.get("status") == "200"
    )


def token_id(gw: GatewayProcess, model: str, text: str) -> int:
    ids = httpx.post(
        gw.url + "/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False}, timeout=300
    ).json()["tokens"]
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def test_alpaca_eval_runs_to_its_leaderboard(demo_gateway: GatewayProcess, tmp_path: Path) -> None:
    python = setup_tool(ALPACA_EVAL)
    client = openai.OpenAI(base_url=demo_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    outputs = []
    for instruction in INSTRUCTIONS:
        r = client.chat.completions.create(
            model="candidate", messages=[{"role": "user", "content": instruction}], max_tokens=12, temperature=0
        )
        outputs.append(
            {
                "instruction": instruction,
                "output": r.choices[0].message.content or "",
                "generator": "candidate",
                "dataset": "onecard",
            }
        )
    references = [
        {"instruction": i, "output": o, "generator": "reference", "dataset": "onecard"}
        for i, o in zip(INSTRUCTIONS, REFERENCES, strict=True)
    ]
    (tmp_path / "model_outputs.json").write_text(json.dumps(outputs))
    (tmp_path / "reference_outputs.json").write_text(json.dumps(references))

    bias = {str(token_id(demo_gateway, "judge", t)): 100 for t in ("m", "M")}
    config_dir = tmp_path / "onecard_judge"
    config_dir.mkdir()
    (config_dir / "judge.txt").write_text(JUDGE_TEMPLATE)
    (tmp_path / "clients.yaml").write_text(
        yaml.safe_dump({"default": [{"api_key": "unused", "base_url": demo_gateway.url + "/v1"}]})
    )
    (config_dir / "configs.yaml").write_text(
        yaml.safe_dump(
            {
                "onecard_judge": {
                    "prompt_template": str(config_dir / "judge.txt"),
                    "fn_completions": "openai_completions",
                    "completions_kwargs": {
                        "model_name": "judge",
                        "requires_chatml": True,
                        "max_tokens": 1,
                        "temperature": 0,
                        "logprobs": True,
                        "top_logprobs": 5,
                        "logit_bias": bias,
                        "client_config_path": str(tmp_path / "clients.yaml"),
                    },
                    "fn_completion_parser": "logprob_parser",
                    "completion_parser_kwargs": {
                        "numerator_token": "m",
                        "denominator_tokens": ["m", "M"],
                        "is_binarize": False,
                    },
                    "completion_key": "completions_all",
                    "batch_size": 1,
                }
            }
        )
    )
    started = time.monotonic()
    run = subprocess.run(
        [
            str(python.parent / "alpaca_eval"),
            "evaluate",
            "--model_outputs",
            str(tmp_path / "model_outputs.json"),
            "--reference_outputs",
            str(tmp_path / "reference_outputs.json"),
            "--annotators_config",
            str(config_dir / "configs.yaml"),
            "--output_path",
            str(tmp_path / "results"),
            "--name",
            "candidate",
            "--fn_metric",
            "get_winrate",
            "--sort_by",
            "win_rate",
            "--is_avoid_reannotations",
            "False",
        ],
        cwd=tmp_path,
        env=tool_env(OPENAI_API_KEY="unused"),
        capture_output=True,
        text=True,
        timeout=800,
    )
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    leaderboard = next((tmp_path / "results").rglob("leaderboard.csv"))
    rows = {row[""] if "" in row else row[next(iter(row))]: row for row in csv.DictReader(leaderboard.open())}
    assert "candidate" in rows, rows
    annotations = json.loads(next((tmp_path / "results").rglob("annotations.json")).read_text())
    assert len(annotations) == len(INSTRUCTIONS)
    assert all(a["preference"] is not None and 1 <= float(a["preference"]) <= 2 for a in annotations)
    print(f"alpaca_eval: {seconds:.0f} s; leaderboard row: {rows['candidate']}")


LIGHTEVAL_TASK = """
from lighteval.metrics.metrics import Metrics
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc


def prompt(line, task_name: str = ""):
    return Doc(task_name=task_name, query=line["question"], choices=[line["answer"]], gold_index=0)


TASKS_TABLE = [
    LightevalTaskConfig(
        name="onecard_echo",
        prompt_function=prompt,
        hf_repo="DATA_DIR",
        hf_subset="default",
        hf_avail_splits=["test"],
        evaluation_splits=["test"],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=8,
        metrics=[Metrics.exact_match],
        stop_sequence=["\\n"],
    )
]
"""


def test_lighteval_endpoint_through_litellm(demo_gateway: GatewayProcess, tmp_path: Path) -> None:
    python = setup_tool(LIGHTEVAL)
    before = served(demo_gateway, "tiny-llama")
    data = tmp_path / "data" / "test.jsonl"  # a local dataset folder: datasets reads its test split
    data.parent.mkdir()
    data.write_text(
        "".join(json.dumps({"question": f"Repeat: {w}", "answer": w}) + "\n" for w in ("red", "blue", "green"))
    )
    (tmp_path / "onecard_task.py").write_text(LIGHTEVAL_TASK.replace("DATA_DIR", str(data.parent)))
    (tmp_path / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "model_parameters": {
                    "model_name": "openai/candidate",
                    "base_url": demo_gateway.url + "/v1",
                    "api_key": "unused",
                    "generation_parameters": {"temperature": 0.0, "max_new_tokens": 8},
                }
            }
        )
    )
    started = time.monotonic()
    run = subprocess.run(
        [
            str(python).replace("/python", "/lighteval"),
            "endpoint",
            "litellm",
            str(tmp_path / "model.yaml"),
            "onecard_echo|0",
            "--custom-tasks",
            str(tmp_path / "onecard_task.py"),
            "--output-dir",
            str(tmp_path / "out"),
            "--max-samples",
            "3",
        ],
        cwd=tmp_path,
        # A fresh HF_HOME: lighteval caches model answers there and would not ask the gateway again.
        env=tool_env(OPENAI_API_KEY="unused", HF_HOME=str(tmp_path / "hf")),
        capture_output=True,
        text=True,
        timeout=800,
    )
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert set(results["results"]["onecard_echo|0"]) == {"em", "em_stderr"}
    assert served(demo_gateway, "tiny-llama") == before + 3  # each sample went through the gateway
    print(f"lighteval: {seconds:.0f} s; results: {results['results']}")
