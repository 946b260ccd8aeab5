"""The console: one live page of the card, served by the gateway at ``/`` and ``/console``.

The page is plain HTML, CSS and one small script shipped in ``gateway/static`` (no build step, nothing
fetched from elsewhere). It polls one snapshot and uses the gateway's own admin routes for actions::

    GET  /console                        the page (also at /); open, it holds no data
    GET  /console/assets/console.js      its script and style sheet; open
    GET  /console/snapshot               everything the page shows, as JSON (an API key where keys are set)
    POST /admin/engines/{name}/unload    ... actions go to the admin routes, with the admin key

The snapshot is built from the same objects as ``/admin/*`` and ``onecard ps`` (the payload functions of
``gateway.api.admin``, the plan, the NVML probe): there is no second record of the card. Per-user usage
is not in it: the page asks ``/admin/usage`` for it, with the admin key, where the gateway has that route.

Why a poll and not server-sent events: uvicorn's graceful shutdown waits for every open response, and an
event stream never ends, so an open console would hold a restart for the whole grace period. A poll every
half second is live within a second, and it survives a gateway restart with nothing to reconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from engines.pool import EngineInfo, EngineState, GpuProbe, GpuReading, Plan, Snapshot, engine_gpu_bytes
from gateway.api.admin import adapters_payload, engines_payload, leases_payload, swaps_payload
from gateway.context import Gateway

router = APIRouter()

#: Paths anyone may fetch: the page and its assets hold no data (the snapshot and actions keep their rules).
PAGE_PATHS = frozenset({"/", "/console"})
ASSET_PREFIX = "/console/assets/"
#: The files the page is made of, and their media types; nothing else under ``gateway/static`` is served.
ASSETS: Mapping[str, str] = {
    "console.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
#: The page runs only its own script and style sheet, talks only to this gateway, and cannot be framed.
PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: How many swaps the timeline shows.
TIMELINE_SWAPS = 30
#: How often NVML is read for the page, at most (every poll of every open tab shares one reading).
GPU_READ_EVERY_S = 1.0
#: States in which an engine holds its memory on the card.
RESIDENT_STATES = frozenset({EngineState.READY, EngineState.DRAINING, EngineState.STARTING, EngineState.STOPPING})
GIB = 1024**3


def is_public(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets, which need no key."""
    return path in PAGE_PATHS or (path.startswith(ASSET_PREFIX) and path[len(ASSET_PREFIX) :] in ASSETS)


@cache
def _version() -> str:
    try:
        return package_version("onecard")
    except PackageNotFoundError:
        return "0.0.0"


@cache
def asset(name: str) -> bytes:
    return (resources.files("gateway") / "static" / name).read_bytes()


def _asset_response(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=dict(PAGE_HEADERS))


@router.get("/", include_in_schema=False)
async def root_page() -> Response:
    return _asset_response("console.html")


@router.get("/console", include_in_schema=False)
async def console_page() -> Response:
    return _asset_response("console.html")


@router.get("/console/assets/{name}", include_in_schema=False)
async def console_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no console asset {name[:100]!r}; there are {', '.join(sorted(ASSETS))}")
    return _asset_response(name)


