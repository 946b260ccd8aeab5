"""The 24 GiB card for real, simulated: ``onecard serve`` (a real subprocess) with stand-in engines that
take their memory from one simulated card by vLLM 0.32's rules (:mod:`tests.fakes.simcard`), and a fake
NVML that reports that card to the gateway.

The stand-in models are the shipped registry's (``model_registry.yaml``), sized as ``onecard plan``
sizes them: each model folder holds a ``config.json`` (with its checkpoint's ``quantization_config``)
and the plan's weights and runtime figures. What a model is asked to do is judged by the answer the
stand-in gives for it (:func:`tests.fakes.standin_engine.expected_text`): discarded weights answer
something else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from engines.planner import GIB, plan_registry
from engines.registry import load_registry
from tests.fakes.simcard import ENV_LEDGER, SIDECAR, Card, Ledger
from tests.fakes.standin_engine import expected_text
from tests.support import ROOT, GatewayProcess, standin_executable

pytestmark = pytest.mark.timeout(90)

SHIPPED = ROOT / "model_registry.yaml"
FAKE_NVML = ROOT / "tests" / "fakes" / "fake_nvml"
L8B, PHI3, QWEN14, JUDGE = "llama-3.1-8b-fp8", "phi-3-mini-fp8", "qwen2.5-14b-awq", "llama-3.1-70b-awq"
ADAPTER = "llama-8b-domain-r16"
#: The checkpoint's quantization_config for each registry quantization (what the published folders say).
#: Each checkpoint's ``quantization_config`` as its published ``config.json`` has it, by the registry's
#: ``checkpoint_quant_method`` (the 8B FP8 is compressed-tensors, Phi-3's is plain fp8).
CHECKPOINT_QUANT = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "static"},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized"},
}


class Lab:
    """A simulated 24 GiB card, the shipped models on it, and ``onecard serve`` in front."""

    def __init__(
        self,
        tmp_path: Path,
        names: tuple[str, ...],
        *,
        host_ram_for_sleep_gib: float = 64,
        env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.tmp = tmp_path
        self.ledger = Ledger.create(tmp_path / "card.json", total_gib=24, temperature_c=58.0, power_w=180.0)
        shipped = yaml.safe_load(SHIPPED.read_text())
        models = []
        for entry in shipped["models"]:
            if entry["name"] not in names:
                continue
            entry = dict(entry)
            folder = tmp_path / "models" / entry["name"]
            folder.mkdir(parents=True)
            config = {
                "architectures": ["LlamaForCausalLM"],
                **entry["architecture"],
                "quantization_config": CHECKPOINT_QUANT[entry["checkpoint_quant_method"]],
            }
            (folder / "config.json").write_text(json.dumps(config))
            entry["source"] = str(folder)
            entry["start_timeout_s"] = 30
            entry.pop("idle_ttl_s", None)
            if "lora" in entry:  # the hub adapters are not here: a local one on the 8B
                entry["lora"] = {k: v for k, v in entry["lora"].items() if k != "adapters"}
                if entry["name"] == L8B:
                    adapter = tmp_path / "adapters" / ADAPTER
                    adapter.mkdir(parents=True)
                    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
                    entry["lora"]["adapters"] = {ADAPTER: {"path": str(adapter), "rank": 16}}
            if env and entry["name"] in env:
                entry["env"] = env[entry["name"]]
            models.append(entry)
        registry = {
            "gpu": {
                "budget_gib": 24,
                "headroom_gib": 1,
                "platform": "cuda",
                "host_ram_for_sleep_gib": host_ram_for_sleep_gib,
            },
            "vllm": {"executable": str(standin_executable(tmp_path)), "env": {ENV_LEDGER: str(self.ledger.path)}},
            "scheduler": {"max_wait_s": 5},
            "models": models,
        }
        self.registry = tmp_path / "registry.yaml"
        self.registry.write_text(yaml.safe_dump(registry, sort_keys=False))
        self.plan = plan_registry(load_registry(self.registry))
        for m in self.plan.models:  # the planner's figures, so the stand-in takes what the plan sizes
            (tmp_path / "models" / m.name / SIDECAR).write_text(
                json.dumps({"weights_bytes": int(m.weights_gib * GIB), "runtime_bytes": int(m.overhead_gib * GIB)})
            )
        self.gateway = GatewayProcess(
            self.registry,
            tmp_path / "run",
            env={"PYTHONPATH": f"{FAKE_NVML}:{ROOT}", ENV_LEDGER: str(self.ledger.path)},
        )

    @property
    def url(self) -> str:
        return self.gateway.url

    def card(self) -> Card:
        return self.ledger.read()

    def holder_of(self, model: str) -> Any:
        found = [h for h in self.card().holders.values() if h.name == model]
        return found[0] if found else None

    def engines(self) -> dict[str, dict[str, Any]]:
        return {e["model"]: e for e in httpx.get(self.url + "/admin/engines", timeout=10).json()["engines"]}

    def ask(self, model: str, prompt: str = "Grade this answer", max_tokens: int = 6) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/completions",
            timeout=60,
            json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        )

    def ask_right(self, model: str, prompt: str = "Grade this answer", *, served: str | None = None) -> None:
        """The model answers, and with its own weights (not a discarded pool's garbage)."""
        r = self.ask(model, prompt)
        assert r.status_code == 200, r.text
        want = expected_text(served or model, prompt, 6)
        assert r.json()["choices"][0]["text"] == want, f"{model} answered garbage"

    def admin(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60)

    def log(self) -> str:
        return self.gateway.log()


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(*names: str, **kw: Any) -> Lab:
        lab = Lab(tmp_path, names, **kw)
        lab.gateway.start()
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.gateway.close()


def until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def gib(nbytes: int) -> float:
    return round(nbytes / GIB, 2)


def test_the_8b_and_phi3_start_side_by_side_and_both_answer(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(L8B, PHI3)
    lab.ask_right(L8B)
    lab.ask_right(PHI3)  # refused by vLLM's start-up check when the engine has no share of its own
    assert {lab.engines()[m]["state"] for m in (L8B, PHI3)} == {"ready"}
    card = lab.card()
    planned = lab.plan.model(L8B).total_gib + lab.plan.model(PHI3).total_gib
    assert gib(card.used) == pytest.approx(planned, abs=0.01) and card.used <= 23 * GIB
    metrics = httpx.get(lab.url + "/metrics", timeout=10).text  # the gateway reads the card through NVML
    total = [line for line in metrics.splitlines() if line.startswith("onecard_gpu_memory_total_bytes{")]
    assert len(total) == 1 and float(total[0].split()[-1]) == 24 * GIB
    for model in (L8B, PHI3):
        assert lab.engines()[model]["footprint_gib"] == pytest.approx(lab.plan.model(model).total_gib, abs=0.01)


def test_the_8b_starts_beside_a_sleeping_model(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(L8B, QWEN14)
    lab.ask_right(QWEN14)
    assert lab.admin(f"/admin/engines/{QWEN14}/sleep?level=1").status_code == 200
    asleep = lab.holder_of(QWEN14)
    assert asleep.on_card == 0 and gib(asleep.host) == pytest.approx(lab.plan.model(QWEN14).weights_gib, abs=0.01)
    lab.ask_right(L8B)
    assert lab.engines()[QWEN14]["state"] == "sleeping" and lab.engines()[L8B]["state"] == "ready"
    assert gib(lab.holder_of(L8B).on_card) == pytest.approx(lab.plan.model(L8B).total_gib, abs=0.01)


def test_a_16_gib_lease_evicts_what_it_must_and_the_models_come_back(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(L8B, PHI3)
    lab.ask_right(L8B)
    lab.ask_right(PHI3)
    stop, ready = lab.tmp / "trainer.stop", lab.tmp / "trainer.ready"
    lease = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "lease",
            "--gib",
            "16",
            "--url",
            lab.url,
            "--",
            sys.executable,
            "-m",
            "tests.fakes.fake_trainer",
            "--gib",
            "16",
            "--until",
            str(stop),
            "--ready",
            str(ready),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), ENV_LEDGER: str(lab.ledger.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert until(ready.exists, 30), "the trainer never got its 16 GiB"
        trainer = lab.card().holders[int(ready.read_text())]
        assert trainer.kind == "trainer" and trainer.on_card == 16 * GIB
        # 23 GiB usable - 16 leased = 7: neither model fits beside the lease (8.24 and 14.11 GiB)
        assert {lab.engines()[m]["state"] for m in (L8B, PHI3)} == {"stopped"}
        assert lab.card().used == 16 * GIB
        refused = lab.ask(PHI3)
        assert refused.status_code == 503 and "leased" in refused.json()["error"]["message"]
        assert "Retry-After" in refused.headers
        stop.touch()
        out, _ = lease.communicate(timeout=30)
        assert lease.returncode == 0, out
        assert "released" in out
    finally:
        stop.touch()
        if lease.poll() is None:
            lease.kill()
    lab.ask_right(L8B)
    lab.ask_right(PHI3)
    assert {lab.engines()[m]["state"] for m in (L8B, PHI3)} == {"ready"}


def test_the_70b_judge_starts_alone_with_its_offload(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(JUDGE, PHI3)
    lab.ask_right(PHI3)
    lab.ask_right("judge", served=JUDGE)  # the alias: the judge evicts Phi-3 (to sleep) and runs alone
    judge = lab.plan.model(JUDGE)
    assert judge.offload_gib == 17
    h = lab.holder_of(JUDGE)
    assert gib(h.host) == 17.0 and gib(h.on_card) == pytest.approx(judge.total_gib, abs=0.01)
    assert lab.engines()[PHI3]["state"] == "sleeping" and lab.holder_of(PHI3).on_card == 0
    log = httpx.get(f"{lab.url}/admin/engines/{JUDGE}/log", timeout=10).text
    assert "--cpu-offload-gb 17" in log and "--gpu-memory-utilization 0.949444" in log


def test_a_level_2_wake_reloads_the_weights_and_gives_the_same_fingerprint(lab_factory: Callable[..., Lab]) -> None:
    # 12 GiB of host RAM for sleeping weights: the 14B's 9.3 fit, the 8B's 8.5 on top do not
    lab = lab_factory(L8B, PHI3, QWEN14, host_ram_for_sleep_gib=12)
    lab.ask_right(QWEN14)
    lab.ask_right(L8B)  # the 14B goes to sleep at level 1
    lab.ask_right(ADAPTER)  # a runtime-loaded LoRA adapter on the 8B
    lab.ask_right(PHI3)  # beside the 8B
    lab.ask_right(QWEN14)  # the 8B and Phi-3 are put to sleep: past the host RAM, at level 2
    h = lab.holder_of(L8B)
    assert h.on_card == 0 and h.host == 0 and not h.weights_valid, "the 8B's weights were discarded"
    lab.ask_right(L8B)  # woken: weights reloaded and proven
    lab.ask_right(ADAPTER)  # the adapter reloaded in place
    engines = lab.engines()
    assert engines[L8B]["state"] == "ready" and len(engines[L8B]["start_seconds"]) == 1  # woken, not restarted
    assert len(engines[L8B]["wake_seconds"]) == 1
    kinds = [(s["model"], s["kind"]) for s in httpx.get(lab.url + "/admin/swaps", timeout=10).json()["swaps"]]
    assert (L8B, "wake") in kinds


def test_a_withheld_reload_is_caught_and_the_client_gets_a_cold_restarted_engine(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = lab_factory(L8B, QWEN14, host_ram_for_sleep_gib=0, env={L8B: {"STANDIN_SKIP_RELOAD": "1"}})
    lab.ask_right(L8B)
    first_pid = lab.engines()[L8B]["pid"]
    lab.ask_right(QWEN14)  # the 8B sleeps at level 2 (no host RAM for its weights)
    assert not lab.holder_of(L8B).weights_valid
    lab.ask_right(L8B)  # the reload does nothing: the fingerprint differs, the engine is restarted cold
    engines = lab.engines()
    assert engines[L8B]["pid"] != first_pid and len(engines[L8B]["start_seconds"]) == 2  # a second cold start
    assert "fingerprint probe gave token ids" in lab.log() and "restarting it cold" in lab.log()
    swaps = httpx.get(lab.url + "/admin/swaps", timeout=10).json()["swaps"]
    assert [s["kind"] for s in swaps if s["model"] == L8B] == ["co_load", "cold"]  # the refused wake: a cold start
