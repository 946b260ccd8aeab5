"""vLLM 0.32's whole model API through ``onecard serve``, against the real CPU engine (one engine start).

- Coverage: every path of the engine's own ``/openapi.json`` that takes a model is relayed by the gateway
  or listed, with its reason, in :data:`gateway.api.vllm_routes.NOT_RELAYED`.
- Fidelity: for chat and completion streams, responses, messages, count_tokens, tokenizer_info, batch chat
  and generative scoring, the gateway's answer equals the engine's own (ids and timestamps blanked).
- Real clients: the openai SDK's ``responses.create`` and the anthropic SDK's ``messages.create``, streamed
  and not.
"""

from __future__ import annotations

import re
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.api.vllm_routes import NOT_RELAYED, RELAYED
from tests.support import GatewayProcess

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MODEL = "tiny-llama"  # alias "candidate"; the only engine this module starts
_VOLATILE = re.compile(rb'"(id|item_id|created|created_at)":("[^"]*"|\d+)')


@pytest.fixture(scope="module")
def gateway(demo_gateway: GatewayProcess) -> GatewayProcess:
    r = httpx.post(
        demo_gateway.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=300
    )
    assert r.status_code == 200, r.text
    return demo_gateway


def engine_url(gw: GatewayProcess) -> str:
    rows = httpx.get(gw.url + "/admin/engines", timeout=10).json()["engines"]
    port = next(r["port"] for r in rows if r["model"] == MODEL)
    return f"http://127.0.0.1:{port}"


def blank(body: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":0', body)


_STREAMED = re.compile(rb'"(text|content|delta|sequence_number)":("(?:[^"\\]|\\.)*"|\d+)')


def shape(raw: bytes) -> list[bytes]:
    """A stream's events with ids, clocks and streamed text blanked, grouped by choice, and runs of equal
    events collapsed: how many tokens one event carries, and how the choices of ``n > 1`` interleave,
    depend on timing (vLLM sends what each engine step produced)."""
    groups: dict[int, list[bytes]] = {}
    for ev in blank(raw).split(b"\n\n"):
        index = -1
        if ev.startswith(b"data: {"):
            choices = orjson.loads(ev[6:]).get("choices") or []
            index = choices[0]["index"] if len(choices) == 1 else -1
        ev = _STREAMED.sub(rb'"\1":"~"', ev)
        group = groups.setdefault(index, [])
        if not group or group[-1] != ev:
            group.append(ev)
    return [ev for index in sorted(groups, key=lambda i: (i < 0, i)) for ev in groups[index]]


def streamed_text(raw: bytes) -> dict[int, str]:
    """The text of each choice, joined over a chat, completion, responses or messages stream."""
    texts: dict[int, str] = {}
    for ev in raw.split(b"\n\n"):
        data_at = ev.find(b"data: {")
        if data_at < 0:
            continue
        data = orjson.loads(ev[data_at + 6 :])
        for choice in data.get("choices") or []:
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
        if data.get("type") == "response.output_text.delta":
            texts[0] = texts.get(0, "") + data["delta"]
        if data.get("type") == "content_block_delta":
            texts[0] = texts.get(0, "") + data["delta"]["text"]
    return texts


def same_answer(via: bytes, direct: bytes) -> None:
    """Equal bodies, or for streams equal event shapes and equal text."""
    if b"\n\ndata: " not in direct and not direct.startswith(b"event: "):
        assert blank(via) == blank(direct)
        return
    assert shape(via) == shape(direct)
    assert streamed_text(via) == streamed_text(direct)
    assert streamed_text(direct), "no text streamed"


# -- coverage ----------------------------------------------------------------------------------------


def _has_model(spec: dict[str, Any], schema: dict[str, Any], seen: set[str]) -> bool:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref in seen:
            return False
        seen.add(ref)
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    if "model" in (schema.get("properties") or {}):
        return True
    return any(_has_model(spec, s, seen) for key in ("anyOf", "oneOf", "allOf") for s in schema.get(key, []))


def paths_taking_a_model(spec: dict[str, Any]) -> set[str]:
    """Paths whose query, JSON body or form names a model."""
    found = set()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if any(p.get("name") == "model" for p in op.get("parameters", [])) or any(
                _has_model(spec, media.get("schema") or {}, set())
                for media in (op.get("requestBody") or {}).get("content", {}).values()
            ):
                found.add(path)
    return found


def uncovered(spec: dict[str, Any]) -> set[str]:
    return paths_taking_a_model(spec) - RELAYED - set(NOT_RELAYED)


def test_coverage_check_finds_a_path_that_is_not_relayed() -> None:
    spec = {
        "paths": {
            "/v1/new": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/New"}}}}
                }
            },
            "/v1/form": {
                "post": {
                    "requestBody": {
                        "content": {"multipart/form-data": {"schema": {"properties": {"model": {"type": "string"}}}}}
                    }
                }
            },
            "/v1/q": {"get": {"parameters": [{"name": "model", "in": "query"}]}},
            "/v1/none": {"get": {}},
        },
        "components": {"schemas": {"New": {"anyOf": [{"properties": {"model": {}}}]}}},
    }
    assert uncovered(spec) == {"/v1/new", "/v1/form", "/v1/q"}


def test_every_engine_path_that_takes_a_model_is_relayed_or_listed(gateway: GatewayProcess) -> None:
    spec = httpx.get(engine_url(gateway) + "/openapi.json", timeout=30).json()
    taking = paths_taking_a_model(spec)
    assert {"/v1/chat/completions", "/v1/responses", "/v1/messages"} <= taking  # the check reads the schema
    assert uncovered(spec) == set(), "vLLM paths that take a model, neither relayed nor in NOT_RELAYED"
    ours = httpx.get(gateway.url + "/openapi.json", timeout=30).json()["paths"]
    assert set(RELAYED) - set(ours) == set(), "listed as relayed but not routed by the gateway"
    for path in RELAYED & set(spec["paths"]):  # relayed paths take the engine's methods
        assert set(spec["paths"][path]) <= set(ours[path]), path


