"""The collectors ``/metrics`` reads at scrape time: the GPU through NVML, and the engines' own series.

::

    registry.register(GpuCollector(NvmlProbe.open(), lambda pid: None))   # onecard_gpu_*{gpu}
    reexport = VllmReexport()
    registry.register(reexport)
    reexport.update("llama-8b", engine_metrics_text)   # vllm:* series with a model label

Neither is on the request path: both run when Prometheus scrapes (:meth:`gateway.metrics.Metrics.render`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from engines.pool import CLOCK_EVENT_REASONS, GpuProbe, GpuReading

log = logging.getLogger(__name__)

#: The ``model`` label for GPU processes that belong to no engine.
OTHER_PROCESS = "_other"


class GpuCollector(Collector):
    """``onecard_gpu_*`` series, read from a :class:`engines.gpu.GpuProbe` at every scrape.

    ``pid_to_model`` names the model whose engine owns a GPU process (``None``: not ours); their
    memory is summed per model, the rest under :data:`OTHER_PROCESS`::

        registry.register(GpuCollector(NvmlProbe.open(), lambda pid: None))
    """

    def __init__(self, probe: GpuProbe, pid_to_model: Callable[[int], str | None] | None = None) -> None:
        self._probe = probe
        self._pid_to_model = pid_to_model or (lambda pid: None)
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self._families(self._probe.read()))
        except Exception:
            # A probe (or pid_to_model) must not raise; if one does, the rest of the scrape still goes out.
            if not self._failing:
                log.exception("GPU probe failed; GPU series left out of /metrics")
            self._failing = True
            return []
        self._failing = False
        return families

    def _families(self, readings: list[GpuReading]) -> Iterator[Metric]:
        simple: list[tuple[str, str, Callable[[GpuReading], float | None]]] = [
            ("onecard_gpu_temperature_celsius", "GPU core temperature.", lambda g: g.temperature_c),
            ("onecard_gpu_memory_used_bytes", "GPU memory in use.", lambda g: g.memory_used_bytes),
            ("onecard_gpu_memory_total_bytes", "GPU memory in all.", lambda g: g.memory_total_bytes),
            ("onecard_gpu_power_watts", "GPU power draw.", lambda g: g.power_w),
            ("onecard_gpu_sm_clock_mhz", "GPU SM clock.", lambda g: g.sm_clock_mhz),
            (
                "onecard_gpu_utilization_ratio",
                "Share of the last sample period a kernel ran (0-1).",
                lambda g: g.utilization_ratio,
            ),
        ]
        for name, documentation, value_of in simple:
            family = GaugeMetricFamily(name, documentation, labels=["gpu"])
            for reading in readings:
                value = value_of(reading)
                if value is not None:
                    family.add_metric([str(reading.index)], float(value))
            if family.samples:
                yield family
        events = GaugeMetricFamily(
            "onecard_gpu_clock_event_active",
            "1 while an NVML clock-event (throttle) reason is active.",
            labels=["gpu", "reason"],
        )
        processes = GaugeMetricFamily(
            "onecard_gpu_process_memory_bytes",
            "GPU memory held by each model's engine processes.",
            labels=["gpu", "model"],
        )
        for reading in readings:
            gpu = str(reading.index)
            if reading.clock_event_reasons is not None:
                for _, reason in CLOCK_EVENT_REASONS:
                    events.add_metric([gpu, reason], 1.0 if reason in reading.clock_event_reasons else 0.0)
            by_model: dict[str, int] = {}
            for pid, used in (reading.process_memory_bytes or {}).items():
                model = self._pid_to_model(pid) or OTHER_PROCESS
                by_model[model] = by_model.get(model, 0) + used
            for model, used in sorted(by_model.items()):
                processes.add_metric([gpu, model], float(used))
        for family in (events, processes):
            if family.samples:
                yield family


class VllmReexport(Collector):
    """The engines' own ``vllm:*`` series, re-exported under their own names with a ``model`` label::

        reexport = VllmReexport()
        reexport.update("llama-8b", engine_metrics_text)   # after each scrape of the engine
        reexport.forget("llama-8b")                        # when the engine stops

    Each series keeps vLLM's labels (``engine``, ``model_name``, ``le``...) and gains ``model``.
    ``*_created`` samples (the engine's start time per series) and sample timestamps are dropped.
    Families of the same name from several engines are merged into one, so the scrape stays valid.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("vllm:",)) -> None:
        self._prefixes = prefixes
        self._lock = threading.Lock()
        self._by_model: dict[str, list[Metric]] = {}

    def update(self, model: str, text: str) -> None:
        """Parse one engine scrape; a text that does not parse raises ``ValueError`` and changes nothing."""
        try:
            families = [
                relabeled
                for family in text_string_to_metric_families(text)
                if family.name.startswith(self._prefixes) and (relabeled := _relabel(family, model)) is not None
            ]
        except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad text
            raise ValueError(f"engine {model}: cannot parse its /metrics: {exc}") from exc
        with self._lock:
            self._by_model[model] = families

    def forget(self, model: str) -> None:
        with self._lock:
            self._by_model.pop(model, None)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            snapshot = sorted(self._by_model.items())
        merged: dict[str, Metric] = {}
        for _, families in snapshot:
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                if target.type == family.type:  # engines of different vLLM versions may disagree
                    target.samples.extend(family.samples)
        return list(merged.values())


def _relabel(family: Metric, model: str) -> Metric | None:
    out = Metric(family.name, family.documentation, family.type)
    out.samples = [
        Sample(sample.name, {**sample.labels, "model": model}, sample.value)
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]
    return out if out.samples else None
