"""The stand-in engine's error answers in vLLM's JSON and small raw-ASGI helpers (reading bodies,
answering, logging in vLLM's format), and the ASGI types.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TextIO
from urllib.parse import parse_qs

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
JSON = dict[str, Any]

class ApiError(Exception):
    """An answer in vLLM's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return orjson.dumps({"error": error})


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


_JSON_TYPE: Final = b"application/json"
SSE_START: Final[Message] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
SSE_DONE: Final = b"data: [DONE]\n\n"
NOT_FOUND: Final = b'{"detail":"Not Found"}'
NOT_ALLOWED: Final = b'{"detail":"Method Not Allowed"}'


async def respond(send: Send, status: int, body: bytes = b"", content_type: bytes | None = _JSON_TYPE) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def read_json(receive: Receive) -> JSON:
    body = await read_body(receive)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    return data


def request_header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def int_field(req: JSON, key: str, default: int | None, *, minimum: int = 0) -> int | None:
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"`{key}` must be an integer.", key)
    if value < minimum:
        raise bad_request(f"`{key}` must be at least {minimum}, got {value}.", key)
    return value


def vllm_log(level: str, where: str, message: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(f"{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}\n")
    out.flush()


def random_id() -> str:
    return os.urandom(16).hex()
