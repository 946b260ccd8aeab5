"""Optional bearer keys, and what browsers and relays may not do, as a small ASGI middleware in front of
every route.

- ``/health`` and the console page with its assets (``gateway.console.is_public``: they hold no data) are
  always open; ``/metrics`` is open unless ``metrics_public`` is off or the users file names anyone (its
  counters carry the users' names): then it takes any valid key.
- ``/admin/...`` needs an admin key; every other route needs an API key or an admin key.
- With no keys at all, everything is open, except that admin routes answer only loopback clients.
- Keys are compared in constant time and never logged.

Browsers (a page the user visits may send requests to ``127.0.0.1:8000``):

- A request let in without a key that carries an ``Origin`` not in ``cors_origins`` (``Origin: null``
  included), or that a browser marks ``Sec-Fetch-Site: cross-site`` / ``same-site`` without an
  allowed origin, is refused (403): a cross-site page can neither post to admin routes nor spend the
  card on generations. A request with a valid key is vouched for by its key.
- Trust given for a loopback address (every route when no keys are configured) also needs a local
  ``Host`` (``localhost``, a loopback address, or this machine's name): a page that rebinds its own DNS
  name to 127.0.0.1 sends its own name as ``Host`` (DNS rebinding) and is refused.
- Keyless admin routes also refuse requests that say they were relayed (``Forwarded``,
  ``X-Forwarded-For``, ``X-Forwarded-Host``, ``X-Real-IP``, ``Via``). A relay on this machine that adds
  none of these and keeps a local ``Host`` cannot be told from a local client: configure keys before
  putting one in front of the gateway.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.console import is_public as is_console_page
from gateway.errors import APIError, Forbidden, Unauthorized, error_response
from gateway.settings import Settings
from gateway.users import People, set_user

OPEN_PATHS = frozenset({"/health"})
#: Headers by which a relay says it forwarded the request.
FORWARDING_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-real-ip", b"via"})


@functools.lru_cache(maxsize=256)
def is_loopback_host(host: str) -> bool:
    """Whether a bind address or ``Host`` name (port and brackets removed) means this machine only
    (remembered for the last 256 names: parsing an address costs microseconds on every request)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name of a ``Host`` header value, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def local_names() -> frozenset[str]:
    """Names by which a client on this machine may reach it over loopback (Debian maps its host name to
    127.0.1.1), besides ``localhost`` and loopback addresses."""
    name = socket.gethostname().lower()
    return frozenset({name, name.split(".", 1)[0]})


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
    return _loopback_address(client[0])


@functools.lru_cache(maxsize=256)
def _loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class KeyAuth:
    def __init__(self, app: ASGIApp, settings: Settings, people: People | None = None) -> None:
        self.app = app
        self.settings = settings
        self.people = people or People(None, api_keys=settings.api_keys, admin_keys=settings.admin_keys)
        self.origins = frozenset(o.rstrip("/").lower() for o in settings.cors_origins)
        self.local_names = local_names()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.admit(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def admit(self, scope: Scope) -> Response | None:
        """Let an HTTP request in (its user set in ``scope``), or the error response that refuses it."""
        key = _bearer(scope)
        if self.people.keys_required:
            error = self.check(scope["path"], key)
            if error is None and key is None:  # let in without a key: nothing vouches for the sender
                error = self.browser_check(scope)
        else:
            error = self.browser_check(scope) or self.keyless_check(scope)
        if error is None:
            set_user(scope, self.people.who(key))
            return None
        resp = error_response(error)
        if isinstance(error, Unauthorized):
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    def local_origin(self, scope: Scope) -> str | None:
        """The gateway's own origin as a client on this machine addresses it (scheme and a local ``Host``).

        A browser sends ``Origin`` with every POST and DELETE, same-origin ones included (the console's
        actions). A page that rebinds its DNS name to 127.0.0.1 is of its own origin too, but its Host is
        not local, so it gets None here.
        """
        for key, value in scope.get("headers", ()):
            if key == b"host":
                raw = value.decode("latin-1").strip().lower()
                name = host_name(raw)
                if is_loopback_host(name) or name in self.local_names:
                    return f"{scope.get('scheme', 'http')}://{raw}"
                return None
        return None

    def browser_check(self, scope: Scope) -> APIError | None:
        """Refuse what a browser sends on behalf of a page of another origin than the allowed ones."""
        origin = site = mode = None
        for key, value in scope.get("headers", ()):
            if key == b"origin":
                origin = value.decode("latin-1").strip().rstrip("/").lower()
            elif key == b"sec-fetch-site":
                site = value.decode("latin-1").strip().lower()
            elif key == b"sec-fetch-mode":
                mode = value.decode("latin-1").strip().lower()
        if origin is not None and origin not in self.origins and origin != self.local_origin(scope):
            return Forbidden(f"requests from web pages of origin {origin[:100]!r} are refused: the gateway is not "
                             "a browser API unless started with --cors-origin for that origin")
        navigation = mode == "navigate" and scope["method"] in ("GET", "HEAD")  # the user follows a link
        if origin is None and site in ("cross-site", "same-site") and not navigation:
            return Forbidden("requests a browser sends for another site are refused (Sec-Fetch-Site: "
                             f"{site}); start the gateway with --cors-origin for a web app that needs it")
        return None

    def keyless_check(self, scope: Scope) -> APIError | None:
        """With no keys, trust is by address: a loopback client with a local Host; admin routes take
        nothing else, and nothing that says it was relayed."""
        admin = scope["path"].startswith("/admin")
        if not _loopback(scope):
            if admin:
                return Forbidden("admin routes answer only on this machine while no admin key is configured; "
                                 "set ONECARD_ADMIN_KEYS to use them from elsewhere")
            return None
        host = relayed = None
        for key, value in scope.get("headers", ()):
            if key == b"host":
                host = host_name(value.decode("latin-1"))
            elif key in FORWARDING_HEADERS:
                relayed = key.decode("latin-1")
        if host is not None and not is_loopback_host(host) and host not in self.local_names:
            return Forbidden(f"a request for host {host[:100]!r} reached this gateway over loopback, which only "
                             "serves local names while no keys are configured (a page rebinding its DNS name "
                             "looks like this); use http://127.0.0.1 or http://localhost, or set "
                             "ONECARD_API_KEYS and ONECARD_ADMIN_KEYS")
        if admin and relayed is not None:
            return Forbidden(f"admin routes without a key answer only clients on this machine, and this request "
                             f"was relayed ({relayed} header); set ONECARD_ADMIN_KEYS to use them through a proxy")
        return None

    def check(self, path: str, key: str | None) -> APIError | None:
        s = self.settings
        if (path in OPEN_PATHS or is_console_page(path)
                or (path == "/metrics" and s.metrics_public and not self.people.named)):
            return None
        user = self.people.who(key)
        is_admin = user is not None and user.admin
        if path.startswith("/admin"):
            if is_admin:
                return None
            if key is None:
                return Unauthorized("this route needs the admin key: send 'Authorization: Bearer <admin key>'")
            if user is None:
                return Unauthorized("the key sent is not valid; this route needs the admin key")
            if not s.admin_keys and not any(u.admin for u in self.people.current().users):
                return Forbidden("admin routes are closed: no admin key is configured (set ONECARD_ADMIN_KEYS)")
            return Forbidden("this route needs the admin key; the key sent is not an admin key")
        if user is not None or not (s.api_keys or self.people.named):  # only admin keys: the API stays open
            return None
        if key is None:
            return Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        return Unauthorized("the API key sent is not valid")
