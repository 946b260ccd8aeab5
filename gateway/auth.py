"""Optional bearer keys, as a small ASGI middleware in front of every route.

- ``/health`` and the console page with its assets (``gateway.console.is_public``: they hold no data) are
  always open; ``/metrics`` is open unless ``metrics_public`` is off.
- ``/admin/...`` needs an admin key; every other route needs an API key or an admin key.
- With no keys at all, everything is open, except that admin routes answer only loopback clients.
- Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.console import is_public as is_console_page
from gateway.errors import APIError, Forbidden, Unauthorized, error_response
from gateway.settings import Settings

OPEN_PATHS = frozenset({"/health"})


def _bearer(scope: Scope) -> str | None:
    key: bytes
    value: bytes
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
        if key == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _matches(key: str | None, keys: frozenset[str]) -> bool:
    if key is None:
        return False
    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), k.encode())
    return found


class KeyAuth:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.settings.auth_enabled:
            error: APIError | None = None
            if scope["path"].startswith("/admin") and not _loopback(scope):
                error = Forbidden("admin routes answer only on this machine while no admin key is configured; "
                                  "set ONECARD_ADMIN_KEYS to use them from elsewhere")
        else:
            error = self.check(scope["path"], _bearer(scope))
        if error is not None:
            resp = error_response(error)
            if isinstance(error, Unauthorized):
                resp.headers["WWW-Authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, path: str, key: str | None) -> APIError | None:
        s = self.settings
        if path in OPEN_PATHS or is_console_page(path) or (path == "/metrics" and s.metrics_public):
            return None
        is_admin = _matches(key, s.admin_keys)
        if path.startswith("/admin"):
            if is_admin:
                return None
            if key is None:
                return Unauthorized("this route needs the admin key: send 'Authorization: Bearer <admin key>'")
            if not _matches(key, s.api_keys):
                return Unauthorized("the key sent is not valid; this route needs the admin key")
            if not s.admin_keys:
                return Forbidden("admin routes are closed: no admin key is configured (set ONECARD_ADMIN_KEYS)")
            return Forbidden("this route needs the admin key; the key sent is not an admin key")
        if is_admin or _matches(key, s.api_keys) or not s.api_keys:
            return None
        if key is None:
            return Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        return Unauthorized("the API key sent is not valid")
