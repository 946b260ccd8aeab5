"""One exception tree, mapped to OpenAI error JSON in one place.

::

    OnecardError (engines.errors)          -> see engines/errors.py for the engine side
     ├── EngineError ...................... 502 engine_error
     │    └── CrashLoop .................... 503 engine_unavailable, Retry-After
     ├── CapacityError / QueueFull ......... 503 overloaded, Retry-After
     ├── LeaseError ........................ 409 lease_conflict
     └── APIError (here)
          ├── BadRequest ................... 400 invalid_request_error
          ├── Unauthorized ................. 401 authentication_error
          ├── Forbidden .................... 403 permission_error
          ├── UnknownModel ................. 404 model_not_found (lists valid names)
          ├── PayloadTooLarge .............. 413 request_too_large
          └── Overloaded ................... 429 rate_limit_error, Retry-After

Every error reaches the client as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math

import orjson
from starlette.responses import Response

from engines.errors import CapacityError, CrashLoop, EngineError, LeaseError, OnecardError


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


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, model: str | None = None) -> None:
        super().__init__(message, model=model)
        self.retry_after = retry_after


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


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
    if isinstance(exc, CapacityError):
        return 503, "overloaded", "model_unavailable", None, exc.retry_after
    if isinstance(exc, LeaseError):
        return 409, "lease_conflict", "lease_refused", None, None
    return 500, "internal_error", "internal_error", None, None


def message_of(exc: BaseException) -> str:
    if isinstance(exc, OnecardError):
        return exc.message
    return f"internal error: {type(exc).__name__}: {exc}"


def error_response(exc: BaseException) -> Response:
    status, type_, code, param, retry_after = classify(exc)
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return Response(
        error_body(message_of(exc), type_=type_, code=code, param=param),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def sse_error_event(exc: BaseException) -> bytes:
    """The error as an SSE event (after a stream has begun, the status can no longer change)."""
    status, type_, code, param, _ = classify(exc)
    body = orjson.dumps({"error": {"message": message_of(exc), "type": type_, "param": param, "code": code,
                                   "status": status}})
    return b"data: " + body + b"\n\ndata: [DONE]\n\n"
