"""Every Prometheus metric the gateway exports, declared once, with fixed labels.

One :class:`Metrics` per app (made in ``lifespan``, passed down; no globals). It owns its own
``CollectorRegistry``; ``/metrics`` returns :meth:`Metrics.render`::

    metrics = Metrics(gpu_probe=NvmlProbe.open(), pid_to_model=lambda pid: None)   # pid -> model name
    metrics.observe_request("llama-8b", 200, 0.84)
    body, content_type = metrics.render()

What one scrape holds:

==============  ====================================================================================
per model       ``onecard_requests_total{model,status}``, ``onecard_request_errors_total{model,kind}``,
                ``onecard_request_duration_seconds{model}``, ``onecard_time_to_first_token_seconds``,
                ``onecard_decode_tokens_per_second`` (gauge, last request) and
                ``onecard_decode_rate_tokens_per_second`` (histogram), prompt/completion token
                counters, ``onecard_queue_depth``, ``onecard_queue_wait_seconds``,
                ``onecard_in_flight_requests``
per engine      ``onecard_engine_state{model,state}`` (1 for the current state), ``onecard_swaps_total
                {model,kind}``, ``onecard_swap_duration_seconds{kind}``,
                ``onecard_engine_start_failures_total``, ``onecard_engine_restarts_total``
gateway         ``onecard_lease_active``, ``onecard_lease_granted_gib``, ``onecard_thermal_limit_active``,
                ``onecard_admission_limit``, ``onecard_build_info{version}``, ``process_*`` (this process)
GPU (NVML)      ``onecard_gpu_*{gpu}`` read at scrape time; absent without a GPU
engines         each engine's own ``vllm:*`` series, re-exported with a ``model`` label
==============  ====================================================================================

Label values are bounded: ``model`` is a registered model name or :data:`UNKNOWN_MODEL`, the other
labels come from fixed sets (HTTP status codes, :data:`ENGINE_STATES`, :data:`SWAP_KINDS`, GPU
indexes, NVML clock-event reasons).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

from engines.pool import GpuProbe
from gateway.collectors import OTHER_PROCESS, GpuCollector, VllmReexport

__all__ = ["CONTENT_TYPE", "ENGINE_STATES", "OTHER_PROCESS", "SWAP_KINDS", "UNKNOWN_MODEL", "GpuCollector", "Metrics",
           "VllmReexport", "decode_rate"]

#: The ``model`` label for requests that name no registered model.
UNKNOWN_MODEL = "_unknown"
#: The values of ``engines.state.EngineState``, in order.
ENGINE_STATES: tuple[str, ...] = ("stopped", "starting", "ready", "draining", "sleeping", "stopping", "failed")
#: How a model was made resident: started from nothing, woken from sleep, loaded beside another.
SWAP_KINDS: tuple[str, ...] = ("cold", "wake", "co_load")
#: The text format every Prometheus 2.x reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 120, 300)
DECODE_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300)


class Metrics:
    """The gateway's metrics and the calls that feed them; one instance per app.

    >>> metrics = Metrics(version="0.1.0")
    >>> metrics.observe_tokens("llama-8b", 812, 129, ttft_s=0.21, decode_s=1.6)   # 80 tokens/s
    80.0
    """

    def __init__(
        self,
        *,
        version: str | None = None,
        gpu_probe: GpuProbe | None = None,
        pid_to_model: Callable[[int], str | None] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # per model
        self.requests = Counter(
            "onecard_requests", "Requests answered, by HTTP status.", ["model", "status"], registry=r
        )
        self.request_errors = Counter(
            "onecard_request_errors", "Failed requests, by kind of failure.", ["model", "kind"], registry=r
        )
        self.request_duration = Histogram(
            "onecard_request_duration_seconds",
            "Time from request received to last byte sent, queueing and swaps included.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "onecard_time_to_first_token_seconds",
            "Time from request received to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_tokens_per_second = Gauge(
            "onecard_decode_tokens_per_second",
            "Decode throughput of the last request: (completion tokens - 1) / (last token - first token).",
            ["model"],
            registry=r,
        )
        self.decode_rate = Histogram(
            "onecard_decode_rate_tokens_per_second",
            "Per-request decode throughput: (completion tokens - 1) / (last token - first token).",
            ["model"],
            buckets=DECODE_RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "onecard_prompt_tokens", "Prompt tokens, as the engine reported them.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "onecard_completion_tokens",
            "Completion tokens, as the engine reported them.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "onecard_queue_depth",
            "Requests waiting for this model to become resident.",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "onecard_queue_wait_seconds",
            "Time a request waited in its model's queue before being sent to an engine.",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "onecard_in_flight_requests",
            "Requests sent to an engine and not yet finished.",
            ["model"],
            registry=r,
        )
        # per engine
        self.engine_state = Gauge(
            "onecard_engine_state",
            "1 for the engine's current state, 0 for the others.",
            ["model", "state"],
            registry=r,
        )
        self.swaps = Counter(
            "onecard_swaps",
            "Models made resident, by kind (cold, wake, co_load).",
            ["model", "kind"],
            registry=r,
        )
        self.swap_duration = Histogram(
            "onecard_swap_duration_seconds",
            "Time to make a model resident and ready, by kind.",
            ["kind"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.engine_start_failures = Counter(
            "onecard_engine_start_failures", "Engine starts that did not reach ready.", ["model"], registry=r
        )
        self.engine_restarts = Counter(
            "onecard_engine_restarts", "Engines restarted after a crash.", ["model"], registry=r
        )
        # gateway
        self.lease_active = Gauge("onecard_lease_active", "1 while the GPU lease is held.", registry=r)
        self.lease_granted_gib = Gauge("onecard_lease_granted_gib", "GPU memory granted by the lease, GiB.", registry=r)
        self.thermal_limit_active = Gauge(
            "onecard_thermal_limit_active", "1 while admission is lowered because the GPU is hot.", registry=r
        )
        self.admission_limit = Gauge("onecard_admission_limit", "Requests admitted to the engines at once.", registry=r)
        self.build_info = Gauge("onecard_build_info", "The running gateway's version.", ["version"], registry=r)
        self.build_info.labels(version or _own_version()).set(1)
        # collectors read at scrape time
        self.vllm = VllmReexport()
        r.register(self.vllm)
        self.gpu: GpuCollector | None = None
        if gpu_probe is not None:
            self.gpu = GpuCollector(gpu_probe, pid_to_model)
            r.register(self.gpu)
        if process_metrics:
            ProcessCollector(registry=r)
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, bound once: the request path then pays a dict lookup, not the
        label checks and lock of ``labels()``. A child is made on first use, as ``labels()`` makes it, so
        a scrape holds exactly the series it would otherwise (none is created ahead, none removed)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- requests -------------------------------------------------------------------------------

    def observe_request(self, model: str, status: int | str, duration_s: float) -> None:
        """Count one answered request and its duration.

        Example: ``metrics.observe_request("llama-8b", 200, 0.84)``
        """
        self._child(self.requests, model, str(status)).inc()
        self._child(self.request_duration, model).observe(max(0.0, duration_s))

    def observe_error(self, model: str, kind: str) -> None:
        """Count one failure of a kind from the error tree (``engine_failed``, ``timeout``, ...).

        Example: ``metrics.observe_error("llama-8b", "engine_failed")``
        """
        self._child(self.request_errors, model, kind).inc()

    def observe_tokens(
        self,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        ttft_s: float | None,
        decode_s: float | None,
    ) -> float | None:
        """Record one finished request's tokens and timing; return its decode rate (tokens/s).

        ``ttft_s``: request received -> first token. ``decode_s``: first token -> last token. The rate
        is ``(completion_tokens - 1) / decode_s``: the first token belongs to prefill, so it is not
        counted; no rate is made up when a number is missing, ``completion_tokens <= 1`` or
        ``decode_s <= 0``::

            metrics.observe_tokens("llama-8b", 812, 129, ttft_s=0.21, decode_s=1.6)
            # -> 80.0 tokens/s
        """
        if prompt_tokens:
            self._child(self.prompt_tokens, model).inc(max(0, prompt_tokens))
        if completion_tokens:
            self._child(self.completion_tokens, model).inc(max(0, completion_tokens))
        if ttft_s is not None and ttft_s >= 0:
            self._child(self.ttft, model).observe(ttft_s)
        rate = decode_rate(completion_tokens, decode_s)
        if rate is not None:
            self._child(self.decode_tokens_per_second, model).set(rate)
            self._child(self.decode_rate, model).observe(rate)
        return rate

    def request_started(self, model: str) -> None:
        """One more request in flight to an engine; pair with :meth:`request_finished`."""
        self._child(self.in_flight, model).inc()

    def request_finished(self, model: str) -> None:
        self._child(self.in_flight, model).dec()

    # -- queues ---------------------------------------------------------------------------------

    def set_queue(self, model: str, depth: int) -> None:
        """Set how many requests wait for ``model``.

        Example: ``metrics.set_queue("judge-70b", 3)``
        """
        self._child(self.queue_depth, model).set(depth)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self._child(self.queue_wait, model).observe(max(0.0, seconds))

    # -- engines --------------------------------------------------------------------------------

    def set_engine_state(self, model: str, state: str) -> None:
        """Mark ``state`` (an ``EngineState`` or its value) as ``model``'s current one.

        Example: ``metrics.set_engine_state("llama-8b", "ready")``
        """
        current = str(state)
        if current not in ENGINE_STATES:
            raise ValueError(f"unknown engine state {current!r}; expected one of {ENGINE_STATES}")
        for name in ENGINE_STATES:
            self.engine_state.labels(model, name).set(1 if name == current else 0)

    def on_engine_transition(self, model: str, old: str, new: str) -> None:
        """A ``StateMachine`` listener: ``StateMachine(name, listeners=[metrics.on_engine_transition])``."""
        self.set_engine_state(model, new)

    def observe_swap(self, model: str, kind: str, seconds: float) -> None:
        """Count one swap (``cold``, ``wake`` or ``co_load``) and how long it took.

        Example: ``metrics.observe_swap("judge-70b", "wake", 2.4)``
        """
        if kind not in SWAP_KINDS:
            raise ValueError(f"unknown swap kind {kind!r}; expected one of {SWAP_KINDS}")
        self.swaps.labels(model, kind).inc()
        self.swap_duration.labels(kind).observe(max(0.0, seconds))

    def observe_start_failure(self, model: str) -> None:
        self.engine_start_failures.labels(model).inc()

    def observe_restart(self, model: str) -> None:
        self.engine_restarts.labels(model).inc()

    def update_engine_metrics(self, model: str, text: str) -> None:
        """Replace ``model``'s re-exported ``vllm:*`` series with a fresh scrape of its ``/metrics``.

        Parsing takes milliseconds for a large scrape: call it off the event loop
        (``await asyncio.to_thread(metrics.update_engine_metrics, name, text)``).
        """
        self.vllm.update(model, text)

    def forget_engine_metrics(self, model: str) -> None:
        """Stop re-exporting ``model``'s ``vllm:*`` series (its engine stopped)."""
        self.vllm.forget(model)

    # -- gateway --------------------------------------------------------------------------------

    def set_lease(self, active: bool, granted_gib: float) -> None:
        self.lease_active.set(1 if active else 0)
        self.lease_granted_gib.set(granted_gib if active else 0.0)

    def set_thermal_limit(self, active: bool) -> None:
        """Show whether :class:`engines.gpu.ThermalGuard` has lowered admission."""
        self.thermal_limit_active.set(1 if active else 0)

    def set_admission_limit(self, limit: int) -> None:
        self.admission_limit.set(limit)

    def render(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type.

        It reads NVML: serve it with ``await asyncio.to_thread(metrics.render)``::

            body, content_type = metrics.render()
        """
        return generate_latest(self.registry), CONTENT_TYPE


def decode_rate(completion_tokens: int | None, decode_s: float | None) -> float | None:
    """Decode tokens/s of one request, or ``None`` when it cannot be told honestly.

    >>> decode_rate(129, 1.6)
    80.0
    >>> decode_rate(1, 0.0) is None
    True
    """
    if completion_tokens is None or decode_s is None or completion_tokens <= 1 or decode_s <= 0:
        return None
    return (completion_tokens - 1) / decode_s


def _own_version() -> str:
    try:
        return package_version("onecard")
    except PackageNotFoundError:
        return "unknown"
