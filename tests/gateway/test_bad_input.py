"""Bad input: a property-based fuzz of every route in the gateway's own OpenAPI schema, then explicit
malformed, oversized, mistyped, traversing and header-injecting requests, each while a good stream runs.

Every answer must be an OpenAI-shaped error (``{"error": {"message", "type", "param", "code"}}``) or a
success; never a 500; and the gateway must go on serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.commands import ReleaseLease
from tests.fakes.standin_engine import expected_text
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(300)

MAX_BODY = 100_000
NAMES = ["alpha", "cand", "beta", "alpha-lora"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("bad-input")
    adapter = tmp / "adapters" / "a-lora"
    adapter.mkdir(parents=True)
    models = [
        standin_model("alpha", aliases=["cand"], env={"STANDIN_TOKEN_DELAY": "0.005"},
                      lora={"enabled": True, "max_rank": 8, "adapters": {"alpha-lora": {"path": str(adapter)}}}),
        standin_model("beta"),
    ]
    reg = write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=2.5)
    with running_gateway(reg, tmp / "run", max_body_bytes=MAX_BODY) as server:
        for m in ("alpha", "beta"):
            assert httpx.post(f"{server.url}/admin/engines/{m}/load", timeout=60).status_code == 200
        yield server


def assert_openai_error(r: httpx.Response) -> dict[str, Any]:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and "code" in err and "param" in err, err
    return dict(err)


def assert_no_500(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert_openai_error(r)


# --- the fuzz ----------------------------------------------------------------------------------------------

#: Text with lone surrogates: valid JSON (``"\\ud800"``) that Python's parser takes and orjson refuses.
surrogate_text = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), min_size=1,
                         max_size=8)
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
            | surrogate_text)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)
#: Text that fits in a URL (no lone surrogates), with the strings an attacker would try.
url_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30) | st.sampled_from(
    [*NAMES, "..", "../..", "../../etc/passwd", "%2e%2e", "..%2F..%2Fetc", "a\r\nX-Injected: 1", "\x00", " "])
model_values = st.sampled_from(NAMES) | st.text(max_size=30) | json_values
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]) | json_values,
                                           "content": st.text(max_size=40) | json_values}), max_size=3)
OPENAI_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": model_values,
    "stream": st.booleans() | json_values,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 2**31), max_size=8) | json_values,
    "messages": messages | json_values,
    "max_tokens": st.integers(-3, 24) | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values})
    | json_values,
    "echo": st.booleans(),
    "logprobs": st.integers(-1, 25) | st.booleans() | json_values,
    "input": st.text(max_size=40) | json_values,
    "tokens": st.lists(st.integers(-5, 2**31), max_size=8) | json_values,
}
#: Extra keys; ``n`` and ``best_of`` are left out only because the stand-in would honour n = 10**20.
extra_keys = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("n", "best_of")), json_values, max_size=3)


def schema_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the schema's type, some out of range, mixed with values of any other type."""
    kind = schema.get("type")
    if kind is None and "anyOf" in schema:
        kind = next((s.get("type") for s in schema["anyOf"] if s.get("type") != "null"), None)
    typed: st.SearchStrategy[Any] = {
        "integer": st.integers(-(2**40), 2**40) | st.sampled_from([0, 1, 2, 5000, 5001, 2**31, -1, 2**63, 10**20]),
        "number": st.floats() | st.integers(),
        "boolean": st.booleans(),
        "string": url_text,
    }.get(str(kind), json_values)
    return typed | json_values


def body_strategy(op: dict[str, Any], schemas: dict[str, Any]) -> st.SearchStrategy[bytes]:
    content = op["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in content:
        content = schemas[content["$ref"].rsplit("/", 1)[-1]]
    props = content.get("properties", {})
    fields = {**{k: schema_value(v) for k, v in props.items()}, **(OPENAI_FIELDS if "model" in props else {})}
    objects = st.builds(lambda d, extra: {**extra, **d}, st.fixed_dictionaries({}, optional=fields), extra_keys)
    deep = st.integers(500, 3000).map(lambda n: b'{"model": "alpha", "x": ' + b"[" * n + b"]" * n + b"}")
    return (objects.map(lambda d: json.dumps(d).encode())
            | json_values.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=200) | deep)