@router.get("/console/snapshot")
async def console_snapshot(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    snap = gw.pool.snapshot(planned_args=True)  # the checkpoints' config.json were read at registry load
    pids = {e.name: e.pid for e in snap.engines if e.pid is not None}
    gpu = await _gpu_cache(request).read(gw.pool.gpu_probe, pids)
    body = snapshot(gw, snap, gpu,
                    usage_route=any(getattr(r, "path", None) == "/admin/usage" for r in request.app.routes))
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


# --- NVML readings, shared by every poll -------------------------------------------------------------------


@dataclass(frozen=True)
class GpuNow:
    """One NVML reading of the card and of each running engine's process tree (bytes)."""

    readings: tuple[GpuReading, ...] = ()
    engine_bytes: Mapping[str, int] = field(default_factory=dict)


class GpuCache:
    """Reads NVML at most every ``every_s`` seconds, off the event loop; polls in between share it."""

    def __init__(self, *, every_s: float = GPU_READ_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: tuple[float, GpuNow] | None = None
        self._lock = asyncio.Lock()

    async def read(self, probe: GpuProbe | None, pids: Mapping[str, int]) -> GpuNow:
        """The card now (``pids``: model -> its engine's pid), or the reading of less than ``every_s`` ago."""
        async with self._lock:
            if self._last is not None and self.clock() - self._last[0] < self.every_s:
                return self._last[1]
            now = GpuNow() if probe is None else await asyncio.to_thread(_read_gpu, probe, pids)
            self._last = (self.clock(), now)
            return now


def _read_gpu(probe: GpuProbe, pids: Mapping[str, int]) -> GpuNow:
    readings = tuple(probe.read())
    if not readings:
        return GpuNow()
    return GpuNow(readings, {name: engine_gpu_bytes(probe, pid) for name, pid in pids.items()})


def _gpu_cache(request: Request) -> GpuCache:
    """One cache per app, made on the first poll (so the app's lifespan knows nothing of the console)."""
    state = request.app.state
    cache_: GpuCache | None = getattr(state, "console_gpu", None)
    if cache_ is None:
        cache_ = GpuCache()
        state.console_gpu = cache_
    return cache_


# --- the snapshot ------------------------------------------------------------------------------------------


def snapshot(gw: Gateway, snap: Snapshot, gpu: GpuNow, *, usage_route: bool) -> dict[str, Any]:
    """Everything the page shows, from the gateway's own records."""
    engines = engines_payload(gw)
    extra = {e.name: engine_extra(e) for e in snap.engines}
    rows = [{**row, **extra[str(row["model"])]} for row in engines["engines"]]
    return {
        "gateway": {
            "version": _version(),
            "started_at": gw.started_at,
            "now": time.time(),
            "platform": snap.platform.value,
            "keys": gw.settings.auth_enabled,
            "usage_route": usage_route,
        },
        "card": card_view(
            snap.plan,
            states={e.name: e.state for e in snap.engines},
            reserved_gib=snap.reserved_gib,
            sleep_frees=snap.sleep_frees_memory,
            gpu=gpu,
        ),
        "gpus": [gpu_view(r) for r in gpu.readings],
        "thermal": {
            "limit_c": gw.settings.thermal_limit_c,
            "lowered": gw.admission.limit is not None,
            "admission_limit": gw.admission.limit,
        },
        "engines": rows,
        "scheduler": engines["scheduler"],
        "swaps": swaps_payload(gw, TIMELINE_SWAPS)["swaps"],
        "leases": leases_payload(gw)["leases"],
        "reserved_gib": engines["reserved_gib"],
        "adapters": adapters_payload(gw),
    }


def engine_extra(engine: EngineInfo) -> dict[str, Any]:
    """What the console adds to an ``/admin/engines`` row: the vLLM flags, sleep level, plan and aliases.

    ``engine_args`` is what the running process was started with (host and port left out); for an engine
    that is not running, what it would be started with now (``engines.engine_args``, as ``onecard plan``).
    """
    plan = engine.plan
    return {
        "aliases": list(engine.spec.aliases),
        "sleep_level": engine.sleep_level if engine.state is EngineState.SLEEPING else None,
        "planned_gib": round(plan.total_gib, 2),
        "measured_gib": None if plan.measured_gib is None else round(plan.measured_gib, 2),
        "engine_args": list(engine.engine_args),
        "engine_args_source": engine.engine_args_source,
        "idle_ttl_s": engine.spec.idle_ttl_s,
    }


def card_view(
    plan: Plan,
    *,
    states: Mapping[str, EngineState],
    reserved_gib: float,
    sleep_frees: bool,
    gpu: GpuNow,
) -> dict[str, Any]:
    """The budget split into resident engines, sleeping engines, the lease, headroom and what is free.

    Planned figures are the plan's (an engine's measured footprint once loaded, else its estimate), as the
    scheduler counts them. A sleeping engine counts its whole footprint where sleep frees no memory (the
    CPU platform) and, elsewhere, what NVML sees its processes still hold (0 without a GPU).
    Measured figures are NVML's, absent without a GPU.
    """
    segments: list[dict[str, Any]] = []
    for name, state in states.items():
        m = plan.model(name)
        if state in RESIDENT_STATES:
            segments.append({"kind": "resident", "model": name, "state": state.value, "gib": round(m.resident_gib, 2)})
        elif state is EngineState.SLEEPING:
            held = m.resident_gib if not sleep_frees else gpu.engine_bytes.get(name, 0) / GIB
            segments.append({"kind": "sleeping", "model": name, "state": state.value, "gib": round(held, 2)})
    if reserved_gib > 0:
        segments.append({"kind": "lease", "model": None, "state": None, "gib": round(reserved_gib, 2)})
    used = sum(s["gib"] for s in segments)
    segments.append({"kind": "headroom", "model": None, "state": None, "gib": round(plan.headroom_gib, 2)})
    free = plan.budget_gib - used - plan.headroom_gib
    segments.append({"kind": "free", "model": None, "state": None, "gib": round(max(0.0, free), 2)})
    measured: dict[str, Any] | None = None
    if gpu.readings:
        used_bytes = [r.memory_used_bytes for r in gpu.readings if r.memory_used_bytes is not None]
        total_bytes = [r.memory_total_bytes for r in gpu.readings if r.memory_total_bytes is not None]
        measured = {
            "used_gib": round(sum(used_bytes) / GIB, 2) if used_bytes else None,
            "total_gib": round(sum(total_bytes) / GIB, 2) if total_bytes else None,
            "engines_gib": {name: round(b / GIB, 2) for name, b in gpu.engine_bytes.items() if b > 0},
        }
    return {
        "budget_gib": plan.budget_gib,
        "headroom_gib": plan.headroom_gib,
        "usable_gib": round(plan.usable_gib, 2),
        "planned_used_gib": round(used, 2),
        "over_budget_gib": round(max(0.0, -free), 2),
        "segments": segments,
        "measured": measured,
    }


def gpu_view(r: GpuReading) -> dict[str, Any]:
    """One GPU's NVML reading for the page (per-process memory left out: pids are not for the page)."""
    return {
        "index": r.index,
        "name": r.name,
        "temperature_c": r.temperature_c,
        "power_w": None if r.power_w is None else round(r.power_w, 1),
        "memory_used_gib": None if r.memory_used_bytes is None else round(r.memory_used_bytes / GIB, 2),
        "memory_total_gib": None if r.memory_total_bytes is None else round(r.memory_total_bytes / GIB, 2),
        "sm_clock_mhz": r.sm_clock_mhz,
        "utilization_ratio": r.utilization_ratio,
        "clock_event_reasons": sorted(r.clock_event_reasons) if r.clock_event_reasons is not None else None,
    }
