"""The GPU as NVML sees it, behind a small protocol; "no GPU" is a normal answer.

Open a probe once, read it whenever a number is wanted::

    probe = NvmlProbe.open()          # NvmlProbe, or NoGpu when NVML is absent
    for gpu in probe.read():
        print(gpu.index, gpu.temperature_c, gpu.clock_event_reasons)

Every field NVML refuses (not supported, no permission, a driver too old for the call) is ``None``;
a probe never raises from :meth:`GpuProbe.read`. Tests hand :meth:`NvmlProbe.open` a fake module with
the same function names instead of ``pynvml``.

:class:`ThermalGuard` turns readings into one decision: lower admission while the card is hot.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psutil

log = logging.getLogger(__name__)

T = TypeVar("T")

#: NVML's clock-event reason bits (``nvmlClocksEventReason*``; the same bits as the deprecated
#: ``nvmlClocksThrottleReason*``) and the names the metrics and logs use.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x0001, "idle"),
    (0x0002, "applications_clocks_setting"),
    (0x0004, "sw_power_cap"),
    (0x0008, "hw_slowdown"),
    (0x0010, "sync_boost"),
    (0x0020, "sw_thermal_slowdown"),
    (0x0040, "hw_thermal_slowdown"),
    (0x0080, "hw_power_brake"),
    (0x0100, "display_clock_setting"),
)
THERMAL_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})

# NVML's own constants, used when a (fake or old) module does not define them.
_NVML_TEMPERATURE_GPU = 0
_NVML_CLOCK_SM = 1
_NVML_ERROR_FUNCTION_NOT_FOUND = 13


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. ``None`` means NVML would not say.

    ``process_memory_bytes`` maps pid -> bytes of GPU memory for compute processes (vLLM engines).

    >>> GpuReading(index=0, name="NVIDIA GeForce RTX 4090", temperature_c=71.0).temperature_c
    71.0
    """

    index: int
    name: str
    temperature_c: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    sm_clock_mhz: int | None = None
    utilization_ratio: float | None = None
    clock_event_reasons: frozenset[str] | None = None
    process_memory_bytes: Mapping[int, int] | None = None


class GpuProbe(Protocol):
    """Anything that can report the GPUs; ``read()`` returns ``[]`` when there are none.

    >>> probe: GpuProbe = NoGpu("no driver")
    >>> probe.read()
    []
    """

    def read(self) -> list[GpuReading]: ...


