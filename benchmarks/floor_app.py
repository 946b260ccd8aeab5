"""The least a relay on the gateway's HTTP stack can do: an ASGI app that passes each request to one
engine through :class:`gateway.engine_http.EngineClient` and its answer back, chunk by chunk, with
nothing else (no keys, no parsing, no queue, no metrics). Served by uvicorn with uvloop and httptools, as
the gateway is; ``benchmarks.relay_floor`` measures the gateway against it::

    FLOOR_UPSTREAM=http://127.0.0.1:8001 uvicorn benchmarks.floor_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os

from starlette.types import Receive, Scope, Send

from gateway.engine_http import EngineClient

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8001")
_client: list[EngineClient] = []


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _client.append(EngineClient(limit=None, connect_timeout=10.0, read_timeout=600.0, keepalive_s=4.0))
                await send({"type": "lifespan.startup.complete"})
            else:
                for c in _client:
                    await c.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    upstream = await _client[0].request(scope["method"], UPSTREAM, scope["path"], body=body)
    try:
        headers = [(b"content-type", upstream.header(b"content-type") or b"application/json")]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        async for data in upstream:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        upstream.release()
