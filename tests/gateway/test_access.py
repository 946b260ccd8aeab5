"""Access control: with keys configured every route but ``/health`` (and ``/metrics`` while public) needs
a key, admin routes need the admin key, keys never reach a log or an engine, and CORS is off unless an
origin is configured."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import (
    GatewayProcess,
    ServerThread,
    running_gateway,
    standin_executable,
    standin_model,
    write_registry,
)

pytestmark = pytest.mark.timeout(180)

API_KEY = "sk-api-7f3c9e1b2d4a90e1"
ADMIN_KEY = "sk-admin-5b8d0a6e4c2f71d3"
WRONG_KEY = "sk-wrong-1a2b3c4d5e6f7a8b"
OPEN = {"/health", "/metrics"}


def registry(tmp: Path) -> Path:
    models = [standin_model("alpha", aliases=["cand"]),
              standin_model("broken", env={"STANDIN_FAIL_START": "ValueError: bad flag --frobnicate"})]
    return write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=2.5)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("access")
    with running_gateway(registry(tmp), tmp / "run", api_keys=frozenset({API_KEY}),
                         admin_keys=frozenset({ADMIN_KEY})) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def every_route(server: ServerThread) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves (its OpenAPI schema, and the schema itself)."""
    out = [("GET", server.app.openapi_url or "/openapi.json")]
    for path, ops in server.app.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", lambda m: "nope" if "lease" in m.group(0) else "alpha", path)
        out += [(method.upper(), concrete) for method in ops]
    return out


def request(server: ServerThread, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = None
    if method == "POST" and not path.startswith("/admin"):
        body = {"model": "alpha", "prompt": "x", "max_tokens": 1, "text": "x", "tokens": [1], "input": "x"}
    elif path == "/admin/leases":
        body = {"pid": os.getpid(), "gib": 0.1}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)


def test_every_route_but_health_and_metrics_needs_a_key(keyed: ServerThread) -> None:
    routes = every_route(keyed)
    assert len(routes) >= 20 and ("GET", "/openapi.json") in routes
    for method, path in routes:
        for headers in ({}, bearer(WRONG_KEY), {"x-api-key": WRONG_KEY}, {"Authorization": API_KEY}):
            r = request(keyed, method, path, headers)
            if path in OPEN:
                assert r.status_code == 200, (method, path, r.status_code)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", err
            assert WRONG_KEY not in r.text


def test_api_key_opens_the_api_and_admin_key_opens_everything(keyed: ServerThread) -> None:
    for method, path in every_route(keyed):
        admin = path.startswith("/admin")
        for headers in (bearer(API_KEY), {"x-api-key": API_KEY}):
            r = request(keyed, method, path, headers)
            if admin:
                assert r.status_code == 403, (method, path, r.status_code)
                err = r.json()["error"]
                assert err["type"] == "permission_error" and "admin key" in err["message"], err
            else:
                assert r.status_code not in (401, 403), (method, path, r.status_code, r.text[:200])
        r = request(keyed, method, path, bearer(ADMIN_KEY))
        assert r.status_code not in (401, 403), (method, path, r.status_code, r.text[:200])
        if path == "/admin/leases" and method == "POST":
            assert r.status_code == 201, r.text
            lease_id = r.json()["id"]
            assert httpx.delete(f"{keyed.url}/admin/leases/{lease_id}", headers=bearer(ADMIN_KEY)).status_code == 200


@pytest.mark.parametrize("path", ["/admin/engines/", "//admin/engines", "/%61dmin/engines", "/admin%2Fengines",
                                  "/health/../admin/engines", "/ADMIN/engines", "/admin/../admin/engines",
                                  "/v1/../admin/engines"])
def test_no_spelling_of_an_admin_path_gets_in_without_the_admin_key(keyed: ServerThread, path: str) -> None:
    with httpx.Client(base_url=keyed.url, follow_redirects=False) as c:
        for headers in ({}, bearer(API_KEY)):
            r = c.send(c.build_request("GET", httpx.URL(keyed.url + path), headers=headers))
            assert r.status_code in (401, 403, 404, 307), (path, r.status_code, r.text[:200])
            assert '"engines"' not in r.text


def test_metrics_needs_a_key_when_not_public(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run", api_keys=frozenset({API_KEY}),
                         admin_keys=frozenset({ADMIN_KEY}), metrics_public=False) as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers=bearer(API_KEY)).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200


