"""A fake ``pynvml`` (package ``nvidia-ml-py``) that reports the simulated card of :mod:`tests.fakes.simcard`.

Put this folder first on ``PYTHONPATH`` of a gateway process and set ``STANDIN_SIMCARD`` to the ledger:
the gateway's real NVML code (``engines/gpu.py``, ``engines/planner.py`` ``detect_budget_gib``) then
reads that card: total and used memory, per-process memory of every engine and trainer, temperature,
power. Without ``STANDIN_SIMCARD``, ``nvmlInit`` fails as it does on a machine with no driver.

Only the calls the gateway makes exist; names, units and errors are NVML's (memory in bytes, power in
milliwatts, temperature in °C).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tests.fakes.simcard import ENV_LEDGER, Card, Ledger

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass(frozen=True)
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass(frozen=True)
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int


_ledger: Ledger | None = None


def nvmlInit() -> None:
    global _ledger
    path = os.environ.get(ENV_LEDGER)
    if not path or not os.path.exists(path):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _ledger = Ledger(path)


def nvmlShutdown() -> None:
    global _ledger
    _ledger = None


def _card(handle: Any) -> Card:
    if _ledger is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    if handle != 0:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _ledger.read()


def nvmlDeviceGetCount() -> int:
    _card(0)
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if index != 0:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    _card(0)
    return 0


def nvmlDeviceGetName(handle: Any) -> str:
    return _card(handle).name


def nvmlDeviceGetMemoryInfo(handle: Any) -> c_nvmlMemory_t:
    card = _card(handle)
    return c_nvmlMemory_t(total=card.total, free=card.free, used=card.used)


def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[c_nvmlProcessInfo_t]:
    return [c_nvmlProcessInfo_t(pid, h.on_card) for pid, h in sorted(_card(handle).holders.items()) if h.on_card]


def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
    return int(_card(handle).temperature_c)


def nvmlDeviceGetPowerUsage(handle: Any) -> int:
    return int(_card(handle).power_w * 1000)


def nvmlDeviceGetUtilizationRates(handle: Any) -> c_nvmlUtilization_t:
    card = _card(handle)
    busy = 30 if any(h.on_card for h in card.holders.values()) else 0
    return c_nvmlUtilization_t(gpu=busy, memory=round(100 * card.used / card.total) if card.total else 0)


def nvmlDeviceGetClockInfo(handle: Any, clock_type: int) -> int:
    _card(handle)
    return 2520


def nvmlDeviceGetCurrentClocksEventReasons(handle: Any) -> int:
    _card(handle)
    return 0
