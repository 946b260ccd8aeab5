"""The OpenAI relay routes served straight from ASGI, in front of FastAPI's router and middleware.

A relayed request needs none of what FastAPI adds per request (route matching over every route,
dependency solving, its request and exception wrappers, a ``send`` wrapped once per middleware, which a
stream pays for every chunk): the handler reads the raw body and answers with the engine's bytes.
:class:`GatewayApp` (the app ``create_app`` makes) looks the path up in a dict, lets the key check
(:meth:`gateway.auth.KeyAuth.admit`) pass it, and calls :func:`gateway.api.openai.handle` directly;
every other request, and every other method on these paths, goes on to FastAPI, whose routes for the
same paths stay in the OpenAPI schema. With CORS origins set, the relay goes through the middleware
instead (:class:`RelayRoutes`, innermost), so that CORS headers are added to its answers too::

    app = GatewayApp(...)
    app.relay_gate = KeyAuth(app, settings=settings, people=people)   # the fast entry, or
    app.add_middleware(RelayRoutes)                                   # the relay inside the middleware
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.openai import RELAYED, handle
from gateway.auth import KeyAuth
from gateway.errors import error_response

log = logging.getLogger(__name__)


async def relay(scope: Scope, receive: Receive, send: Send, usage: bool, gate: KeyAuth | None = None) -> None:
    """Answer one relayed request; with ``gate``, only once the key check lets it in."""
    path: str = scope["path"]
    try:
        refusal = gate.admit(scope) if gate is not None else None
        response = refusal or await handle(Request(scope, receive), path, usage=usage)
    except Exception as exc:  # what the app's catch-all handler answers: logged, and an OpenAI-shaped 500
        log.exception("unexpected error on %s", path)
        response = error_response(exc)
    await response(scope, receive, send)


class RelayRoutes:
    """The relay as the innermost middleware (the key check and the body limits apply to it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        usage = RELAYED.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if usage is None:
            await self.app(scope, receive, send)
            return
        await relay(scope, receive, send, usage)


class GatewayApp(FastAPI):
    """FastAPI, with the relay routes served before its middleware when :attr:`relay_gate` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.relay_gate: KeyAuth | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate = self.relay_gate
        if gate is not None and scope["type"] == "http" and scope["method"] == "POST":
            usage = RELAYED.get(scope["path"])
            if usage is not None:
                scope["app"] = self
                await relay(scope, receive, send, usage, gate)
                return
        await super().__call__(scope, receive, send)
