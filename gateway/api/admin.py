"""Admin routes: engines list, load, unload, sleep, wake, plan, swaps and an engine's log tail.

They need the admin key when keys are configured (see ``gateway.auth``)::

    curl -H "Authorization: Bearer $ADMIN_KEY" localhost:8000/admin/engines
    curl -X POST -H "Authorization: Bearer $ADMIN_KEY" localhost:8000/admin/engines/tiny/load
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import psutil
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import PlainTextResponse, Response

from engines.lease_owner import holder_refusal, peer_uid
from engines.leases import MAX_TTL_S, MIN_TTL_S
from gateway.context import Gateway
from gateway.errors import BadRequest, UnknownModel
from gateway.usage import parse_since
from gateway.users import NotPermitted, user_of

router = APIRouter(prefix="/admin")


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gw
    return gw


def _model(gw: Gateway, name: str) -> str:
    target = gw.resolve(name)
    if target is None:
        raise UnknownModel(f"The model '{name[:200]}' does not exist. Valid models: {', '.join(gw.model_names())}")
    return target.model.name


def engines_payload(gw: Gateway) -> dict[str, Any]:
    """What ``GET /admin/engines`` answers (and ``onecard ps`` and the console show)."""
    return {"engines": gw.manager.engine_rows(), "reserved_gib": gw.manager.reserved_gib,
            "leases": leases_payload(gw)["leases"],
            "scheduler": {"last_reason": gw.manager.last_reason, "draining": sorted(gw.manager.draining)}}


def swaps_payload(gw: Gateway, limit: int) -> dict[str, Any]:
    """The last ``limit`` swaps, oldest first: what ``GET /admin/swaps`` answers."""
    return {"swaps": [s.__dict__ for s in gw.manager.swaps[-limit:]]}


def leases_payload(gw: Gateway) -> dict[str, Any]:
    lease = gw.manager.lease
    return {"leases": [lease.as_dict()] if lease else []}


def adapters_payload(gw: Gateway) -> dict[str, Any]:
    """Adapters found in watched folders, and the folders that could not be used (with why)."""
    return {
        "discovered": [{"name": f.name, "base": f.base, "path": str(f.path), "rank": f.rank}
                       for f in gw.manager.discovered.values()],
        "problems": [{"path": p, "reason": r} for p, r in gw.manager.adapter_problems.items()],
    }


@router.get("/engines")
async def engines(request: Request) -> Response:
    return _json(engines_payload(_gw(request)))


@router.post("/engines/{name}/load")
async def load(request: Request, name: str) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    await gw.manager.load(model)
    return _json({"model": model, "state": gw.manager.engines[model].state.value})


@router.post("/engines/{name}/unload")
async def unload(request: Request, name: str) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    await gw.manager.unload(model)
    return _json({"model": model, "state": gw.manager.engines[model].state.value})


@router.post("/engines/{name}/sleep")
async def sleep(request: Request, name: str, level: int = Query(1)) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    if level not in (1, 2):
        raise BadRequest("level must be 1 or 2", param="level")
    await gw.manager.sleep(model, level)
    return _json({"model": model, "state": gw.manager.engines[model].state.value})


@router.post("/engines/{name}/wake")
async def wake(request: Request, name: str) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    await gw.manager.load(model)
    return _json({"model": model, "state": gw.manager.engines[model].state.value})


@router.get("/engines/{name}/log")
async def log_tail(request: Request, name: str, lines: int = Query(100, ge=1, le=5000)) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    engine = gw.manager.engines[model]
    tail = engine.log_tail(lines)
    if not tail:
        path = gw.settings.run_dir / "logs" / f"{model}.log"
        if path.exists():
            tail = tuple(path.read_text(errors="replace").splitlines()[-lines:])
    return PlainTextResponse("\n".join(tail) + ("\n" if tail else ""))


@router.get("/plan")
async def plan(request: Request) -> Response:
    return _json(_gw(request).manager.plan.as_dict())


@router.get("/swaps")
async def swaps(request: Request, limit: int = Query(100, ge=1, le=1000)) -> Response:
    return _json(swaps_payload(_gw(request), limit))


class LeaseRequest(BaseModel):
    gib: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                              description="GiB to reserve; omit for the whole card")
    pid: int = Field(gt=0, lt=2**31, description="the process holding the lease; it ends when that process exits")
    label: str = Field(default="", max_length=200)
    wait: bool = Field(default=False, description="wait for an active lease to end instead of failing")
    ttl_s: float | None = Field(default=None, ge=MIN_TTL_S, le=MAX_TTL_S, allow_inf_nan=False,
                                description="the lease ends this long after the last heartbeat "
                                            "(POST /admin/leases/{id}/heartbeat); default 60 s")


@router.post("/leases")
async def grant_lease(request: Request, body: LeaseRequest) -> Response:
    gw = _gw(request)
    if not psutil.pid_exists(body.pid):
        raise BadRequest(f"no process has pid {body.pid}: a lease is held by a running process and ends with it",
                         param="pid")
    client, server = request.client, request.scope.get("server")
    caller_uid = None
    if client is not None and server is not None:
        caller_uid = await asyncio.to_thread(peer_uid, client.host, client.port, server_port=server[1])
    refusal = await asyncio.to_thread(holder_refusal, body.pid, caller_uid=caller_uid)
    if refusal is not None:
        raise NotPermitted(f"lease refused: {refusal}", param="pid")
    lease = await gw.manager.grant_lease(gib=body.gib, holder_pid=body.pid, label=body.label, wait=body.wait,
                                         ttl_s=body.ttl_s, user=user_of(request.scope).name)
    return _json(lease.as_dict(), status=201)


@router.post("/leases/{lease_id}/heartbeat")
async def heartbeat_lease(request: Request, lease_id: str) -> Response:
    """The holder is still there: the lease lasts another ``ttl_s``."""
    lease = await _gw(request).manager.heartbeat_lease(lease_id)
    return _json(lease.as_dict())


@router.get("/leases")
async def leases(request: Request) -> Response:
    return _json(leases_payload(_gw(request)))


@router.delete("/leases/{lease_id}")
async def release_lease(request: Request, lease_id: str) -> Response:
    lease = await _gw(request).manager.release_lease(lease_id)
    return _json({**lease.as_dict(), "state": "released"})


@router.get("/adapters")
async def adapters(request: Request) -> Response:
    """Adapters found in watched folders, and the folders that could not be used (with why)."""
    return _json(adapters_payload(_gw(request)))


@router.get("/usage")
async def usage(request: Request, since: str | None = Query(None, max_length=64)) -> Response:
    """Per user and model: requests, tokens, queue wait, engine-seconds and swaps, since ``since``."""
    gw = _gw(request)
    try:
        start = parse_since(since, now=time.time())
    except ValueError as e:
        raise BadRequest(str(e), param="since") from None
    rows = await gw.usage.rows(start) if gw.usage is not None else []
    return _json({"since": start, "usage": rows})