class NoGpu:
    """The probe for a machine without NVIDIA GPU or NVML: it reads nothing.

    >>> NoGpu("libnvidia-ml.so.1 not found").read()
    []
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        return None


def decode_clock_event_reasons(mask: int) -> frozenset[str]:
    """Names of the reason bits set in an NVML clock-event mask.

    >>> sorted(decode_clock_event_reasons(0x20 | 0x04))
    ['sw_power_cap', 'sw_thermal_slowdown']
    """
    return frozenset(name for bit, name in CLOCK_EVENT_REASONS if mask & bit)


class _Unavailable(Exception):
    """No function for this field exists in this NVML (module or driver)."""


class NvmlProbe:
    """Reads temperature, memory, power, SM clock, utilization, clock-event reasons and per-process
    memory of every GPU through NVML, initialised once::

        probe = NvmlProbe.open()             # or NvmlProbe.open(fake_nvml) in tests
        probe.read()[0].memory_total_bytes   # 25757220864 on a 24 GiB card

    Current NVML calls come first; deprecated ones (``nvmlDeviceGetCurrentClocksThrottleReasons``,
    ``nvmlDeviceGetTemperature``) are used only where the new call is missing from the module or
    the driver.
    """

    def __init__(self, nvml: Any, handles: Sequence[object]) -> None:
        self._nvml = nvml
        self._handles = list(handles)
        self._error: type[BaseException] = nvml.NVMLError
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        self._mismatch: tuple[type[BaseException], ...] = (
            (mismatch,) if isinstance(mismatch, type) and issubclass(mismatch, BaseException) else ()
        )
        self._not_found = getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", _NVML_ERROR_FUNCTION_NOT_FOUND)

    @classmethod
    def open(cls, nvml: Any = None) -> NvmlProbe | NoGpu:
        """Initialise NVML and find the GPUs; any failure gives :class:`NoGpu` and one info line.

        ``nvml`` defaults to ``pynvml`` (package ``nvidia-ml-py``), imported here, not at module load.
        """
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                return _no_gpu(f"cannot import pynvml: {exc}")
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, OSError from ctypes: all mean "no GPU here"
            return _no_gpu(f"nvmlInit failed: {exc}")
        try:
            count = int(nvml.nvmlDeviceGetCount())
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            _shutdown(nvml)
            return _no_gpu(f"cannot list devices: {exc}")
        if not handles:
            _shutdown(nvml)
            return _no_gpu("NVML reports 0 devices")
        log.info("NVML: %d GPU(s) found", len(handles))
        return cls(nvml, handles)

    def close(self) -> None:
        """Shut NVML down; the probe reads nothing afterwards."""
        if self._handles:
            self._handles = []
            _shutdown(self._nvml)

    def read(self) -> list[GpuReading]:
        return [self._read_one(index, handle) for index, handle in enumerate(self._handles)]

    def _read_one(self, index: int, handle: object) -> GpuReading:
        nvml = self._nvml
        memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        utilization = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        sm_clock = self._field(
            lambda: nvml.nvmlDeviceGetClockInfo(handle, getattr(nvml, "NVML_CLOCK_SM", _NVML_CLOCK_SM))
        )
        reasons = self._field(
            lambda: self._first(
                ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
                handle,
            )
        )
        return GpuReading(
            index=index,
            name=self._name(index, handle),
            temperature_c=self._temperature(handle),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            sm_clock_mhz=None if sm_clock is None else int(sm_clock),
            utilization_ratio=None if utilization is None else float(utilization.gpu) / 100.0,
            clock_event_reasons=None if reasons is None else decode_clock_event_reasons(int(reasons)),
            process_memory_bytes=self._field(lambda: self._process_memory(handle)),
        )

    def _name(self, index: int, handle: object) -> str:
        name = self._field(lambda: self._nvml.nvmlDeviceGetName(handle))
        if isinstance(name, bytes):
            return name.decode(errors="replace")
        return str(name) if name is not None else f"GPU {index}"

    def _temperature(self, handle: object) -> float | None:
        sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)
        value = self._field(
            lambda: self._first(("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"), handle, sensor)
        )
        return None if value is None else float(value)

    def _process_memory(self, handle: object) -> dict[int, int]:
        processes = self._first(
            ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"), handle
        )
        memory: dict[int, int] = {}
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            if used is not None:  # None: NVML cannot tell (WDDM)
                memory[int(process.pid)] = memory.get(int(process.pid), 0) + int(used)
        return memory

    def _first(self, names: Sequence[str], *args: object) -> Any:
        """Call the first of ``names`` that this module and driver have."""
        for name in names:
            function = getattr(self._nvml, name, None)
            if function is None:
                continue
            try:
                return function(*args)
            except self._mismatch:
                continue
            except self._error as exc:
                if getattr(exc, "value", None) != self._not_found:
                    raise
        raise _Unavailable(" / ".join(names))

    def _field(self, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except (self._error, _Unavailable) as exc:
            log.debug("NVML field unavailable: %s", exc)
            return None


def card_total_gib(probe: GpuProbe) -> float | None:
    """Total memory of GPU 0 in GiB, as NVML reports it; None when there is no GPU or NVML will not say.

    >>> card_total_gib(NoGpu("no driver")) is None
    True
    """
    readings = probe.read()
    total = readings[0].memory_total_bytes if readings else None
    return None if not total else total / 1024**3


def engine_gpu_bytes(probe: GpuProbe, pid: int) -> int:
    """GPU memory held by a process and its descendants (vLLM's workers hold the weights), per NVML."""
    try:
        root = psutil.Process(pid)
        pids = {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.Error:
        return 0
    total = 0
    for reading in probe.read():
        for p, used in (reading.process_memory_bytes or {}).items():
            if p in pids:
                total += used
    return total


def _no_gpu(reason: str) -> NoGpu:
    log.info("no NVIDIA GPU / NVML: GPU metrics are off (%s)", reason)
    return NoGpu(reason)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:
        log.debug("nvmlShutdown failed: %s", exc)


class ThermalGuard:
    """Says whether admission should be lowered because the card is hot, with hysteresis.

    Hot: any GPU at or above ``limit_c``, or a thermal clock-event reason active. Back to normal only
    once every GPU is below ``limit_c - hysteresis_c`` and no thermal reason is active, so a card
    hovering at the limit does not flap.

    >>> guard = ThermalGuard(limit_c=83.0, hysteresis_c=5.0)
    >>> guard.update([GpuReading(index=0, name="4090", temperature_c=84.0)])
    True
    >>> guard.update([GpuReading(index=0, name="4090", temperature_c=80.0)])   # not yet below 78
    True
    """

    def __init__(self, limit_c: float = 83.0, hysteresis_c: float = 5.0) -> None:
        if hysteresis_c < 0:
            raise ValueError(f"hysteresis_c must be >= 0, got {hysteresis_c}")
        self.limit_c = limit_c
        self.hysteresis_c = hysteresis_c
        self.hot = False

    def update(self, readings: Sequence[GpuReading]) -> bool:
        """Take new readings; return whether admission should be lowered now."""
        hot_reasons = [why for reading in readings if (why := self._why_hot(reading))]
        if self.hot:
            if not hot_reasons and all(self._cool(reading) for reading in readings):
                self.hot = False
                log.info("GPU cooled below %.0f °C: admission back to normal", self.limit_c - self.hysteresis_c)
        elif hot_reasons:
            self.hot = True
            log.warning("GPU hot (%s): lowering admission", "; ".join(hot_reasons))
        return self.hot

    def _why_hot(self, reading: GpuReading) -> str:
        why: list[str] = []
        if reading.temperature_c is not None and reading.temperature_c >= self.limit_c:
            why.append(f"{reading.temperature_c:.0f} °C >= limit {self.limit_c:.0f} °C")
        thermal = sorted((reading.clock_event_reasons or frozenset()) & THERMAL_REASONS)
        if thermal:
            why.append("clock events " + ", ".join(thermal))
        return f"GPU {reading.index}: " + " and ".join(why) if why else ""

    def _cool(self, reading: GpuReading) -> bool:
        return reading.temperature_c is None or reading.temperature_c < self.limit_c - self.hysteresis_c
