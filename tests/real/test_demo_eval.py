"""``onecard demo`` survives an eval on every model it offers: lm-eval-harness ``local-completions`` (token-id
prompts, ``num_concurrent=8``: batches of loglikelihood requests, ``echo: true, logprobs: 1, max_tokens: 1``)
against ``candidate``, ``judge`` and the LoRA adapter ``tiny-lora``, one ``onecard demo`` for all three, and every
request is answered 200.

vLLM 0.32's CPU build kills a LoRA-enabled EngineCore when several prompt-logprob requests share a batch
(``tests/engines/fixtures/lora-prompt-logprobs-crash.log``): the demo keeps LoRA on an engine of its own
(``tiny-llama-lora``, one sequence per step, see ``gateway/serve.py``), so ``candidate`` and ``judge`` take any batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.serve import DEMO_ADAPTER, DEMO_CANDIDATE, DEMO_JUDGE, DEMO_LORA_BASE
from tests.real.conftest import RealVllm, vllm_processes
from tests.real.lm_eval_env import OFFLINE_ENV, setup_lm_eval
from tests.real.test_lab_workflows import CHOICES_PER_ITEM, TASK, requests_by_status, write_task
from tests.support import ROOT, free_port

pytestmark = [pytest.mark.vllm]

LIMIT = 4  # documents per model: 4 x 4 choices = 16 loglikelihood requests, sent 8 at a time


class DemoProcess:
    """``onecard demo`` as a real subprocess, on a free port, with its own run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = run_dir / "demo.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "demo", "--port", str(self.port), "--run-dir", str(self.run_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
            )
        deadline = time.monotonic() + 300  # set-up is cached by the real_vllm fixture; this is the gateway start
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"onecard demo did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def demo(real_vllm: RealVllm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    gw = DemoProcess(tmp_path_factory.mktemp("onecard-demo"))
    gw.start()
    yield gw
    gw.stop()
    deadline = time.monotonic() + 30
    while vllm_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_processes() == [], "onecard demo left vLLM engines behind"


def test_the_demo_lists_what_it_offers(demo: DemoProcess) -> None:
    ids = {m["id"] for m in httpx.get(demo.url + "/v1/models", timeout=10).json()["data"]}
    assert {DEMO_CANDIDATE, "candidate", DEMO_JUDGE, "judge", DEMO_LORA_BASE, DEMO_ADAPTER} <= ids, ids


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("name", "registry_model"), [("candidate", DEMO_CANDIDATE), ("judge", DEMO_JUDGE), (DEMO_ADAPTER, DEMO_LORA_BASE)]
)
def test_lm_eval_with_8_concurrent_loglikelihood_requests_is_answered_in_full(
    demo: DemoProcess, real_vllm: RealVllm, tmp_path: Path, name: str, registry_model: str
) -> None:
    lm_eval = setup_lm_eval()
    tokenizer = real_vllm.models.other if registry_model == DEMO_JUDGE else real_vllm.models.base
    model_args = ",".join(
        [
            f"model={name}",
            f"base_url={demo.url}/v1/completions",
            f"tokenizer={tokenizer}",
            "tokenizer_backend=huggingface",
            "tokenized_requests=True",
            "num_concurrent=8",
            "max_retries=1",
            "max_length=512",
            "timeout=300",
        ]
    )
    out_dir = tmp_path / "results"
    cmd = [
        str(lm_eval),
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        str(write_task(tmp_path / "tasks")),
        "--limit",
        str(LIMIT),
        "--output_path",
        str(out_dir),
    ]
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf")}
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)
    before = requests_by_status(demo, registry_model)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lm_eval failed ({proc.returncode}):\n{log[-5000:]}\n{demo.log.read_text()[-3000:]}"
    assert len(sorted(out_dir.rglob("results_*.json"))) == 1, log[-3000:]

    # Every loglikelihood request was answered 200, the first time: no 5xx, no retry, no engine death.
    after = requests_by_status(demo, registry_model)
    delta = {status: n - before.get(status, 0) for status, n in after.items() if n != before.get(status, 0)}
    assert delta == {"200": LIMIT * CHOICES_PER_ITEM}, (delta, demo.log.read_text()[-3000:])
    row = next(
        e for e in httpx.get(demo.url + "/admin/engines", timeout=10).json()["engines"] if e["model"] == registry_model
    )
    assert row["state"] == "ready" and row["last_error"] is None, row
    assert len(row["start_seconds"]) == 1, row  # started once, never restarted
    print(f"lm_eval on {name}: {LIMIT * CHOICES_PER_ITEM} requests, 8 concurrent, all 200, {elapsed:.1f} s")
