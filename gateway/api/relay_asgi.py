"""The OpenAI relay routes served straight from ASGI, in front of FastAPI's router.

A relayed request needs none of what FastAPI adds per request (route matching over every route,
dependency solving, its request and exception wrappers): the handler reads the raw body and answers
with the engine's bytes. :class:`RelayRoutes` looks the path up in a dict and calls
:func:`gateway.api.openai.handle` directly; every other request, and every other method on these paths,
goes on to FastAPI, whose routes for the same paths stay in the OpenAPI schema. It sits inside the key
check and the admin body limit, so those apply to it as to any route::

    app.add_middleware(RelayRoutes)     # first: the innermost of the gateway's middlewares
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.openai import RELAYED, handle
from gateway.errors import error_response

log = logging.getLogger(__name__)


class RelayRoutes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        usage = RELAYED.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if usage is None:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        try:
            response = await handle(Request(scope, receive), path, usage=usage)
        except Exception as exc:  # what the app's catch-all handler answers: logged, and an OpenAI-shaped 500
            log.exception("unexpected error on %s", path)
            response = error_response(exc)
        await response(scope, receive, send)
