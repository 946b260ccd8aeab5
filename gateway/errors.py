"""One exception tree, mapped to OpenAI error JSON in one place.

::

    OnecardError (engines.errors)          -> see engines/errors.py for the engine side
     ├── EngineError ...................... 502 engine_error
     │    └── CrashLoop .................... 503 engine_unavailable, Retry-After
     ├── CapacityError / QueueFull ......... 503 overloaded, Retry-After
     │    └── UserLimit ................... 429 rate_limit_error, Retry-After (a user's own share)
     ├── LeaseError ........................ 409 lease_conflict
     └── APIError (here)
          ├── BadRequest ................... 400 invalid_request_error
          ├── Unauthorized ................. 401 authentication_error
          ├── Forbidden .................... 403 permission_error
          ├── UnknownModel ................. 404 model_not_found (lists valid names)
          ├── PayloadTooLarge .............. 413 request_too_large
          ├── UnsupportedMediaType ......... 415 unsupported_media_type
          └── Overloaded ................... 429 rate_limit_error, Retry-After

Every error reaches the client as ``{"error": {"message", "type", "param", "code"}}``. Given the
plan, an engine that ran out of memory is explained with what the plan gave it (:func:`oom_note`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import orjson
from starlette.responses import Response

from engines.errors import CapacityError, CrashLoop, EngineError, LeaseError, OnecardError, UserLimit

if TYPE_CHECKING:
    from engines.pool import Plan

#: What vLLM says when the card had less memory than the engine needed (CUDA OOM, or no room for the KV cache).
OOM_MARKERS = ("out of memory", "outofmemoryerror", "no available memory for the cache blocks",
               "larger than the available kv cache memory")


class APIError(OnecardError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, model: str | None = None) -> None:
        super().__init__(message, model=model)
        self.param = param


class BadRequest(APIError):
    status = 400
    code = "bad_request"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status = 403
    type = "permission_error"
    code = "admin_key_required"


class UnknownModel(APIError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    code = "unsupported_media_type"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, model: str | None = None) -> None:
        super().__init__(message, model=model)
        self.retry_after = retry_after


def _dumps(error: dict[str, object]) -> bytes:
    try:
        return orjson.dumps({"error": error})
    except orjson.JSONEncodeError:  # a lone surrogate the client sent, echoed back in the message: escape it
        clean = {k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
                 for k, v in error.items()}
        return orjson.dumps({"error": clean})


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _dumps({"message": message, "type": type_, "param": param, "code": code})


def classify(exc: BaseException) -> tuple[int, str, str | None, str | None, float | None]:
    """(status, type, code, param, retry_after) for any exception."""
    if isinstance(exc, Overloaded):
        return exc.status, exc.type, exc.code, exc.param, exc.retry_after
    if isinstance(exc, APIError):
        return exc.status, exc.type, exc.code, exc.param, None
    if isinstance(exc, CrashLoop):
        return 503, "engine_unavailable", "engine_crash_loop", None, exc.retry_after
    if isinstance(exc, EngineError):
        return 502, "engine_error", "engine_failed", None, None
    if isinstance(exc, UserLimit):
        return 429, "rate_limit_error", "user_limit", None, exc.retry_after
    if isinstance(exc, CapacityError):
        return 503, "overloaded", "model_unavailable", None, exc.retry_after
    if isinstance(exc, LeaseError):
        return 409, "lease_conflict", "lease_refused", None, None
    return 500, "internal_error", "internal_error", None, None


def oom_note(exc: BaseException, plan: Plan | None) -> str | None:
    """For an engine that ran out of memory, the plan's figures for it, else None::

        The plan gives big 2.00 GiB on the card (weights 1.00 + KV cache 0.02 + runtime 0.98 GiB) of
        3.50 GiB usable (budget 3.5 GiB - headroom 0 GiB): ...
    """
    if plan is None or not isinstance(exc, EngineError) or exc.model is None:
        return None
    text = (exc.message + "\n" + "\n".join(exc.log_tail)).lower()
    if not any(m in text for m in OOM_MARKERS):
        return None
    try:
        mp = plan.model(exc.model)
    except KeyError:
        return None
    parts = f"weights {mp.weights_gib:.2f} + KV cache {mp.kv_gib:.2f} + runtime {mp.overhead_gib:.2f} GiB"
    if mp.offload_gib > 0:
        parts += f", {mp.offload_gib:.2f} GiB of weights offloaded to the CPU"
    measured = f"; measured {mp.measured_gib:.2f} GiB" if mp.measured_gib is not None else ""
    return (f"The plan gives {mp.name} {mp.total_gib:.2f} GiB on the card ({parts}{measured}) of "
            f"{plan.usable_gib:.2f} GiB usable (budget {plan.budget_gib:g} GiB - headroom {plan.headroom_gib:g} GiB): "
            "memory the plan does not count is in use (another process on the GPU?) or its estimate is low; "
            "see `onecard plan`, lower the model's max_model_len or gpu.budget_gib")


def message_of(exc: BaseException, plan: Plan | None = None) -> str:
    if isinstance(exc, OnecardError):
        note = oom_note(exc, plan)
        return exc.message if note is None else f"{exc.message.rstrip('. ')}. {note}"
    return f"internal error: {type(exc).__name__}: {exc}"


def error_response(exc: BaseException, *, plan: Plan | None = None) -> Response:
    """The OpenAI error JSON for ``exc``; ``plan`` lets an out-of-memory failure be explained."""
    status, type_, code, param, retry_after = classify(exc)
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return Response(
        error_body(message_of(exc, plan), type_=type_, code=code, param=param),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def sse_error_event(exc: BaseException, *, plan: Plan | None = None) -> bytes:
    """The error as an SSE event (after a stream has begun, the status can no longer change)."""
    status, type_, code, param, _ = classify(exc)
    body = _dumps({"message": message_of(exc, plan), "type": type_, "param": param, "code": code, "status": status})
    return b"data: " + body + b"\n\ndata: [DONE]\n\n"