def test_which_routes_each_kind_of_key_closes(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run") as server:
        assert httpx.get(server.url + "/admin/engines").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 200
    with running_gateway(registry(tmp_path), tmp_path / "run2", admin_keys=frozenset({ADMIN_KEY})) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 200
        assert httpx.get(server.url + "/admin/engines").status_code == 401
        assert httpx.get(server.url + "/admin/engines", headers=bearer(ADMIN_KEY)).status_code == 200
    with running_gateway(registry(tmp_path), tmp_path / "run3", api_keys=frozenset({API_KEY})) as server:
        r = httpx.get(server.url + "/admin/engines", headers=bearer(API_KEY))
        assert r.status_code == 403 and "no admin key is configured" in r.json()["error"]["message"]


# --- keys never in a log, never in an engine ----------------------------------------------------------------


def test_keys_never_appear_in_logs_or_engines(tmp_path: Path) -> None:
    """``onecard serve`` at debug level, keys from the environment, traffic that logs as much as it can
    (good and bad keys, an engine that fails with its log tail, admin log tails): no key string anywhere."""
    env = {"ONECARD_API_KEYS": f"{API_KEY},other-{API_KEY}", "ONECARD_ADMIN_KEYS": ADMIN_KEY}
    run_dir = tmp_path / "run"
    gw = GatewayProcess(registry(tmp_path), run_dir, log_level="debug", env=env)
    outputs: list[str] = []
    try:
        gw.start()
        url = gw.url
        body = {"model": "cand", "prompt": "x", "max_tokens": 2}
        for key in (API_KEY, WRONG_KEY, ADMIN_KEY, API_KEY[:-1]):
            for headers in (bearer(key), {"x-api-key": key}, {"Authorization": f"Basic {key}"}):
                for path in ("/v1/completions", "/v1/models", "/admin/engines", "/nowhere"):
                    method = "POST" if path == "/v1/completions" else "GET"
                    r = httpx.request(method, url + path, json=body if method == "POST" else None, headers=headers,
                                      timeout=60)
                    outputs.append(r.text)
        broken = httpx.post(url + "/v1/completions", json={"model": "broken", "prompt": "x"},
                            headers=bearer(API_KEY), timeout=60)
        assert broken.status_code == 502 and "frobnicate" in broken.text
        outputs.append(broken.text)
        for name in ("alpha", "broken"):
            r = httpx.get(f"{url}/admin/engines/{name}/log?lines=500", headers=bearer(ADMIN_KEY))
            assert r.status_code == 200 and r.text
            outputs.append(r.text)
        for path in ("/metrics", "/admin/engines", "/v1/models", "/admin/plan", "/openapi.json"):
            outputs.append(httpx.get(url + path, headers=bearer(ADMIN_KEY)).text)
        engine_pid = next(row["pid"] for row in httpx.get(url + "/admin/engines", headers=bearer(ADMIN_KEY))
                          .json()["engines"] if row["model"] == "alpha")
        engine_env = psutil.Process(engine_pid).environ()
        assert "ONECARD_API_KEYS" not in engine_env and "ONECARD_ADMIN_KEYS" not in engine_env
        assert not any(k in v for v in engine_env.values() for k in (API_KEY, ADMIN_KEY))
        gw.signal(signal.SIGTERM)
        gw.wait(40)
    finally:
        gw.close()
    time.sleep(0.2)
    logs = {str(p): p.read_text(errors="replace") for p in [gw.log_path, *(run_dir / "logs").glob("*")]}
    assert "frobnicate" in "".join(logs.values())  # the engine's log tail is there ...
    for key in (API_KEY, ADMIN_KEY, WRONG_KEY, API_KEY[:-1]):
        for name, text in logs.items():
            assert key not in text, f"a key is in {name}"
        for text in outputs:
            assert key not in text, "a key came back in a response"


# --- CORS ---------------------------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default(keyed: ServerThread) -> None:
    r = preflight(keyed.url, "https://evil.example")
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(keyed.url + "/v1/models", headers={"Origin": "https://evil.example", **bearer(API_KEY)})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_for_a_configured_origin_only(tmp_path: Path) -> None:
    origin = "https://notebook.example"
    with running_gateway(registry(tmp_path), tmp_path / "run", api_keys=frozenset({API_KEY}),
                         cors_origins=(origin,)) as server:
        r = preflight(server.url, origin)  # a preflight carries no key: it must not be refused for that
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.get(server.url + "/v1/models", headers={"Origin": origin, **bearer(API_KEY)})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = httpx.get(server.url + "/v1/models", headers={"Origin": origin})  # the browser can read the 401
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        # The relayed routes (served apart from FastAPI's routes) answer with CORS headers too.
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": []},
                       headers={"Origin": origin, **bearer(API_KEY)})
        assert r.status_code == 404 and r.headers["access-control-allow-origin"] == origin
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope"}, headers={"Origin": origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        r = preflight(server.url, "https://other.example")
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://other.example", **bearer(API_KEY)})
        assert "access-control-allow-origin" not in r.headers


async def test_admin_routes_answer_only_loopback_when_no_key_is_configured(tmp_path: Path) -> None:
    from gateway.auth import KeyAuth
    from gateway.settings import Settings

    async def app(scope: object, receive: object, send: object) -> None:  # the routes behind the middleware
        from starlette.responses import PlainTextResponse

        await PlainTextResponse("reached")(scope, receive, send)  # type: ignore[arg-type]

    guarded = KeyAuth(app, Settings(registry_path=tmp_path / "r.yaml"))
    for client, status in ((("10.1.2.3", 5000), 403), (("127.0.0.1", 5000), 200), (("::1", 5000), 200)):
        transport = httpx.ASGITransport(app=guarded, client=client)
        # a local Host: over loopback, another name is what DNS rebinding looks like (test_hardening_http)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
            r = await c.get("/admin/engines")
            assert r.status_code == status, (client, r.text)
            if status == 403:
                assert "only on this machine" in r.json()["error"]["message"]
            else:
                assert r.text == "reached"
            assert (await c.get("/v1/models")).status_code == 200  # the API stays open without keys


async def test_thermal_admission_waits_boundedly_then_429() -> None:
    from gateway.context import Admission
    from gateway.errors import Overloaded

    adm = Admission(limit=1, max_wait_s=0.1)
    await adm.acquire()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.status == 429 and info.value.retry_after > 0
    adm.release()
    await adm.acquire()  # free again
