"""gateway.metrics: drive Metrics, then read the numbers back from a parsed render()."""

from __future__ import annotations

import logging
import math
from collections import Counter as Tally
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from engines.gpu import CLOCK_EVENT_REASONS, GpuReading
from gateway.metrics import (
    CONTENT_TYPE,
    ENGINE_STATES,
    OTHER_PROCESS,
    SWAP_KINDS,
    Metrics,
    VllmReexport,
    decode_rate,
)
from tests.support import FakeProbe

GIB = 1024**3

# An excerpt of a real vLLM (V1 engine) /metrics scrape, as its prometheus_client writes it: counters
# with `_total` and a separate `_created` gauge, a histogram with its `_created` gauge, vLLM's own
# `engine` and `model_name` labels, and non-vLLM families that must not be re-exported. Values from
# published captures (smollm2-360m after a 178-request ramp; gauge HELP texts from vLLM's source).
VLLM_METRICS_SAMPLE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.4e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-360m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-360m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-360m"} 0.0421
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="smollm2-360m"} 45568.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="smollm2-360m"} 1.7898565220266905e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="smollm2-360m"} 11392.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="smollm2-360m"} 1.78985652202672e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="smollm2-360m"} 170.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="smollm2-360m"} 8.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="smollm2-360m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="smollm2-360m"} 129.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="smollm2-360m"} 167.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="smollm2-360m"} 171.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="2.5",model_name="smollm2-360m"} 178.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="smollm2-360m"} 178.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="smollm2-360m"} 178.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="smollm2-360m"} 50.285691261291504
# HELP vllm:time_to_first_token_seconds_created Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds_created gauge
vllm:time_to_first_token_seconds_created{engine="0",model_name="smollm2-360m"} 1.7898565220271022e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0"} 1.0
"""

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def parse(body: bytes | str) -> dict[SeriesKey, float]:
    """Every sample of an exposition text; fails on a duplicate series or a text that does not parse."""
    text = body.decode() if isinstance(body, bytes) else body
    out: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def value(parsed: dict[SeriesKey, float], name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def names(parsed: dict[SeriesKey, float]) -> set[str]:
    return {name for name, _ in parsed}


def rendered(metrics: Metrics) -> dict[SeriesKey, float]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE
    return parse(body)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="1.2.3", process_metrics=False)


# -- requests and tokens ------------------------------------------------------------------------


def test_requests_by_status_and_duration(metrics: Metrics) -> None:
    metrics.observe_request("llama-8b", 200, 0.4)
    metrics.observe_request("llama-8b", 200, 1.6)
    metrics.observe_request("llama-8b", "503", 0.01)
    metrics.observe_request("_unknown", 404, 0.001)
    p = rendered(metrics)
    assert value(p, "onecard_requests_total", model="llama-8b", status="200") == 2
    assert value(p, "onecard_requests_total", model="llama-8b", status="503") == 1
    assert value(p, "onecard_requests_total", model="_unknown", status="404") == 1
    assert value(p, "onecard_request_duration_seconds_count", model="llama-8b") == 3
    assert value(p, "onecard_request_duration_seconds_sum", model="llama-8b") == pytest.approx(2.01)
    assert value(p, "onecard_request_duration_seconds_bucket", model="llama-8b", le="0.5") == 2


def test_errors_by_kind(metrics: Metrics) -> None:
    metrics.observe_error("llama-8b", "engine_failed")
    metrics.observe_error("llama-8b", "engine_failed")
    assert value(rendered(metrics), "onecard_request_errors_total", model="llama-8b", kind="engine_failed") == 2


def test_tokens_ttft_and_decode_rate(metrics: Metrics) -> None:
    rate = metrics.observe_tokens("llama-8b", 812, 129, ttft_s=0.21, decode_s=1.6)
    assert rate == pytest.approx(80.0)  # (129 - 1) / 1.6: the first token is prefill's
    metrics.observe_tokens("llama-8b", 100, 41, ttft_s=0.09, decode_s=0.5)  # 80 tokens/s again
    p = rendered(metrics)
    assert value(p, "onecard_prompt_tokens_total", model="llama-8b") == 912
    assert value(p, "onecard_completion_tokens_total", model="llama-8b") == 170
    assert value(p, "onecard_time_to_first_token_seconds_count", model="llama-8b") == 2
    assert value(p, "onecard_time_to_first_token_seconds_sum", model="llama-8b") == pytest.approx(0.30)
    assert value(p, "onecard_decode_tokens_per_second", model="llama-8b") == pytest.approx(80.0)
    assert value(p, "onecard_decode_rate_tokens_per_second_count", model="llama-8b") == 2
    assert value(p, "onecard_decode_rate_tokens_per_second_bucket", model="llama-8b", le="75.0") == 0
    assert value(p, "onecard_decode_rate_tokens_per_second_bucket", model="llama-8b", le="100.0") == 2


@pytest.mark.parametrize(
    ("completion_tokens", "decode_s", "expected"),
    [
        (129, 1.6, 80.0),
        (2, 0.5, 2.0),  # one decode step in half a second
        (1, 0.5, None),  # a single token has no decode phase
        (0, 0.5, None),
        (None, 1.0, None),  # usage unknown
        (10, None, None),  # no timing (not streamed)
        (10, 0.0, None),  # all tokens in one chunk: no honest rate
        (10, -0.1, None),
    ],
)
def test_decode_rate_arithmetic(completion_tokens: int | None, decode_s: float | None, expected: float | None) -> None:
    result = decode_rate(completion_tokens, decode_s)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_no_rate_is_made_up(metrics: Metrics) -> None:
    assert metrics.observe_tokens("phi-3", 50, 1, ttft_s=0.1, decode_s=0.0) is None
    assert metrics.observe_tokens("phi-3", None, None, ttft_s=None, decode_s=None) is None
    p = rendered(metrics)
    assert value(p, "onecard_decode_tokens_per_second", model="phi-3") is None
    assert value(p, "onecard_decode_rate_tokens_per_second_count", model="phi-3") is None
    assert value(p, "onecard_completion_tokens_total", model="phi-3") == 1
    assert value(p, "onecard_time_to_first_token_seconds_count", model="phi-3") == 1


def test_in_flight(metrics: Metrics) -> None:
    metrics.request_started("llama-8b")
    metrics.request_started("llama-8b")
    metrics.request_finished("llama-8b")
    assert value(rendered(metrics), "onecard_in_flight_requests", model="llama-8b") == 1


# -- queues and engines -------------------------------------------------------------------------


def test_queue_depth_and_wait(metrics: Metrics) -> None:
    metrics.set_queue("judge-70b", 3)
    metrics.observe_queue_wait("judge-70b", 42.0)
    metrics.observe_queue_wait("judge-70b", 0.003)
    metrics.set_queue("judge-70b", 1)
    p = rendered(metrics)
    assert value(p, "onecard_queue_depth", model="judge-70b") == 1
    assert value(p, "onecard_queue_wait_seconds_count", model="judge-70b") == 2
    assert value(p, "onecard_queue_wait_seconds_bucket", model="judge-70b", le="0.005") == 1
    assert value(p, "onecard_queue_wait_seconds_bucket", model="judge-70b", le="30.0") == 1
    assert value(p, "onecard_queue_wait_seconds_bucket", model="judge-70b", le="60.0") == 2


def test_engine_state_is_one_hot(metrics: Metrics) -> None:
    metrics.set_engine_state("llama-8b", "starting")
    metrics.set_engine_state("llama-8b", "ready")
    p = rendered(metrics)
    states = {state: value(p, "onecard_engine_state", model="llama-8b", state=state) for state in ENGINE_STATES}
    assert states == {state: (1.0 if state == "ready" else 0.0) for state in ENGINE_STATES}
    with pytest.raises(ValueError, match="unknown engine state"):
        metrics.set_engine_state("llama-8b", "warming")


def test_engine_states_match_the_state_machine(metrics: Metrics) -> None:
    state = pytest.importorskip("engines.state")
    assert tuple(s.value for s in state.EngineState) == ENGINE_STATES
    machine = state.StateMachine("llama-8b", listeners=[metrics.on_engine_transition])
    machine.swap(state.EngineState.STOPPED, state.EngineState.STARTING)
    machine.swap(state.EngineState.STARTING, state.EngineState.FAILED)
    p = rendered(metrics)
    assert value(p, "onecard_engine_state", model="llama-8b", state="failed") == 1
    assert value(p, "onecard_engine_state", model="llama-8b", state="starting") == 0


def test_swaps_by_kind_and_duration(metrics: Metrics) -> None:
    metrics.observe_swap("judge-70b", "cold", 95.0)
    metrics.observe_swap("judge-70b", "wake", 2.4)
    metrics.observe_swap("llama-8b", "wake", 0.3)
    p = rendered(metrics)
    assert value(p, "onecard_swaps_total", model="judge-70b", kind="cold") == 1
    assert value(p, "onecard_swaps_total", model="llama-8b", kind="wake") == 1
    assert value(p, "onecard_swap_duration_seconds_count", kind="wake") == 2
    assert value(p, "onecard_swap_duration_seconds_bucket", kind="cold", le="90.0") == 0
    assert value(p, "onecard_swap_duration_seconds_bucket", kind="cold", le="120.0") == 1
    top = max(float(dict(labels)["le"]) for name, labels in p if name == "onecard_swap_duration_seconds_bucket")
    assert math.isinf(top)
    finite = {float(dict(labels)["le"]) for name, labels in p if name == "onecard_swap_duration_seconds_bucket"}
    assert max(finite - {math.inf}) == 300.0
    with pytest.raises(ValueError, match="unknown swap kind"):
        metrics.observe_swap("llama-8b", "hot", 1.0)
    assert set(SWAP_KINDS) == {"cold", "wake", "co_load"}


def test_start_failures_and_restarts(metrics: Metrics) -> None:
    metrics.observe_start_failure("mixtral")
    metrics.observe_restart("mixtral")
    metrics.observe_restart("mixtral")
    p = rendered(metrics)
    assert value(p, "onecard_engine_start_failures_total", model="mixtral") == 1
    assert value(p, "onecard_engine_restarts_total", model="mixtral") == 2


def test_gateway_gauges(metrics: Metrics) -> None:
    metrics.set_lease(True, 22.5)
    metrics.set_thermal_limit(True)
    metrics.set_admission_limit(16)
    p = rendered(metrics)
    assert value(p, "onecard_lease_active") == 1
    assert value(p, "onecard_lease_granted_gib") == 22.5
    assert value(p, "onecard_thermal_limit_active") == 1
    assert value(p, "onecard_admission_limit") == 16
    assert value(p, "onecard_build_info", version="1.2.3") == 1
    metrics.set_lease(False, 22.5)
    assert value(rendered(metrics), "onecard_lease_granted_gib") == 0


def test_instances_are_independent_and_the_global_registry_is_untouched() -> None:
    first, second = Metrics(version="a"), Metrics(version="b")
    first.observe_request("llama-8b", 200, 0.1)
    assert value(rendered(first), "onecard_requests_total", model="llama-8b", status="200") == 1
    assert value(rendered(second), "onecard_requests_total", model="llama-8b", status="200") is None
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("onecard")]


def test_process_metrics_of_the_gateway_itself() -> None:
    p = rendered(Metrics(version="x"))
    assert value(p, "process_resident_memory_bytes") is not None


# -- GPU ----------------------------------------------------------------------------------------


class BrokenProbe:
    def read(self) -> list[GpuReading]:
        raise RuntimeError("driver went away")


HOT_4090 = GpuReading(
    index=0,
    name="NVIDIA GeForce RTX 4090",
    temperature_c=84.0,
    memory_used_bytes=21 * GIB,
    memory_total_bytes=24 * GIB,
    power_w=431.5,
    sm_clock_mhz=2235,
    utilization_ratio=0.98,
    clock_event_reasons=frozenset({"sw_thermal_slowdown", "sw_power_cap"}),
    process_memory_bytes={101: 9 * GIB, 102: 2 * GIB, 201: 9 * GIB, 999: GIB},
)
ENGINE_PIDS: dict[int, str] = {101: "llama-8b", 102: "llama-8b", 201: "phi-3"}


def gpu_metrics(probe: FakeProbe | BrokenProbe, pid_to_model: Callable[[int], str | None] | None = None) -> Metrics:
    return Metrics(version="x", gpu_probe=probe, pid_to_model=pid_to_model, process_metrics=False)


def test_gpu_series_are_read_at_scrape_time() -> None:
    probe = FakeProbe([HOT_4090])
    metrics = gpu_metrics(probe, ENGINE_PIDS.get)
    assert probe.reads == 0
    p = rendered(metrics)
    assert probe.reads == 1
    assert value(p, "onecard_gpu_temperature_celsius", gpu="0") == 84
    assert value(p, "onecard_gpu_memory_used_bytes", gpu="0") == 21 * GIB
    assert value(p, "onecard_gpu_memory_total_bytes", gpu="0") == 24 * GIB
    assert value(p, "onecard_gpu_power_watts", gpu="0") == 431.5
    assert value(p, "onecard_gpu_sm_clock_mhz", gpu="0") == 2235
    assert value(p, "onecard_gpu_utilization_ratio", gpu="0") == 0.98
    events = {
        reason: value(p, "onecard_gpu_clock_event_active", gpu="0", reason=reason) for _, reason in CLOCK_EVENT_REASONS
    }
    assert {reason for reason, active in events.items() if active == 1} == {"sw_thermal_slowdown", "sw_power_cap"}
    assert None not in events.values()  # every reason is a series, 0 or 1: stable for alerts
    assert value(p, "onecard_gpu_process_memory_bytes", gpu="0", model="llama-8b") == 11 * GIB
    assert value(p, "onecard_gpu_process_memory_bytes", gpu="0", model="phi-3") == 9 * GIB
    assert value(p, "onecard_gpu_process_memory_bytes", gpu="0", model=OTHER_PROCESS) == GIB
    probe.readings = [GpuReading(index=0, name="x", temperature_c=60.0)]
    assert value(rendered(metrics), "onecard_gpu_temperature_celsius", gpu="0") == 60


def test_unknown_fields_are_absent_not_zero() -> None:
    p = rendered(gpu_metrics(FakeProbe([GpuReading(index=1, name="x", temperature_c=55.0)])))
    gpu_names = {name for name in names(p) if name.startswith("onecard_gpu_")}
    assert gpu_names == {"onecard_gpu_temperature_celsius"}
    assert value(p, "onecard_gpu_temperature_celsius", gpu="1") == 55


@pytest.mark.parametrize("probe", [None, FakeProbe([])], ids=["no probe", "no GPU"])
def test_without_a_gpu_the_series_are_absent(probe: FakeProbe | None) -> None:
    metrics = Metrics(version="x", gpu_probe=probe)
    metrics.observe_request("llama-8b", 200, 0.1)
    body, _ = metrics.render()
    assert b"onecard_gpu_" not in body
    assert value(parse(body), "onecard_requests_total", model="llama-8b", status="200") == 1


def test_a_failing_probe_leaves_the_rest_of_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    metrics = gpu_metrics(BrokenProbe())
    metrics.set_queue("llama-8b", 2)
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        first = rendered(metrics)
        rendered(metrics)
    assert value(first, "onecard_queue_depth", model="llama-8b") == 2
    assert not [name for name in names(first) if name.startswith("onecard_gpu_")]
    assert len([r for r in caplog.records if "GPU probe failed" in r.getMessage()]) == 1


# -- vLLM re-export -----------------------------------------------------------------------------


def vllm_series(text: str) -> dict[SeriesKey, float]:
    return {key: v for key, v in parse(text).items() if key[0].startswith("vllm:")}


def test_vllm_round_trip_adds_model_and_keeps_values(metrics: Metrics) -> None:
    metrics.update_engine_metrics("smollm", VLLM_METRICS_SAMPLE)
    p = rendered(metrics)
    original = vllm_series(VLLM_METRICS_SAMPLE)
    kept = {key: v for key, v in original.items() if not key[0].endswith("_created")}
    assert len(kept) == 16
    for (name, labels), v in kept.items():
        relabeled = (name, tuple(sorted((*labels, ("model", "smollm")))))
        assert p[relabeled] == v, name
    assert {key for key in p if key[0].startswith("vllm:")} == {
        (name, tuple(sorted((*labels, ("model", "smollm"))))) for name, labels in kept
    }
    counter = value(p, "vllm:generation_tokens_total", engine="0", model_name="smollm2-360m", model="smollm")
    assert counter == 11392
    bucket = value(
        p, "vllm:time_to_first_token_seconds_bucket", engine="0", le="0.25", model_name="smollm2-360m", model="smollm"
    )
    assert bucket == 129


def test_vllm_reexport_keeps_types_and_drops_created_and_other_families(metrics: Metrics) -> None:
    metrics.update_engine_metrics("smollm", VLLM_METRICS_SAMPLE)
    body = metrics.render()[0].decode()
    types = {f.name: f.type for f in text_string_to_metric_families(body) if f.name.startswith("vllm:")}
    assert types["vllm:generation_tokens"] == "counter"
    assert types["vllm:time_to_first_token_seconds"] == "histogram"
    assert types["vllm:kv_cache_usage_perc"] == "gauge"
    assert "# TYPE vllm:generation_tokens_total counter" in body
    assert "_created" not in "".join(line for line in body.splitlines() if "vllm:" in line)
    assert "python_gc_objects_collected_total" not in body
    assert "process_resident_memory_bytes" not in body


def test_two_engines_share_one_family(metrics: Metrics) -> None:
    metrics.update_engine_metrics("llama-8b", VLLM_METRICS_SAMPLE)
    metrics.update_engine_metrics("phi-3", VLLM_METRICS_SAMPLE.replace("11392.0", "7.0"))
    body = metrics.render()[0].decode()
    type_lines = Tally(line for line in body.splitlines() if line.startswith("# TYPE "))
    assert max(type_lines.values()) == 1
    p = parse(body)
    assert value(p, "vllm:generation_tokens_total", engine="0", model_name="smollm2-360m", model="llama-8b") == 11392
    assert value(p, "vllm:generation_tokens_total", engine="0", model_name="smollm2-360m", model="phi-3") == 7

    metrics.forget_engine_metrics("llama-8b")
    p = rendered(metrics)
    assert {dict(labels)["model"] for name, labels in p if name.startswith("vllm:")} == {"phi-3"}


def test_update_replaces_the_previous_scrape(metrics: Metrics) -> None:
    metrics.update_engine_metrics("llama-8b", VLLM_METRICS_SAMPLE)
    metrics.update_engine_metrics("llama-8b", VLLM_METRICS_SAMPLE.replace("11392.0", "11500.0"))
    p = rendered(metrics)
    assert value(p, "vllm:generation_tokens_total", engine="0", model_name="smollm2-360m", model="llama-8b") == 11500


def test_a_model_label_from_the_engine_is_overwritten() -> None:
    reexport = VllmReexport()
    reexport.update("llama-8b", 'vllm:num_requests_running{model="served-name"} 3\n')
    (family,) = reexport.collect()
    assert [s.labels for s in family.samples] == [{"model": "llama-8b"}]


def test_bad_text_raises_and_keeps_the_last_good_scrape(metrics: Metrics) -> None:
    metrics.update_engine_metrics("llama-8b", VLLM_METRICS_SAMPLE)
    with pytest.raises(ValueError, match="llama-8b"):
        metrics.update_engine_metrics("llama-8b", 'vllm:broken{engine="0" 1.0\n')
    p = rendered(metrics)
    assert value(p, "vllm:generation_tokens_total", engine="0", model_name="smollm2-360m", model="llama-8b") == 11392


def test_untyped_vllm_text_is_reexported_as_untyped(metrics: Metrics) -> None:
    metrics.update_engine_metrics("llama-8b", 'vllm:generation_tokens_total{engine="0"} 5\n')
    body = metrics.render()[0].decode()
    assert "# TYPE vllm:generation_tokens_total untyped" in body
    assert value(parse(body), "vllm:generation_tokens_total", engine="0", model="llama-8b") == 5
