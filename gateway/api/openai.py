"""Thin OpenAI handlers: parse, ask the manager for an engine, hand to the proxy.

Only ``model`` is rewritten (an alias becomes the engine's served name). For streams the gateway
also asks the engine for usage, and the proxy hides that usage event again if the client did not
ask for it. Everything else in the body passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from engines.engine import Engine
from engines.errors import OnecardError
from engines.manager import Waiter
from engines.registry import Target
from gateway.context import Gateway
from gateway.errors import BadRequest, PayloadTooLarge, UnknownModel, classify, error_response, sse_error_event
from gateway.progress import HEADER as PROGRESS_HEADER
from gateway.progress import progress_event, wanted
from gateway.proxy import SSE_HEADERS, Call

router = APIRouter()

#: Builds the call for a route whose body is not a chat-style JSON object (see gateway.api.vllm_routes).
Builder = Callable[[Gateway, Request, bytes], tuple[Call, Target]]

#: Request body schemas for the OpenAPI document (the handlers read raw bytes for speed and fidelity).
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                    "additionalProperties": True,
                }
            }
        },
    }
}


def gw_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gw
    return gw


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> tuple[dict[str, Any], bool]:
    """The request's JSON object, and whether it took Python's lenient parser: what orjson refuses and
    vLLM's own parser takes (NaN, lone surrogates, integers past 64 bits) must reach the engine as sent."""
    if not body:
        raise BadRequest("the request body is empty; send a JSON object with at least 'model'")
    lenient = False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        lenient = True
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest("the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    return data, lenient


def resolve(gw: Gateway, data: dict[str, Any]) -> Target:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    target = gw.resolve(name)
    if target is None:
        valid = sorted(gw.model_names())
        shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
        raise UnknownModel(f"The model '{name[:200]}' does not exist. Valid models: {shown}", param="model")
    return target


def build_call(gw: Gateway, path: str, body: bytes, *, usage: bool) -> tuple[Call, Target]:
    data, lenient = parse_json(body)
    target = resolve(gw, data)
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    stream = bool(stream)
    changed = False
    if data["model"] != target.served_name:
        data["model"] = target.served_name
        changed = True
    strip_usage = False
    if stream and usage:
        opts = data.get("stream_options")
        if opts is None:
            data["stream_options"] = {"include_usage": True}
            strip_usage = changed = True
        elif isinstance(opts, dict) and not opts.get("include_usage") and not opts.get("continuous_usage_stats"):
            # With continuous_usage_stats set, include_usage would put usage on every chunk
            # (vllm/entrypoints/serve/utils/api_utils.py, should_include_usage): left as the client sent it.
            opts["include_usage"] = True
            strip_usage = changed = True
    payload = (json.dumps(data).encode() if lenient else orjson.dumps(data)) if changed else body
    call = Call(path=path, body=payload, model=target.model.name, stream=stream, strip_usage=strip_usage,
                extra_headers=gw.response_headers(target.model.name))
    return call, target


async def handle(request: Request, path: str, *, usage: bool = True, build: Builder | None = None) -> Response:
    gw = gw_of(request)
    started = time.perf_counter()
    model_label = "_unknown"
    try:
        body = await read_body(request, gw.settings.max_body_bytes)
        call, target = build_call(gw, path, body, usage=usage) if build is None else build(gw, request, body)
        call.started = started
        call.progress = call.stream and wanted(call.path, request.headers.get(PROGRESS_HEADER))
        model_label = call.model
        return await dispatch(gw, call, target)
    except OnecardError as e:
        resp = error_response(e, plan=gw.manager.plan)
        gw.metrics.observe_request(model_label, str(resp.status_code), time.perf_counter() - started)
        gw.metrics.observe_error(model_label, classify(e)[2] or "error")
        return resp
    except ClientDisconnect:  # the client left while sending its body: nobody to answer
        gw.metrics.observe_request(model_label, "499", time.perf_counter() - started)
        return Response(status_code=499)


async def dispatch(gw: Gateway, call: Call, target: Target) -> Response:
    """Get a slot on the engine (waiting through a swap if needed), then forward."""
    manager = gw.manager
    await gw.admission.acquire()
    try:
        engine = manager.try_acquire(call.model)
        if engine is None:
            waiter = manager.enqueue(call.model)
            if call.stream:
                task = asyncio.ensure_future(manager.wait(call.model, waiter))
                done, _ = await asyncio.wait({task}, timeout=gw.registry.scheduler.keepalive_s)
                if not done:
                    gw.admission.release()
                    return StreamingResponse(
                        waiting_stream(gw, call, target, task, waiter),
                        media_type="text/event-stream",
                        headers={**SSE_HEADERS, **call.extra_headers},
                    )
                engine = task.result()
            else:
                engine = await manager.wait(call.model, waiter)
    except BaseException:
        gw.admission.release()
        raise
    return await forward(gw, call, target, engine, release_admission=True)


async def forward(gw: Gateway, call: Call, target: Target, engine: Engine, *, release_admission: bool) -> Response:
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            gw.manager.release(engine)
            gw.metrics.request_finished(call.model)
            if release_admission:
                gw.admission.release()

    gw.metrics.request_started(call.model)
    try:
        if target.adapter is not None:
            await engine.ensure_adapter(target.adapter, gw.adapter_path(target))
        return await gw.proxy.forward(call, engine, release)
    except BaseException:
        release()
        raise


async def waiting_stream(
    gw: Gateway, call: Call, target: Target, task: asyncio.Future[Engine], waiter: Waiter
) -> AsyncIterator[bytes]:
    """SSE comment keep-alives while the model is swapped in, then the engine's stream."""
    try:
        while not task.done():
            pos = gw.manager.queue_position(call.model, waiter)
            if call.progress:
                yield progress_event(call.model, target.served_name, pos, time.perf_counter() - call.started)
            else:
                yield f": waiting for model {call.model} (queue position {pos})\n\n".encode()
            await asyncio.wait({task}, timeout=gw.registry.scheduler.keepalive_s)
        engine = task.result()
    except OnecardError as e:
        gw.metrics.observe_request(call.model, str(error_response(e).status_code), time.perf_counter() - call.started)
        yield sse_error_event(e, plan=gw.manager.plan)
        return
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    try:
        resp = await forward(gw, call, target, engine, release_admission=False)
    except OnecardError as e:
        yield sse_error_event(e, plan=gw.manager.plan)
        return
    if isinstance(resp, StreamingResponse):
        async for chunk in resp.body_iterator:
            yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
    else:
        yield b"data: " + bytes(resp.body) + b"\n\ndata: [DONE]\n\n"


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    gw = gw_of(request)
    return Response(orjson.dumps({"object": "list", "data": gw.model_cards()}), media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    gw = gw_of(request)
    for card in gw.model_cards():
        if card["id"] == model_id:
            return Response(orjson.dumps(card), media_type="application/json")
    return error_response(UnknownModel(f"The model '{model_id[:200]}' does not exist", param="model"))


@router.post("/v1/chat/completions", openapi_extra=_BODY)
async def chat_completions(request: Request) -> Response:
    return await handle(request, "/v1/chat/completions")


@router.post("/v1/completions", openapi_extra=_BODY)
async def completions(request: Request) -> Response:
    return await handle(request, "/v1/completions")


@router.post("/v1/embeddings", openapi_extra=_BODY)
async def embeddings(request: Request) -> Response:
    return await handle(request, "/v1/embeddings", usage=False)


@router.post("/tokenize", openapi_extra=_BODY)
async def tokenize(request: Request) -> Response:
    return await handle(request, "/tokenize", usage=False)


@router.post("/detokenize", openapi_extra=_BODY)
async def detokenize(request: Request) -> Response:
    return await handle(request, "/detokenize", usage=False)
