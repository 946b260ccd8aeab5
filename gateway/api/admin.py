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

from engines.pool import (
    MAX_TTL_S,
    MIN_TTL_S,
    GrantLease,
    HeartbeatLease,
    Lease,
    Load,
    ReleaseLease,
    Sleep,
    Unload,
    Wake,
    engine_rows,
    holder_refusal,
    peer_uid,
)
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
    snap = gw.pool.snapshot()
    return {"engines": engine_rows(snap), "reserved_gib": snap.reserved_gib,
            "leases": [snap.lease.as_dict()] if snap.lease else [],
            "scheduler": {"last_reason": snap.last_reason, "draining": sorted(snap.draining)}}


def swaps_payload(gw: Gateway, limit: int) -> dict[str, Any]:
    """The last ``limit`` swaps, oldest first: what ``GET /admin/swaps`` answers."""
    return {"swaps": [s.as_dict() for s in gw.pool.snapshot().swaps[-limit:]]}


def leases_payload(gw: Gateway) -> dict[str, Any]:
    lease = gw.pool.snapshot().lease
    return {"leases": [lease.as_dict()] if lease else []}


def adapters_payload(gw: Gateway) -> dict[str, Any]:
    """Adapters found in watched folders, and the folders that could not be used (with why)."""
    snap = gw.pool.snapshot()
    return {
        "discovered": [{"name": f.name, "base": f.base, "path": str(f.path), "rank": f.rank} for f in snap.discovered],
        "problems": [{"path": p, "reason": r} for p, r in snap.adapter_problems],
    }


async def _act(gw: Gateway, command: Load | Wake | Unload | Sleep) -> Response:
    """Carry out an admin action through the engine owner; answer the model's state after it."""
    await gw.pool.submit(command)
    return _json({"model": command.model, "state": gw.pool.state(command.model).value})


@router.get("/engines")
async def engines(request: Request) -> Response:
    return _json(engines_payload(_gw(request)))


@router.post("/engines/{name}/load")
async def load(request: Request, name: str) -> Response:
    gw = _gw(request)
    return await _act(gw, Load(_model(gw, name)))


@router.post("/engines/{name}/unload")
async def unload(request: Request, name: str) -> Response:
    gw = _gw(request)
    return await _act(gw, Unload(_model(gw, name)))


@router.post("/engines/{name}/sleep")
async def sleep(request: Request, name: str, level: int = Query(1)) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    if level not in (1, 2):
        raise BadRequest("level must be 1 or 2", param="level")
    return await _act(gw, Sleep(model, level))


@router.post("/engines/{name}/wake")
async def wake(request: Request, name: str) -> Response:
    gw = _gw(request)
    return await _act(gw, Wake(_model(gw, name)))


@router.get("/engines/{name}/log")
async def log_tail(request: Request, name: str, lines: int = Query(100, ge=1, le=5000)) -> Response:
    gw = _gw(request)
    model = _model(gw, name)
    tail = await gw.pool.log_tail(model, lines)
    return PlainTextResponse("\n".join(tail) + ("\n" if tail else ""))


@router.get("/plan")
async def plan(request: Request) -> Response:
    return _json(_gw(request).pool.plan.as_dict())


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
    lease: Lease = await gw.pool.submit(GrantLease(gib=body.gib, holder_pid=body.pid, label=body.label,
                                                   wait=body.wait, ttl_s=body.ttl_s, user=user_of(request.scope).name))
    return _json(lease.as_dict(), status=201)


@router.post("/leases/{lease_id}/heartbeat")
async def heartbeat_lease(request: Request, lease_id: str) -> Response:
    """The holder is still there: the lease lasts another ``ttl_s``."""
    lease: Lease = await _gw(request).pool.submit(HeartbeatLease(lease_id))
    return _json(lease.as_dict())


@router.get("/leases")
async def leases(request: Request) -> Response:
    return _json(leases_payload(_gw(request)))


@router.delete("/leases/{lease_id}")
async def release_lease(request: Request, lease_id: str) -> Response:
    lease: Lease = await _gw(request).pool.submit(ReleaseLease(lease_id))
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
