"""The gateway's shared objects, created once in the app's lifespan and reached through ``app.state.gw``.

No module-level state: everything a handler needs hangs off one :class:`Gateway`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from engines.errors import EngineError
from engines.pool import EnginePool, EngineState, ManagerEvents, header_value
from engines.registry import Registry, Target
from gateway.bodies import BodyParser
from gateway.engine_http import EngineClient
from gateway.errors import Overloaded
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.usage import Usage
from gateway.users import People


class Admission:
    """A concurrency limit that can be lowered and raised at run time (the thermal guard uses it)."""

    def __init__(self, limit: int | None = None, *, max_wait_s: float = 30.0) -> None:
        self.limit = limit
        self.active = 0
        self.max_wait_s = max_wait_s
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        """Take a slot, waiting at most ``max_wait_s`` under a limit; then 429 with Retry-After."""
        if self.limit is None:
            self.active += 1
            return
        async with self._cond:
            try:
                async with asyncio.timeout(self.max_wait_s):
                    await self._cond.wait_for(lambda: self.limit is None or self.active < self.limit)
            except TimeoutError:
                raise Overloaded(
                    f"the GPU is hot and admitted concurrency is lowered to {self.limit}; retry shortly",
                    retry_after=10,
                ) from None
            self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.limit is not None:
            asyncio.get_running_loop().create_task(self._notify())

    async def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        await self._notify()

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()


class MetricsEvents(ManagerEvents):
    """Feeds engine-manager events into the metrics."""

    def __init__(self, metrics: Metrics, usage: Usage | None = None) -> None:
        self.metrics = metrics
        self.usage = usage

    def state_changed(self, model: str, old: EngineState, new: EngineState) -> None:
        self.metrics.on_engine_transition(model, old.value, new.value)

    def swapped(self, model: str, kind: str, seconds: float, reason: str) -> None:
        self.metrics.observe_swap(model, kind, seconds)

    def start_failed(self, model: str, error: EngineError) -> None:
        self.metrics.observe_start_failure(model)

    def queue_changed(self, model: str, depth: int) -> None:
        self.metrics.set_queue(model, depth)

    def queue_waited(self, model: str, seconds: float) -> None:
        self.metrics.observe_queue_wait(model, seconds)

    def lease_changed(self, active: bool, gib: float) -> None:
        self.metrics.set_lease(active, gib)

    def restarted(self, model: str) -> None:
        self.metrics.observe_restart(model)

    def swap_caused(self, model: str, user: str) -> None:
        if self.usage is not None:
            self.usage.swap(model, user=user)


@dataclass
class Gateway:
    settings: Settings
    registry: Registry
    client: httpx.AsyncClient  # control plane: health, probes, sleep/wake, LoRA, metrics scrape
    session: EngineClient  # data path: client requests relayed by the proxy
    metrics: Metrics
    pool: EnginePool  # the one door into the engines
    proxy: Proxy
    admission: Admission = field(default_factory=Admission)
    bodies: BodyParser = field(default_factory=lambda: BodyParser(256 * 1024))
    people: People = field(default_factory=lambda: People(None))
    usage: Usage | None = None
    started_at: float = field(default_factory=time.time)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    vllm_version: str | None = None  # read once from the executable at start; an engine's own report wins
    #: model -> (its engine's key, its record, the response headers that carry it), rebuilt per engine process
    _records: dict[str, tuple[tuple[str, str | None], dict[str, Any], dict[str, str]]] = field(default_factory=dict)

    def resolve(self, name: str) -> Target | None:
        return self.pool.resolve(name)

    def model_names(self) -> list[str]:
        return self.pool.model_names()

    def record(self, model: str) -> dict[str, Any]:
        """The reproducibility record of a model: source and revision, and once running, vLLM and flags.
        Built once per engine process (and per reported version)."""
        key = (model, self.pool.engine_id(model))
        cached = self._records.get(model)
        if cached is None or cached[0] != key:
            record = {"vllm_version": self.vllm_version, **self.provenance.get(model, {}),
                      **self.pool.engine_record(model)}
            cached = (key, record, {"x-onecard-model": model, "x-onecard-provenance": header_value(record)})
            self._records[model] = cached
        return cached[1]

    def set_vllm_version(self, found: str | None) -> None:
        self.vllm_version = found
        self._records.clear()

    def response_headers(self, model: str) -> dict[str, str]:
        """The headers every answer of ``model`` carries (one dict per engine process: read, never change)."""
        self.record(model)
        return self._records[model][2]

    def model_cards(self) -> list[dict[str, Any]]:
        """Every model, alias and adapter, OpenAI-shaped, with state and footprint in ``onecard``."""
        cards: list[dict[str, Any]] = []
        created = int(self.started_at)
        snap = self.pool.snapshot()
        for spec in self.registry.models:
            engine = snap.engine(spec.name)
            plan = engine.plan
            info: dict[str, Any] = {
                "kind": "model",
                "state": engine.state.value,
                "footprint_gib": round(plan.resident_gib, 2),
                "verdict": plan.verdict.value,
                "quantization": spec.effective_quantization.value,
                "max_model_len": spec.max_model_len,
                "pinned": spec.pinned,
                "source": spec.source,
                **self.record(spec.name),
            }
            cards.append({"id": spec.name, "object": "model", "created": created, "owned_by": "onecard",
                          "root": spec.source, "parent": None, "max_model_len": spec.max_model_len,
                          "onecard": info})
            for alias in spec.aliases:
                cards.append({"id": alias, "object": "model", "created": created, "owned_by": "onecard",
                              "root": spec.source, "parent": spec.name, "max_model_len": spec.max_model_len,
                              "onecard": {**info, "kind": "alias", "base": spec.name}})
            adapters = [(name, ad.path, False) for name, ad in spec.lora.adapters.items()]
            adapters += [(f.name, str(f.path), True) for f in snap.discovered if f.base == spec.name]
            for name, path, discovered in adapters:
                cards.append({"id": name, "object": "model", "created": created, "owned_by": "onecard",
                              "root": path, "parent": spec.name, "max_model_len": spec.max_model_len,
                              "onecard": {**info, "kind": "adapter", "base": spec.name, "discovered": discovered,
                                          "loaded": name in engine.adapters}})
        return cards
