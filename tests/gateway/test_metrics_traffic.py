"""Metrics under real traffic through the gateway (stand-in engines), read back from a parsed scrape."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.gpu import GpuReading
from gateway.app import create_app
from gateway.settings import Settings
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_tokens_histograms_and_engine_series(tmp_path: Path) -> None:
    models = [standin_model("m", env={"STANDIN_TOKEN_DELAY": "0.002"})]
    reg = write_registry(tmp_path / "r.yaml", models, executable=standin_executable(tmp_path))
    with running_gateway(reg, tmp_path / "run", metrics_scrape_s=0.2) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        prompt_total = completion_total = 0
        for i in range(5):
            r = client.completions.create(model="m", prompt=f"hello number {i}", max_tokens=7)
            assert r.usage is not None
            prompt_total += r.usage.prompt_tokens
            completion_total += r.usage.completion_tokens
        for i in range(3):  # streamed: the gateway counts tokens from the usage it asked for upstream
            chunks = list(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=9, stream=True,
                stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            assert usage is not None
            prompt_total += usage.prompt_tokens
            completion_total += usage.completion_tokens
        assert httpx.post(gw.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

        deadline = time.monotonic() + 10
        samples = scrape(gw.url)
        while time.monotonic() < deadline and not any(k[0].startswith("vllm:") for k in samples):
            time.sleep(0.2)
            samples = scrape(gw.url)

    assert value(samples, "onecard_requests_total", model="m", status="200") == 8
    assert value(samples, "onecard_requests_total", model="_unknown", status="404") == 1
    assert value(samples, "onecard_prompt_tokens_total", model="m") == prompt_total
    assert value(samples, "onecard_completion_tokens_total", model="m") == completion_total == 5 * 7 + 3 * 9
    assert value(samples, "onecard_request_duration_seconds_count", model="m") == 8
    assert value(samples, "onecard_time_to_first_token_seconds_count", model="m") == 3  # streams have a TTFT
    assert value(samples, "onecard_decode_rate_tokens_per_second_count", model="m") == 3
    assert value(samples, "onecard_decode_tokens_per_second", model="m") > 0
    assert value(samples, "onecard_swaps_total", model="m", kind="co_load") == 1
    assert value(samples, "onecard_engine_state", model="m", state="ready") == 1
    assert value(samples, "onecard_queue_wait_seconds_count", model="m") >= 1
    engine_series = [k for k in samples if k[0].startswith("vllm:")]
    assert engine_series and all(("model", "m") in labels for _, labels in engine_series)


class HotThenCool:
    """A fake GPU whose temperature follows a script (one reading per call, the last one repeats)."""

    def __init__(self, temps: Sequence[float]) -> None:
        self.temps = list(temps)

    def read(self) -> list[GpuReading]:
        t = self.temps.pop(0) if len(self.temps) > 1 else self.temps[0]
        return [GpuReading(index=0, name="fake 4090", temperature_c=t, memory_used_bytes=1, memory_total_bytes=2)]


def test_thermal_guard_lowers_admitted_concurrency(tmp_path: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    probe = HotThenCool([70, 86, 86, 60])
    settings = Settings(registry_path=reg, run_dir=tmp_path / "run", thermal_limit_c=83, thermal_concurrency=3)
    server = ServerThread(create_app(settings, gpu_probe=probe))
    server.start()
    try:
        deadline = time.monotonic() + 10
        while server.gw.admission.limit != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.gw.admission.limit == 3
        samples = scrape(server.url)
        assert value(samples, "onecard_thermal_limit_active") == 1
        assert value(samples, "onecard_admission_limit") == 3
        assert value(samples, "onecard_gpu_temperature_celsius", gpu="0") in (86.0, 60.0)
        while server.gw.admission.limit is not None and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        assert server.gw.admission.limit is None  # cool again: no limit
        assert value(scrape(server.url), "onecard_thermal_limit_active") == 0
    finally:
        server.stop()
