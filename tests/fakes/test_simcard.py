"""The simulated card's rules, each against the vLLM 0.32 behaviour it copies (see tests/fakes/simcard.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from engines.gpu import NvmlProbe, card_total_gib
from tests.fakes.simcard import (
    GIB,
    SIDECAR,
    CudaOutOfMemory,
    Ledger,
    SimEngine,
    StartRefused,
    hold,
    request_memory,
    verify_quantization,
)
from tests.support import ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Live processes to stand for engines (an entry of a dead pid leaves the ledger)."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def model_dir(
    tmp_path: Path, name: str, *, weights_gib: float, runtime_gib: float = 1.5, quant: dict[str, object] | None = None
) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    config: dict[str, object] = {"architectures": ["LlamaForCausalLM"]}
    if quant is not None:
        config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    (folder / SIDECAR).write_text(
        json.dumps({"weights_bytes": int(weights_gib * GIB), "runtime_bytes": int(runtime_gib * GIB)})
    )
    return folder


def start(ledger: Ledger, folder: Path, pid: int, *flags: str) -> SimEngine:
    return SimEngine.start(ledger, model_dir=folder, flags=flags, served_name=folder.name, pid=pid)


def gib(n: float) -> str:
    return str(int(n * GIB))


def test_startup_check_has_vllms_text_and_arithmetic() -> None:
    assert request_memory(free=12 * GIB, total=24 * GIB, utilization=0.5) == 12 * GIB
    with pytest.raises(StartRefused) as e:
        request_memory(free=int(9.89 * GIB), total=24 * GIB, utilization=0.92)
    assert e.value.lines[-1] == (
        "ValueError: Free memory on device cuda:0 (9.89/24.0 GiB) on startup is less than desired GPU memory "
        "utilization (0.92, 22.08 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
        "processes."
    )


def test_quantization_must_match_the_checkpoint_unless_it_is_an_override() -> None:
    awq = {"quant_method": "awq", "bits": 4}
    assert verify_quantization(awq, "awq_marlin") == "auto_awq"  # an override vLLM registers for AWQ
    assert verify_quantization(awq, None) == "auto_awq"
    assert verify_quantization({"quant_method": "gptq"}, "gptq_marlin") == "auto_gptq"
    assert verify_quantization({"quant_method": "fp8"}, "fp8") == "fp8"
    assert verify_quantization(None, "fp8") == "fp8"  # unquantized checkpoint: online quantization
    with pytest.raises(
        StartRefused,
        match=r"^ValueError: Quantization method specified in the model config "
        r"\(compressed-tensors\) does not match the quantization method specified in the "
        r"`quantization` argument \(fp8\)\.$",
    ):
        verify_quantization({"quant_method": "compressed-tensors"}, "fp8")
    with pytest.raises(StartRefused, match=r"\(awq\) does not match .* \(fp8\)"):
        verify_quantization(awq, "fp8")


def test_two_engines_share_the_card_by_their_shares_and_the_default_refuses_the_second(
    tmp_path: Path, pids: list[int]
) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    a = model_dir(tmp_path, "a", weights_gib=8.5)
    b = model_dir(tmp_path, "b", weights_gib=3.7)
    start(ledger, a, pids[0], "--kv-cache-memory-bytes", gib(4), "--gpu-memory-utilization", "0.6")
    card = ledger.read()
    assert card.used == int(8.5 * GIB) + 4 * GIB + int(1.5 * GIB)
    with pytest.raises(StartRefused, match=r"less than desired GPU memory utilization \(0\.92"):
        start(ledger, b, pids[1], "--kv-cache-memory-bytes", gib(3))  # vLLM's default share
    start(ledger, b, pids[1], "--kv-cache-memory-bytes", gib(3), "--gpu-memory-utilization", "0.35")
    assert ledger.read().holders[pids[1]].on_card == int(3.7 * GIB) + 3 * GIB + int(1.5 * GIB)


def test_cuda_oom_when_the_weights_do_not_fit_and_offload_lowers_the_share(tmp_path: Path, pids: list[int]) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    judge = model_dir(tmp_path, "judge", weights_gib=37.0)
    with pytest.raises(CudaOutOfMemory, match=r"CUDA out of memory\. Tried to allocate 37\.0 GiB"):
        start(ledger, judge, pids[0], "--kv-cache-memory-bytes", gib(1.25), "--gpu-memory-utilization", "0.5")
    assert ledger.read().holders == {}
    start(
        ledger,
        judge,
        pids[0],
        "--kv-cache-memory-bytes",
        gib(1.25),
        "--gpu-memory-utilization",
        "0.95",
        "--cpu-offload-gb",
        "17",
    )
    h = ledger.read().holders[pids[0]]
    assert h.weights == 20 * GIB and h.host == 17 * GIB


def test_without_a_kv_figure_the_pool_is_the_share_less_weights_and_runtime(tmp_path: Path, pids: list[int]) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    big = model_dir(tmp_path, "big", weights_gib=12.0)
    with pytest.raises(StartRefused, match="No available memory for the cache blocks"):
        start(ledger, big, pids[0], "--gpu-memory-utilization", "0.5")  # 12 GiB share: nothing left for KV
    sim = start(ledger, big, pids[0], "--gpu-memory-utilization", "0.75")
    assert sim.holder().kv == 18 * GIB - 12 * GIB - int(1.5 * GIB)


def test_sleep_levels_free_the_card_and_level_2_answers_garbage_until_reloaded(tmp_path: Path, pids: list[int]) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    folder = model_dir(tmp_path, "m", weights_gib=8.0)
    flags = ("--kv-cache-memory-bytes", gib(4), "--gpu-memory-utilization", "0.6")
    sim = start(ledger, folder, pids[0], *flags)
    sim.sleep(1)
    h = sim.holder()
    assert (h.on_card, h.host, sim.garbage("m")) == (0, 8 * GIB, False)  # level 1: weights in host RAM
    assert sim.wake(None) and sim.holder().on_card == int(13.5 * GIB) and not sim.garbage("m")
    sim.sleep(2, adapters=["m-lora"])
    assert sim.holder().on_card == 0 and sim.holder().host == 0  # level 2: discarded
    assert sim.wake(["weights"]) is False  # the KV pool still sleeps: not serving yet
    assert sim.garbage("m") and sim.garbage("m-lora")
    sim.reload_weights()
    assert sim.wake(["kv_cache"]) is True
    assert not sim.garbage("m") and sim.garbage("m-lora")  # the adapter's slots were discarded too
    sim.adapter_reloaded("m-lora")
    assert not sim.garbage("m-lora")
    withheld = start(
        ledger,
        model_dir(tmp_path, "w", weights_gib=1.0),
        pids[1],
        "--kv-cache-memory-bytes",
        gib(1),
        "--gpu-memory-utilization",
        "0.2",
    )
    withheld.skip_reload = True
    withheld.sleep(2)
    withheld.wake(["weights"])
    withheld.reload_weights()
    withheld.wake(["kv_cache"])
    assert withheld.garbage("w")  # the knob: reload answered, nothing reloaded


def test_a_wake_that_does_not_fit_is_cuda_oom_and_stays_asleep(tmp_path: Path, pids: list[int]) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    sim = start(
        ledger,
        model_dir(tmp_path, "m", weights_gib=8.0),
        pids[0],
        "--kv-cache-memory-bytes",
        gib(4),
        "--gpu-memory-utilization",
        "0.6",
    )
    sim.sleep(1)
    hold(ledger, pid=pids[1], name="trainer", nbytes=16 * GIB)
    with pytest.raises(CudaOutOfMemory):
        sim.wake(None)
    assert sim.holder().sleeping == ["weights", "kv_cache"]


def test_memory_of_a_dead_process_leaves_the_card(tmp_path: Path) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STANDIN_SIMCARD": str(ledger.path)}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_trainer", "--gib", "16", "--until", str(stop), "--ready", str(ready)],
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.read().used == 16 * GIB
        second = subprocess.run(
            [sys.executable, "-m", "tests.fakes.fake_trainer", "--gib", "16", "--until", str(stop)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1 and "CUDA out of memory" in second.stderr
        trainer.kill()
        trainer.wait(10)
        assert ledger.read().used == 0  # killed: the driver frees its memory
    finally:
        trainer.kill()
        trainer.wait(10)


def load_fake_nvml() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_pynvml", ROOT / "tests/fakes/fake_nvml/pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gateways_nvml_code_reads_the_simulated_card(
    tmp_path: Path, pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.create(tmp_path / "card.json", total_gib=24, temperature_c=61.0, power_w=210.5)
    start(
        ledger,
        model_dir(tmp_path, "m", weights_gib=8.0),
        pids[0],
        "--kv-cache-memory-bytes",
        gib(4),
        "--gpu-memory-utilization",
        "0.6",
    )
    monkeypatch.setenv("STANDIN_SIMCARD", str(ledger.path))
    probe = NvmlProbe.open(load_fake_nvml())
    reading = probe.read()[0]
    assert reading.memory_total_bytes == 24 * GIB
    assert reading.memory_used_bytes == int(13.5 * GIB)
    assert reading.process_memory_bytes == {pids[0]: int(13.5 * GIB)}
    assert (reading.temperature_c, reading.power_w) == (61.0, 210.5)
    assert card_total_gib(probe) == 24.0
    monkeypatch.delenv("STANDIN_SIMCARD")
    assert NvmlProbe.open(load_fake_nvml()).read() == []  # no card: NVML cannot start, as with no driver


def serve(folder: Path, ledger: Ledger, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """A stand-in in GPU mode; its log goes to ``stderr.log`` beside the model folder."""
    from tests.support import free_port

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "VLLM_"))}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.standin_engine",
            "serve",
            str(folder),
            "--served-model-name",
            "m",
            "--port",
            str(port),
            "--enable-sleep-mode",
            *flags,
        ],
        cwd=ROOT,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=(folder.parent / "stderr.log").open("w"),
        env={
            **clean,
            "PYTHONPATH": str(ROOT),
            "STANDIN_SIMCARD": str(ledger.path),
            "VLLM_SERVER_DEV_MODE": "1",
        },
    )
    return proc, f"http://127.0.0.1:{port}"


def test_a_standin_in_gpu_mode_is_refused_with_vllms_line_and_serves_the_sleep_sequence(tmp_path: Path) -> None:
    import httpx

    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)
    folder = model_dir(tmp_path, "m", weights_gib=8.0, quant={"quant_method": "compressed-tensors"})
    refused, _ = serve(folder, ledger, "--quantization", "fp8", "--kv-cache-memory-bytes", gib(4))
    assert refused.wait(30) == 1
    err = (tmp_path / "stderr.log").read_text()
    assert "ValueError: Quantization method specified in the model config (compressed-tensors) does not match" in err
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    proc, url = serve(
        folder, ledger, "--quantization", "fp8", "--kv-cache-memory-bytes", gib(4), "--gpu-memory-utilization", "0.6"
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {
            "model": "m",
            "prompt": [100, 200, 300, 400],
            "max_tokens": 4,
            "temperature": 0,
            "return_token_ids": True,
        }
        before = httpx.post(url + "/v1/completions", json=body, timeout=10).json()["choices"][0]
        assert before["prompt_token_ids"] == [100, 200, 300, 400] and len(before["token_ids"]) == 4
        assert ledger.read().holders[proc.pid].on_card == int(13.5 * GIB)
        # vLLM 0.32's answers to the level-2 sequence, as the real CPU build gives them
        assert httpx.post(url + "/sleep?level=2").json() == {"status": "sleeping", "level": 2}
        assert ledger.read().holders[proc.pid].on_card == 0
        assert httpx.post(url + "/wake_up?tags=weights").json() == {"status": "sleeping", "tags": ["weights"]}
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
        assert httpx.post(url + "/collective_rpc", json={"method": "reload_weights"}).json() == {"results": [None]}
        assert httpx.post(url + "/wake_up?tags=kv_cache").json() == {"status": "awake", "tags": ["kv_cache"]}
        assert httpx.post(url + "/reset_prefix_cache").json() == {"success": True}
        after = httpx.post(url + "/v1/completions", json=body, timeout=10).json()["choices"][0]
        assert after["token_ids"] == before["token_ids"]  # reloaded: the same fingerprint
        httpx.post(url + "/sleep?level=2")
        assert httpx.post(url + "/wake_up").json() == {"status": "awake", "tags": None}
        garbage = httpx.post(url + "/v1/completions", json=body, timeout=10).json()["choices"][0]
        assert garbage["token_ids"] != before["token_ids"]  # woken without a reload: discarded weights
    finally:
        proc.kill()
        proc.wait(10)
