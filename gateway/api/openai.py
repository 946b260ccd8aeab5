"""Thin OpenAI handlers: parse, reserve a slot on the engine (``engines.pool``), hand to the proxy.

Only ``model`` is rewritten (an alias becomes the engine's served name). For streams the gateway
also asks the engine for usage, and the proxy hides that usage event again if the client did not
ask for it. Everything else in the body passes through untouched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from engines.errors import OnecardError
from engines.pool import CLASS_PRIORITY, Reservation, Upstream
from engines.registry import Target
from gateway.bodies import check_json_type, read_body
from gateway.context import Gateway
from gateway.disconnect import ClientGone, DisconnectWatch, RelayStream
from gateway.errors import UnknownModel, classify, error_response, sse_error_event
from gateway.progress import HEADER as PROGRESS_HEADER
from gateway.progress import progress_event, wanted
from gateway.proxy import SSE_HEADERS, Call
from gateway.users import CLASS_HEADER, check_model_allowed, class_of, user_of

router = APIRouter()

#: Builds the call for a route whose body is not a chat-style JSON object (see gateway.api.vllm_routes).
Builder = Callable[[Gateway, Request, bytes], Awaitable[tuple[Call, Target]]]
#: The relayed JSON routes, served by :class:`gateway.api.relay_asgi.RelayRoutes` (path -> whether the gateway
#: counts the tokens of the answer); the FastAPI routes below describe them in the OpenAPI schema.
RELAYED: dict[str, bool] = {"/v1/chat/completions": True, "/v1/completions": True, "/v1/embeddings": False,
                            "/tokenize": False, "/detokenize": False}
#: Routes whose vLLM request takes ``priority`` (chat, completions, pooling: ``priority: int = 0`` in
#: vllm/entrypoints/openai/chat_completion/protocol.py, completion/protocol.py, pooling/base/protocol.py).
PRIORITY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

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


def resolve(gw: Gateway, name: str) -> Target:
    target = gw.resolve(name)
    if target is None:
        valid = sorted(gw.model_names())
        shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
        raise UnknownModel(f"The model '{name[:200]}' does not exist. Valid models: {shown}", param="model")
    return target


async def build_call(gw: Gateway, path: str, body: bytes, *, usage: bool, priority: int | None = None,
                     keep_priority: bool = False) -> tuple[Call, Target]:
    def served(name: str) -> str | None:
        target = gw.resolve(name)
        return None if target is None else target.served_name

    def served_names() -> dict[str, str]:
        return {n: s for n in gw.model_names() if (s := served(n)) is not None}

    parsed = await gw.bodies.prepare(body, served, served_names, usage=usage, priority=priority,
                                     keep_priority=keep_priority)
    target = resolve(gw, parsed.model)
    call = Call(path=path, body=parsed.payload, model=target.model.name, stream=parsed.stream,
                strip_usage=parsed.strip_usage, extra_headers=gw.response_headers(target.model.name))
    call.requested = parsed.model
    return call, target


async def handle(request: Request, path: str, *, usage: bool = True, build: Builder | None = None) -> Response:
    gw = gw_of(request)
    started = time.perf_counter()
    model_label = "_unknown"
    watch = DisconnectWatch(request.receive, request.scope)
    try:
        user = user_of(request.scope)
        klass = class_of(user, request.headers.get(CLASS_HEADER))
        if build is None:  # a JSON route; a builder checks its own body type
            check_json_type(request.headers.get("content-type"))
        body = await read_body(request, gw.settings.max_body_bytes)
        if build is None:
            call, target = await build_call(gw, path, body, usage=usage, keep_priority=user.set_priority,
                                            priority=CLASS_PRIORITY[klass] if path in PRIORITY_PATHS else None)
        else:
            call, target = await build(gw, request, body)
            call.requested = call.requested or target.model.name
        check_model_allowed(user, {call.requested, target.model.name, target.served_name})
        call.started = started
        call.user, call.klass = user.name, klass.value
        call.progress = call.stream and wanted(call.path, request.headers.get(PROGRESS_HEADER))
        model_label = call.model
        return await dispatch(gw, call, target, watch)
    except OnecardError as e:
        resp = error_response(e, plan=gw.pool.plan)
        gw.metrics.observe_request(model_label, str(resp.status_code), time.perf_counter() - started)
        gw.metrics.observe_error(model_label, classify(e)[2] or "error")
        return resp
    except (ClientDisconnect, ClientGone):  # the client left: nobody to answer
        gw.metrics.observe_request(model_label, "499", time.perf_counter() - started)
        return Response(status_code=499)
    finally:
        watch.close()


async def dispatch(gw: Gateway, call: Call, target: Target, watch: DisconnectWatch) -> Response:
    """Reserve a slot on the engine (waiting through a swap if needed, while the client is there), then forward."""
    if gw.admission.limit is None:
        await gw.admission.acquire()
    else:
        await watch.race(gw.admission.acquire(), undo=lambda _: gw.admission.release())
    call.queued_at = time.perf_counter()
    try:
        res = gw.pool.reserve(call.model, user=call.user, klass=call.klass)
    except BaseException:
        gw.admission.release()
        raise
    if res.granted:
        return await forward(gw, call, target, res, release_admission=True, gone=None if call.stream else watch.gone)
    try:
        task = asyncio.ensure_future(res.ready())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved whoever awaits it
        try:
            if call.stream:
                await watch.race(asyncio.wait({task}, timeout=gw.registry.scheduler.keepalive_s))
            else:
                await watch.race(asyncio.shield(task))
        except BaseException:
            task.cancel()
            res.release()  # out of the queue, or the slot granted meanwhile given back
            raise
        if not task.done():
            gw.admission.release()
            return RelayStream(waiting_stream(gw, call, target, task, res), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **call.extra_headers})
        task.result()  # the queue's error, if it failed
    except BaseException:
        res.release()
        gw.admission.release()
        raise
    return await forward(gw, call, target, res, release_admission=True, gone=None if call.stream else watch.gone)


async def forward(gw: Gateway, call: Call, target: Target, res: Reservation, *, release_admission: bool,
                  gone: asyncio.Future[None] | None = None) -> Response:
    released = False
    usage = gw.usage
    now = time.perf_counter()
    queue_wait_s = now - call.queued_at if call.queued_at is not None else 0.0
    mark = usage.begin(call.model) if usage is not None else 0.0
    if usage is not None:
        call.on_tokens = lambda prompt, completion: usage.tokens(call.model, user=call.user, prompt=prompt,
                                                                 completion=completion)

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            res.release()
            gw.metrics.request_finished(call.model)
            if usage is not None:
                usage.end(call.model, mark, user=call.user, queue_wait_s=queue_wait_s)
            if release_admission:
                gw.admission.release()

    gw.metrics.request_started(call.model)
    try:
        upstream = res.upstream
        if target.adapter is not None:
            await upstream.ensure_adapter(target.adapter)
        return await gw.proxy.forward(call, upstream, release, gone=gone)
    except BaseException:
        release()
        raise


async def waiting_stream(
    gw: Gateway, call: Call, target: Target, task: asyncio.Future[Upstream], res: Reservation
) -> AsyncIterator[bytes]:
    """SSE comment keep-alives while the model is swapped in, then the engine's stream."""
    try:
        while not task.done():
            pos = res.position
            if call.progress:
                yield progress_event(call.model, target.served_name, pos, time.perf_counter() - call.started)
            else:
                yield f": waiting for model {call.model} (queue position {pos})\n\n".encode()
            await asyncio.wait({task}, timeout=gw.registry.scheduler.keepalive_s)
        task.result()
    except OnecardError as e:
        res.release()
        gw.metrics.observe_request(call.model, str(error_response(e).status_code), time.perf_counter() - call.started)
        yield sse_error_event(e, plan=gw.pool.plan)
        return
    except BaseException:  # the client left (the stream was closed or cancelled) while it waited
        task.cancel()
        res.release()
        raise
    try:
        resp = await forward(gw, call, target, res, release_admission=False)
    except OnecardError as e:
        yield sse_error_event(e, plan=gw.pool.plan)
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
