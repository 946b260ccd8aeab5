"""The rest of vLLM 0.32's API that names a model, relayed like chat and completions.

Each route is routed by the model it names, where vLLM's own server reads it: the JSON body's ``model``
(:data:`JSON_ROUTES`), the multipart form field ``model`` (audio, :data:`FORM_ROUTES`) or, for
``GET /tokenizer_info`` (which vLLM serves per engine, with no model), the query's ``model``. Queueing,
swaps, errors and metrics are those of :func:`gateway.api.openai.handle`; only ``model`` is rewritten (a
form field in place, the rest of the body untouched), so the engine's answer comes back as it sent it.

A response created with ``POST /v1/responses`` lives in the engine that created it; ``GET
/v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` go to that engine's model
(:class:`ResponseOwners` remembers the latest ids, bounded).

:data:`NOT_RELAYED` names each vLLM path that takes a model but is deliberately not served here, with
the reason; ``tests/real/test_api_coverage.py`` reads the real engine's ``/openapi.json`` and fails on any
path that takes a model and is in neither list.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Final
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from starlette.responses import Response

from engines.registry import Target
from gateway.api.openai import _BODY, Builder, build_call, handle, resolve
from gateway.bodies import check_json_type
from gateway.context import Gateway
from gateway.errors import APIError, BadRequest
from gateway.proxy import Call

router = APIRouter()

#: JSON routes, with whether a stream gets the gateway's usage request (only chat and completions take
#: ``stream_options``; the others report usage on their own).
JSON_ROUTES: Final = (
    "/v1/responses",
    "/v1/chat/completions/batch",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/generative_scoring",
    "/v1/score",
    "/score",
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/pooling",
    "/classify",
    "/v2/embed",
    "/cohere/v2/chat",
    "/v1/systemone",
)
#: Multipart routes: the model is the form field ``model``
#: (``vllm/entrypoints/speech_to_text/transcription/api_router.py``, ``Annotated[..., Form()]``).
FORM_ROUTES: Final = ("/v1/audio/transcriptions", "/v1/audio/translations")
#: Routes named by the query's ``model``.
QUERY_ROUTES: Final = ("/tokenizer_info",)
#: Routes named by the response id in their path.
RESPONSE_ROUTES: Final = ("/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel")

RELAYED: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/tokenize",
        "/detokenize",
        *JSON_ROUTES,
        *FORM_ROUTES,
        *QUERY_ROUTES,
        *RESPONSE_ROUTES,
    }
)
#: vLLM 0.32 paths that take a model and are deliberately not relayed, and why.
NOT_RELAYED: Final = {
    "/invocations": "SageMaker's single entry point: it picks a route by the body's shape; clients of a "
    "gateway call those routes by name",
    "/v1/load_lora_adapter": "the gateway loads adapters itself, by name, when a request names one",
    "/v1/unload_lora_adapter": "the gateway unloads adapters itself",
    "/inference/v1/generate": "scale-out token-in/token-out path for disaggregated serving "
    "(--enable-scale-out), engine to engine, not for clients",
    **{
        path: "scale-out prompt rendering (--enable-scale-out, vllm/entrypoints/scale_out/), engine to engine"
        for path in (
            "/v1/chat/completions/render",
            "/v1/messages/render",
            "/v1/completions/render",
            "/v1/responses/render",
            "/v1/chat/completions/derender",
            "/v1/completions/derender",
        )
    },
}

#: How many response ids the gateway remembers (oldest forgotten first).
MAX_RESPONSE_IDS: Final = 10_000
_RESPONSE_ID: Final = re.compile(rb'"id":"(resp_[A-Za-z0-9_-]+)"')
_MODEL_PART: Final = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="model"')


class UnknownResponse(APIError):
    status = 404
    code = "response_not_found"


class ResponseOwners:
    """Which registry model created each response id, for the latest :data:`MAX_RESPONSE_IDS`."""

    def __init__(self, limit: int = MAX_RESPONSE_IDS) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, model: str) -> None:
        self._owners[response_id] = model
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.limit:
            self._owners.popitem(last=False)

    def owner(self, response_id: str) -> str | None:
        return self._owners.get(response_id)

    def watcher(self, model: str) -> _IdWatch:
        return _IdWatch(self, model)


class _IdWatch:
    """Reads the response id from the start of a created response (body or stream) and remembers it."""

    def __init__(self, owners: ResponseOwners, model: str) -> None:
        self.owners = owners
        self.model = model
        self.head = b""
        self.done = False

    def __call__(self, data: bytes) -> None:
        if self.done:
            return
        self.head += data
        found = _RESPONSE_ID.search(self.head)
        if found:
            self.owners.remember(found.group(1).decode(), self.model)
        self.done = found is not None or len(self.head) > 65536  # the id comes first, or not at all


def owners_of(request: Request) -> ResponseOwners:
    """The app's :class:`ResponseOwners`, made on first use."""
    owners: ResponseOwners | None = getattr(request.app.state, "response_owners", None)
    if owners is None:
        owners = request.app.state.response_owners = ResponseOwners()
    return owners