# -- fidelity ----------------------------------------------------------------------------------------


def both(
    gw: GatewayProcess, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
) -> tuple[httpx.Response, httpx.Response]:
    """The gateway's answer (asked by alias) and the engine's own (asked by its served name)."""
    via = httpx.request(
        method, gw.url + path, json=None if body is None else {"model": "candidate", **body}, params=params, timeout=300
    )
    direct = httpx.request(
        method,
        engine_url(gw) + path,
        json=None if body is None else {"model": MODEL, **body},
        params=params,
        timeout=300,
    )
    return via, direct


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 5}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2, "temperature": 1, "seed": 7},
        ),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3, "stream_options": {"include_usage": True}}),
    ],
    ids=["chat", "chat-n2", "completions", "completions-usage"],
)
def test_stream_equals_the_engines_own(gateway: GatewayProcess, path: str, body: dict[str, Any]) -> None:
    via, direct = both(gateway, "POST", path, {"temperature": 0, **body, "stream": True})
    assert via.status_code == direct.status_code == 200, via.text
    ours, theirs = shape(via.content), shape(direct.content)
    fields = [[list(orjson.loads(ev[6:]).items()) if ev.startswith(b"data: {") else ev] for ev in ours]
    assert fields == [[list(orjson.loads(ev[6:]).items()) if ev.startswith(b"data: {") else ev] for ev in theirs]
    same_answer(via.content, direct.content)
    terminal = [ev for ev in theirs if b'"finish_reason":"' in ev]
    with_usage = "stream_options" in body
    assert terminal and all((b'"system_fingerprint":"vllm-0.32.0' in ev) != with_usage for ev in terminal)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/responses", {"input": "Hello", "max_output_tokens": 4, "temperature": 0}),
        ("POST", "/v1/responses", {"input": "Hello", "max_output_tokens": 3, "temperature": 0, "stream": True}),
        (
            "POST",
            "/v1/messages",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0},
        ),
        (
            "POST",
            "/v1/messages",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0, "stream": True},
        ),
        ("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "Hello"}]}),
        (
            "POST",
            "/v1/chat/completions/batch",
            {
                "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                "max_tokens": 2,
                "temperature": 0,
            },
        ),
        ("POST", "/generative_scoring", {"query": "Is it?", "items": ["yes", "no"], "label_token_ids": [5, 6]}),
    ],
    ids=[
        "responses",
        "responses-stream",
        "messages",
        "messages-stream",
        "count_tokens",
        "batch-chat",
        "generative-scoring",
    ],
)
def test_route_answers_as_the_engine(gateway: GatewayProcess, method: str, path: str, body: dict[str, Any]) -> None:
    via, direct = both(gateway, method, path, body)
    assert via.status_code == direct.status_code == 200, via.text
    assert via.headers["content-type"] == direct.headers["content-type"]
    same_answer(via.content, direct.content)
    assert via.headers["x-onecard-model"] == MODEL


def test_tokenizer_info_answers_as_the_engine(gateway: GatewayProcess) -> None:
    via = httpx.get(gateway.url + "/tokenizer_info", params={"model": "candidate"}, timeout=60)
    direct = httpx.get(engine_url(gateway) + "/tokenizer_info", timeout=60)
    assert via.status_code == direct.status_code == 200
    assert via.content == direct.content and "eos_token" in via.json()


def test_response_retrieve_goes_to_its_engine(gateway: GatewayProcess) -> None:
    made = httpx.post(
        gateway.url + "/v1/responses", json={"model": "candidate", "input": "Hi", "max_output_tokens": 2}, timeout=300
    ).json()
    via = httpx.get(f"{gateway.url}/v1/responses/{made['id']}", timeout=60)
    direct = httpx.get(f"{engine_url(gateway)}/v1/responses/{made['id']}", timeout=60)
    # Without VLLM_ENABLE_RESPONSES_API_STORE=1 the engine keeps no responses: its own 404, relayed as is.
    assert (via.status_code, via.content) == (direct.status_code, direct.content)
    assert via.headers["x-onecard-model"] == MODEL


# -- real clients ------------------------------------------------------------------------------------


def test_openai_sdk_responses_streamed_and_not(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.responses.create(model="candidate", input="Write a line", max_output_tokens=6, temperature=0)
    assert r.model == MODEL and r.output_text and r.usage is not None and r.usage.output_tokens == 6
    events = list(
        client.responses.create(
            model="candidate", input="Write a line", max_output_tokens=6, temperature=0, stream=True
        )
    )
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == r.output_text


def test_anthropic_sdk_messages_streamed_and_not(gateway: GatewayProcess) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300)
    greedy = {"temperature": 0}  # this SDK version takes no temperature argument; vLLM reads it from the body
    m = client.messages.create(
        model="candidate", max_tokens=6, extra_body=greedy, messages=[{"role": "user", "content": "Write a line"}]
    )
    assert m.model == MODEL and m.stop_reason == "max_tokens" and m.usage.output_tokens == 6
    text = "".join(block.text for block in m.content if block.type == "text")
    assert text
    with client.messages.stream(
        model="candidate", max_tokens=6, extra_body=greedy, messages=[{"role": "user", "content": "Write a line"}]
    ) as stream:
        streamed = stream.get_final_text()
    assert streamed == text
    count = client.messages.count_tokens(model="candidate", messages=[{"role": "user", "content": "Write a line"}])
    assert count.input_tokens > 0
