"""engines.gpu against a fake NVML module: fields, fallbacks to deprecated calls, failures, no GPU."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from engines.gpu import (
    CLOCK_EVENT_REASONS,
    GpuReading,
    NoGpu,
    NvmlProbe,
    ThermalGuard,
    decode_clock_event_reasons,
)

NOT_SUPPORTED = 3
NO_PERMISSION = 4
FUNCTION_NOT_FOUND = 13
SW_POWER_CAP = 0x04
SW_THERMAL = 0x20
HW_THERMAL = 0x40
GIB = 1024**3


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code as ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeLibraryMismatch(Exception):
    """Like pynvml.NVMLLibraryMismatchError (not an NVMLError)."""


@dataclass
class FakeGpu:
    name: str | bytes = "NVIDIA GeForce RTX 4090"
    temperature_c: int = 71
    used: int = 20 * GIB
    total: int = 24 * GIB
    power_mw: int = 285_000
    sm_mhz: int = 2520
    util_pct: int = 97
    reasons: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)


def fake_nvml(gpus: list[FakeGpu], *, fail: dict[str, int] | None = None, **override: Any) -> SimpleNamespace:
    """A stand-in for the ``pynvml`` module; ``fail`` maps a function name to the NVML error it raises,
    ``override`` replaces functions (``None`` removes one, like an older pynvml)."""
    fail = fail or {}
    calls: list[str] = []

    def fn(name: str, body: Any) -> Any:
        def call(*args: Any) -> Any:
            calls.append(name)
            if name in fail:
                raise FakeNVMLError(fail[name])
            return body(*args)

        return call

    def processes(h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpus[h].processes]

    functions: dict[str, Any] = {
        "nvmlInit": fn("nvmlInit", lambda: None),
        "nvmlShutdown": fn("nvmlShutdown", lambda: None),
        "nvmlDeviceGetCount": fn("nvmlDeviceGetCount", lambda: len(gpus)),
        "nvmlDeviceGetHandleByIndex": fn("nvmlDeviceGetHandleByIndex", lambda i: i),
        "nvmlDeviceGetName": fn("nvmlDeviceGetName", lambda h: gpus[h].name),
        "nvmlDeviceGetTemperatureV": fn("nvmlDeviceGetTemperatureV", lambda h, s: gpus[h].temperature_c),
        "nvmlDeviceGetTemperature": fn("nvmlDeviceGetTemperature", lambda h, s: gpus[h].temperature_c),
        "nvmlDeviceGetMemoryInfo": fn(
            "nvmlDeviceGetMemoryInfo",
            lambda h: SimpleNamespace(used=gpus[h].used, total=gpus[h].total, free=gpus[h].total - gpus[h].used),
        ),
        "nvmlDeviceGetPowerUsage": fn("nvmlDeviceGetPowerUsage", lambda h: gpus[h].power_mw),
        "nvmlDeviceGetClockInfo": fn("nvmlDeviceGetClockInfo", lambda h, clock: gpus[h].sm_mhz),
        "nvmlDeviceGetUtilizationRates": fn(
            "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=gpus[h].util_pct, memory=40)
        ),
        "nvmlDeviceGetCurrentClocksEventReasons": fn(
            "nvmlDeviceGetCurrentClocksEventReasons", lambda h: gpus[h].reasons
        ),
        "nvmlDeviceGetCurrentClocksThrottleReasons": fn(
            "nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: gpus[h].reasons
        ),
        "nvmlDeviceGetComputeRunningProcesses": fn("nvmlDeviceGetComputeRunningProcesses", processes),
        "nvmlDeviceGetComputeRunningProcesses_v2": fn("nvmlDeviceGetComputeRunningProcesses_v2", processes),
    }
    for name, replacement in override.items():
        if replacement is None:
            functions.pop(name)
        else:
            functions[name] = fn(name, replacement)
    return SimpleNamespace(
        NVMLError=FakeNVMLError,
        NVMLLibraryMismatchError=FakeLibraryMismatch,
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        NVML_ERROR_FUNCTION_NOT_FOUND=FUNCTION_NOT_FOUND,
        calls=calls,
        **functions,
    )


def read_one(nvml: SimpleNamespace) -> GpuReading:
    probe = NvmlProbe.open(nvml)
    assert isinstance(probe, NvmlProbe)
    (reading,) = probe.read()
    return reading


def test_reads_every_field() -> None:
    gpu = FakeGpu(reasons=SW_POWER_CAP, processes=[(4242, 18 * GIB), (4243, GIB), (99, None)])
    reading = read_one(fake_nvml([gpu]))
    assert reading == GpuReading(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        temperature_c=71.0,
        memory_used_bytes=20 * GIB,
        memory_total_bytes=24 * GIB,
        power_w=285.0,
        sm_clock_mhz=2520,
        utilization_ratio=0.97,
        clock_event_reasons=frozenset({"sw_power_cap"}),
        process_memory_bytes={4242: 18 * GIB, 4243: GIB},  # pid 99: NVML could not tell (WDDM)
    )


def test_several_gpus_keep_their_index_and_bytes_names_are_decoded() -> None:
    nvml = fake_nvml([FakeGpu(name=b"NVIDIA H200"), FakeGpu(temperature_c=40)])
    probe = NvmlProbe.open(nvml)
    readings = probe.read()
    assert [(r.index, r.name, r.temperature_c) for r in readings] == [
        (0, "NVIDIA H200", 71.0),
        (1, "NVIDIA GeForce RTX 4090", 40.0),
    ]


def test_current_clock_event_call_is_used_when_present() -> None:
    nvml = fake_nvml(
        [FakeGpu()],
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: SW_THERMAL,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: HW_THERMAL,
    )
    assert read_one(nvml).clock_event_reasons == frozenset({"sw_thermal_slowdown"})
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" not in nvml.calls


def test_deprecated_throttle_call_when_module_lacks_the_new_one() -> None:
    nvml = fake_nvml([FakeGpu(reasons=HW_THERMAL | SW_POWER_CAP)], nvmlDeviceGetCurrentClocksEventReasons=None)
    assert read_one(nvml).clock_event_reasons == frozenset({"hw_thermal_slowdown", "sw_power_cap"})


def test_deprecated_throttle_call_when_driver_lacks_the_new_function() -> None:
    nvml = fake_nvml([FakeGpu(reasons=SW_THERMAL)], fail={"nvmlDeviceGetCurrentClocksEventReasons": FUNCTION_NOT_FOUND})
    assert read_one(nvml).clock_event_reasons == frozenset({"sw_thermal_slowdown"})
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in nvml.calls


def test_deprecated_temperature_call_when_temperature_v_is_missing() -> None:
    missing = fake_nvml([FakeGpu(temperature_c=84)], nvmlDeviceGetTemperatureV=None)
    assert read_one(missing).temperature_c == 84.0
    old_driver = fake_nvml([FakeGpu(temperature_c=85)], fail={"nvmlDeviceGetTemperatureV": FUNCTION_NOT_FOUND})
    assert read_one(old_driver).temperature_c == 85.0


def test_versioned_process_call_when_the_unversioned_one_mismatches_the_library() -> None:
    def mismatch(h: int) -> list[object]:
        raise FakeLibraryMismatch("use nvmlDeviceGetComputeRunningProcesses_v2")

    nvml = fake_nvml([FakeGpu(processes=[(7, GIB)])], nvmlDeviceGetComputeRunningProcesses=mismatch)
    assert read_one(nvml).process_memory_bytes == {7: GIB}


def test_a_failing_field_is_none_and_the_others_are_read() -> None:
    nvml = fake_nvml(
        [FakeGpu()],
        fail={
            "nvmlDeviceGetPowerUsage": NOT_SUPPORTED,
            "nvmlDeviceGetComputeRunningProcesses": NO_PERMISSION,
            "nvmlDeviceGetName": NOT_SUPPORTED,
        },
    )
    reading = read_one(nvml)
    assert reading.power_w is None
    assert reading.process_memory_bytes is None  # no permission is not a fallback case
    assert reading.name == "GPU 0"
    assert reading.temperature_c == 71.0 and reading.memory_used_bytes == 20 * GIB


def test_no_reason_function_at_all_gives_none() -> None:
    nvml = fake_nvml(
        [FakeGpu()],
        nvmlDeviceGetCurrentClocksEventReasons=None,
        fail={"nvmlDeviceGetCurrentClocksThrottleReasons": FUNCTION_NOT_FOUND},
    )
    assert read_one(nvml).clock_event_reasons is None


def _no_gpu_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "no NVIDIA GPU / NVML: GPU metrics are off" in r.getMessage()]


def test_import_failure_means_no_gpu_and_one_info_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.INFO, logger="engines.gpu"):
        probe = NvmlProbe.open()
        assert probe.read() == []
        assert probe.read() == []
    assert isinstance(probe, NoGpu)
    (line,) = _no_gpu_lines(caplog)
    assert line.levelno == logging.INFO and "pynvml" in line.getMessage()


@pytest.mark.parametrize("error", [FakeNVMLError(12), OSError("libnvidia-ml.so.1: cannot open")])
def test_init_failure_means_no_gpu_and_one_info_line(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    def init() -> None:
        raise error

    nvml = fake_nvml([FakeGpu()], nvmlInit=init)
    with caplog.at_level(logging.INFO, logger="engines.gpu"):
        probe = NvmlProbe.open(nvml)
        assert probe.read() == []
    assert isinstance(probe, NoGpu)
    (line,) = _no_gpu_lines(caplog)
    assert "nvmlInit failed" in line.getMessage()
    assert "nvmlDeviceGetCount" not in nvml.calls


def test_zero_devices_means_no_gpu_and_nvml_is_shut_down(caplog: pytest.LogCaptureFixture) -> None:
    nvml = fake_nvml([])
    with caplog.at_level(logging.INFO, logger="engines.gpu"):
        probe = NvmlProbe.open(nvml)
    assert isinstance(probe, NoGpu) and probe.read() == []
    assert len(_no_gpu_lines(caplog)) == 1
    assert nvml.calls.count("nvmlShutdown") == 1


def test_init_once_and_close_once() -> None:
    nvml = fake_nvml([FakeGpu()])
    probe = NvmlProbe.open(nvml)
    assert isinstance(probe, NvmlProbe)
    probe.read()
    probe.read()
    probe.close()
    probe.close()
    assert nvml.calls.count("nvmlInit") == 1
    assert nvml.calls.count("nvmlShutdown") == 1
    assert probe.read() == []


def test_the_real_pynvml_never_crashes_here() -> None:
    """No GPU on CI machines: NoGpu. On a GPU box: one reading per device."""
    probe = NvmlProbe.open()
    try:
        readings = probe.read()
        assert all(isinstance(r, GpuReading) for r in readings)
    finally:
        probe.close()


def test_reason_bits_match_pynvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    expected = {
        "idle": pynvml.nvmlClocksEventReasonGpuIdle,
        "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
        "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
        "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
        "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
        "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
        "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        "hw_power_brake": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
        "display_clock_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
    }
    assert {name: bit for bit, name in CLOCK_EVENT_REASONS} == expected
    assert decode_clock_event_reasons(pynvml.nvmlClocksEventReasonAll) == frozenset(expected)
    assert decode_clock_event_reasons(0) == frozenset()


# -- ThermalGuard ------------------------------------------------------------------------------


def gpu(temperature_c: float | None, *reasons: str, index: int = 0) -> GpuReading:
    return GpuReading(index=index, name="4090", temperature_c=temperature_c, clock_event_reasons=frozenset(reasons))


def test_thermal_guard_hysteresis(caplog: pytest.LogCaptureFixture) -> None:
    guard = ThermalGuard(limit_c=83.0, hysteresis_c=5.0)
    with caplog.at_level(logging.INFO, logger="engines.gpu"):
        steps = [
            (gpu(80), False),
            (gpu(83), True),  # at the limit is hot
            (gpu(80), True),  # below the limit but not below 78
            (gpu(78), True),  # 78 is not below 78
            (gpu(77.9), False),
            (gpu(82.9), False),  # rising again, still under the limit
        ]
        assert [guard.update([reading]) for reading, _ in steps] == [hot for _, hot in steps]
    changes = [r for r in caplog.records if r.name == "engines.gpu"]
    assert [r.levelno for r in changes] == [logging.WARNING, logging.INFO]
    assert "83 °C" in changes[0].getMessage()


def test_thermal_reason_is_hot_at_any_temperature_and_must_clear() -> None:
    guard = ThermalGuard()
    assert guard.update([gpu(70, "hw_thermal_slowdown")]) is True
    assert guard.update([gpu(70, "hw_thermal_slowdown")]) is True
    assert guard.update([gpu(70, "sw_power_cap")]) is False  # power capping is not heat
    assert guard.update([gpu(70, "sw_thermal_slowdown")]) is True


def test_any_hot_gpu_counts_and_unknown_temperatures_do_not() -> None:
    guard = ThermalGuard(limit_c=83.0, hysteresis_c=3.0)
    assert guard.update([gpu(None), gpu(None, index=1)]) is False
    assert guard.update([gpu(60), gpu(90, index=1)]) is True
    assert guard.update([gpu(60), gpu(None, index=1)]) is False
    assert guard.update([]) is False


def test_negative_hysteresis_is_refused() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        ThermalGuard(hysteresis_c=-1)