def form_model(body: bytes, content_type: str) -> tuple[str, int, int] | None:
    """The multipart form's ``model`` value and where its bytes are in ``body``, or None."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if not found:
        return None
    delim = b"--" + found.group(1).encode("latin-1")
    pos = 0
    while True:
        start = body.find(delim, pos)
        if start < 0 or body[start + len(delim) : start + len(delim) + 2] == b"--":
            return None
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        value_start = head_end + 4
        end = body.find(b"\r\n" + delim, value_start)
        if end < 0:
            return None
        if _MODEL_PART.search(body, start, head_end):
            try:
                return body[value_start:end].decode(), value_start, end
            except UnicodeDecodeError:
                return None
        pos = end + 2


def _call(
    gw: Gateway,
    target: Target,
    path: str,
    body: bytes,
    *,
    stream: bool = False,
    method: str = "POST",
    content_type: str = "application/json",
    query: str = "",
) -> Call:
    return Call(
        path=path,
        body=body,
        model=target.model.name,
        stream=stream,
        extra_headers=gw.response_headers(target.model.name),
        method=method,
        content_type=content_type,
        query=query,
    )


def build_form(path: str) -> Builder:
    async def build(gw: Gateway, request: Request, body: bytes) -> tuple[Call, Target]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise BadRequest(f"{path} takes a multipart/form-data body with the fields 'file' and 'model'")
        found = form_model(body, content_type)
        if found is None:
            raise BadRequest("'model' is required: send it as a form field", param="model")
        name, start, end = found
        target = resolve(gw, name)
        if name != target.served_name:
            body = body[:start] + target.served_name.encode() + body[end:]
        stream = re.search(rb'(?i)name="stream"\r\n\r\ntrue\r\n', body) is not None
        return _call(gw, target, path, body, content_type=content_type, stream=stream), target

    return build


def build_query(path: str) -> Builder:
    async def build(gw: Gateway, request: Request, body: bytes) -> tuple[Call, Target]:
        names = parse_qs(request.url.query).get("model")
        if not names:
            raise BadRequest(
                f"'model' is required: {path}?model=<name> (each model has its own tokenizer)", param="model"
            )
        target = resolve(gw, names[0])
        return _call(gw, target, path, b"", method=request.method, query=request.url.query), target

    return build


def build_created(path: str) -> Builder:
    """``POST /v1/responses``: a JSON route whose answer's id is remembered."""

    async def build(gw: Gateway, request: Request, body: bytes) -> tuple[Call, Target]:
        check_json_type(request.headers.get("content-type"))
        call, target = await build_call(gw, path, body, usage=False)
        call.watch = owners_of(request).watcher(target.model.name)
        return call, target

    return build


def build_by_response(suffix: str) -> Builder:
    async def build(gw: Gateway, request: Request, body: bytes) -> tuple[Call, Target]:
        response_id = request.path_params["response_id"]
        model = owners_of(request).owner(response_id)
        if model is None:
            raise UnknownResponse(
                f"Response with id '{response_id[:200]}' not found: the gateway routes a "
                "response to the engine that created it, for responses created through "
                "it since it started",
                param="response_id",
            )
        target = resolve(gw, model)
        stream = parse_qs(request.url.query).get("stream", ["false"])[0].lower() == "true"
        path = f"/v1/responses/{quote(response_id, safe='')}{suffix}"
        call = _call(gw, target, path, body, method=request.method, query=request.url.query, stream=stream)
        return call, target

    return build


def _add(path: str, method: str, build: Builder | None, *, name: str) -> None:
    async def route(request: Request) -> Response:
        return await handle(request, path, usage=False, build=build)

    route.__name__ = name
    extra = _BODY if build is None else None
    router.add_api_route(path, route, methods=[method], openapi_extra=extra, name=name)


for _path in JSON_ROUTES:
    _name = "relay" + re.sub(r"\W", "_", _path)
    _add(_path, "POST", build_created(_path) if _path == "/v1/responses" else None, name=_name)
for _path in FORM_ROUTES:
    _add(_path, "POST", build_form(_path), name="relay" + re.sub(r"\W", "_", _path))
for _path in QUERY_ROUTES:
    _add(_path, "GET", build_query(_path), name="relay" + re.sub(r"\W", "_", _path))
_add("/v1/responses/{response_id}", "GET", build_by_response(""), name="retrieve_response")
_add("/v1/responses/{response_id}/cancel", "POST", build_by_response("/cancel"), name="cancel_response")