@st.composite
def requests_from_schema(draw: st.DrawFn, spec: dict[str, Any]) -> tuple[str, str, dict[str, Any], bytes | None]:
    schemas = spec.get("components", {}).get("schemas", {})
    routes = sorted((path, method) for path, ops in spec["paths"].items() for method in ops)
    path, method = draw(st.sampled_from(routes))
    op = spec["paths"][path][method]
    url_path, query = path, {}
    for p in op.get("parameters", []):
        value = draw(schema_value(p.get("schema", {})))
        text = value if isinstance(value, str) else json.dumps(value)
        if p["in"] == "path":
            url_path = url_path.replace("{" + p["name"] + "}", quote(text.encode("utf-8", "replace"), safe=""))
        elif p["in"] == "query" and draw(st.booleans()):
            query[p["name"]] = text.encode("utf-8", "replace").decode()
    body = draw(body_strategy(op, schemas)) if "requestBody" in op else None
    return method.upper(), url_path, query, body


def test_fuzz_every_route_of_the_openapi_schema(gateway: ServerThread) -> None:
    spec = httpx.get(gateway.url + "/openapi.json").json()
    assert len(spec["paths"]) >= 15
    client = httpx.Client(base_url=gateway.url, timeout=30)
    seen: dict[int, int] = {}

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests_from_schema(spec))
    def one(req: tuple[str, str, dict[str, Any], bytes | None]) -> None:
        method, path, query, body = req
        headers = {"content-type": "application/json"} if body is not None else {}
        r = client.request(method, httpx.URL(gateway.url + path, params=query), content=body, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert_no_500(r)
        lease = gateway.gw.pool.owner.leases.lease
        if lease is not None:  # a fuzzed pid that happens to exist got a lease: hand the card back
            gateway.call(gateway.gw.pool.submit(ReleaseLease(lease.lease_id)))

    try:
        one()
    finally:
        client.close()
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0, seen
    good = httpx.post(gateway.url + "/v1/completions", json={"model": "alpha", "prompt": "ok", "max_tokens": 3},
                      timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected_text("alpha", "ok", 3)


# --- explicit cases ----------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
DEEP = b'{"model": "alpha", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
BIG = b'{"model": "alpha", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'


def _chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 8192):
        yield data[i:i + 8192]


#: (label, method, path, body, headers, status, error code, words in the message)
CASES: list[tuple[str, str, str, Any, dict[str, str], int, str | None, str]] = [
    ("malformed JSON", "POST", "/v1/chat/completions", b"{not json", JSON, 400, "bad_request", "not valid JSON"),
    ("empty body", "POST", "/v1/completions", b"", JSON, 400, "bad_request", "empty"),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", JSON, 400, "bad_request", "JSON object"),
    ("model is a number", "POST", "/v1/completions", b'{"model": 5}', JSON, 400, "bad_request", "'model'"),
    ("model is a list", "POST", "/v1/embeddings", b'{"model": ["alpha"]}', JSON, 400, "bad_request", "'model'"),
    ("stream is a string", "POST", "/v1/completions", b'{"model": "alpha", "stream": "yes"}', JSON, 400,
     "bad_request", "'stream'"),
    ("invalid UTF-8", "POST", "/v1/completions", b'{"model": "al\xff\xfepha"}', JSON, 400, "bad_request",
     "not valid JSON"),
    ("lone surrogate in model", "POST", "/v1/completions", b'{"model": "\\ud800"}', JSON, 404, "model_not_found",
     "\\ud800"),
    ("nested too deeply", "POST", "/v1/completions", DEEP, JSON, 400, "bad_request", "nested too deeply"),
    ("huge body, declared", "POST", "/v1/completions", BIG, JSON, 413, "request_too_large", "over the limit"),
    ("huge body, chunked", "POST", "/v1/chat/completions", "chunked", JSON, 413, "request_too_large",
     "over the limit"),
    ("traversal as model", "POST", "/v1/completions", b'{"model": "../../etc/passwd"}', JSON, 404,
     "model_not_found", "does not exist"),
    ("traversal as model id", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None, {}, 404, "model_not_found",
     "does not exist"),
    ("traversal in admin log", "GET", "/admin/engines/..%2F..%2Fetc/log", None, {}, 404, "not_found", "Not Found"),
    ("dot-dot engine name", "GET", "/admin/engines/%2e%2e/log", None, {}, 404, "model_not_found", "does not exist"),
    ("log lines not a number", "GET", "/admin/engines/alpha/log?lines=abc", None, {}, 400, "bad_request", "lines"),
    ("log lines too many", "GET", "/admin/engines/alpha/log?lines=99999999999999999999", None, {}, 400,
     "bad_request", "lines"),
    ("sleep level 3", "POST", "/admin/engines/alpha/sleep?level=3", None, {}, 400, "bad_request", "level"),
    ("lease pid past pid_t", "POST", "/admin/leases", b'{"pid": 99999999999999999999}', JSON, 400, "bad_request",
     "pid"),
    ("lease pid of no process", "POST", "/admin/leases", b'{"pid": 2147483000}', JSON, 400, "bad_request",
     "no process"),
    ("lease of infinite GiB", "POST", "/admin/leases", b'{"pid": 1, "gib": 1e999}', JSON, 400, "bad_request",
     "finite"),
    ("unknown route", "GET", "/v2/anything", None, {}, 404, "not_found", "Not Found"),
    ("wrong method", "GET", "/v1/completions", None, {}, 405, "method_not_allowed", "Not Allowed"),
    ("CR/LF in model", "POST", "/v1/completions", b'{"model": "alpha\\r\\nX-Injected: 1"}', JSON, 404,
     "model_not_found", "does not exist"),
]


async def _send(c: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    content = _chunks(BIG) if body == "chunked" else body
    if isinstance(content, Iterator):
        async def agen() -> Any:
            for part in content:
                yield part
        return await c.request(method, path, content=agen(), headers=headers)
    return await c.request(method, path, content=content, headers=headers)


def test_bad_requests_get_clear_4xx_while_a_good_stream_runs(gateway: ServerThread) -> None:
    tokens = 200  # about a second at 5 ms a token: it spans every bad request

    async def main() -> tuple[list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as c:
            async def good() -> str:
                body = {"model": "cand", "prompt": "steady", "max_tokens": tokens, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    return (await r.aread()).decode()

            stream = asyncio.create_task(good())
            await asyncio.sleep(0.05)
            bad = [await _send(c, m, p, b, h) for _, m, p, b, h, *_ in CASES]
            return bad, await stream

    bad, text = asyncio.run(main())
    for (label, _, _, _, _, status, code, words), r in zip(CASES, bad, strict=True):
        assert r.status_code == status, (label, r.status_code, r.text[:300])
        err = assert_openai_error(r)
        assert err["code"] == code and words in err["message"], (label, err)
        assert "x-injected" not in r.headers and "root:" not in r.text, label
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    got = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert got == expected_text("alpha", "steady", tokens)


def test_model_header_is_the_registry_name_never_the_clients_string(gateway: ServerThread) -> None:
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "cand", "prompt": "x", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 200 and r.headers["x-onecard-model"] == "alpha"
    assert "\r" not in r.headers["x-onecard-provenance"] and "\n" not in r.headers["x-onecard-provenance"]
    # What the client sends in the body never becomes a header: a CR/LF model is just an unknown model.
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "cand\r\nx-injected: 1"})
    assert r.status_code == 404 and "x-onecard-model" not in r.headers and "x-injected" not in r.headers


@pytest.mark.parametrize("body", [
    b'{"model": "cand", "prompt": "\\udc00", "max_tokens": 1}',  # an alias: the body is rewritten
    b'{"model": "alpha", "prompt": "\\udc00", "stream": true, "max_tokens": 1}',  # a stream: usage is asked for
])
def test_a_body_orjson_cannot_write_is_forwarded_as_sent(gateway: ServerThread, body: bytes) -> None:
    """A lone surrogate is JSON that Python's parser (and vLLM's) takes and orjson refuses: when the gateway
    rewrites such a body it must not fail (it did: a 500) but forward it for the engine to judge."""
    r = httpx.post(gateway.url + "/v1/completions", content=body, headers=JSON, timeout=60)
    assert r.status_code == 400, r.text  # the stand-in's own verdict, relayed
    assert "surrogate" in assert_openai_error(r)["message"]


def test_a_broken_http_request_is_refused_and_the_gateway_serves_on(gateway: ServerThread) -> None:
    """A CR or LF inside a header value never reaches the app: the HTTP server answers 400 and closes.
    (That answer is uvicorn's plain text, not OpenAI JSON: the request never became a request.)"""
    raw = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"x-note: one\nx-injected: two\r\ncontent-length: 2\r\n\r\n{}")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(raw)
        answer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            part = s.recv(65536)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert httpx.get(gateway.url + "/health").status_code == 200
