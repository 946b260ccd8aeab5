"""vLLM's other model routes through the gateway, in front of stand-in engines: routed by the model they
name (body, form field or query), only ``model`` rewritten, answers as the engine gave them, counted in
the metrics, and responses retrieved from the engine that created them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.vllm_routes import NOT_RELAYED, RELAYED, ResponseOwners, form_model
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(180)

#: Fields that differ per request: ids and clocks.
_VOLATILE = re.compile(rb'"(id|item_id|created|created_at)":("[^"]*"|\d+)')


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp: Path = tmp_path_factory.mktemp("routes")
    models = [standin_model("alpha", aliases=["candidate"]), standin_model("beta", aliases=["judge"])]
    reg = write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=2.5)
    with running_gateway(reg, tmp / "run") as server:
        yield server


def engine_url(gw: ServerThread, model: str) -> str:
    return gw.gw.pool.owner.engines[model].base_url


def last_request(gw: ServerThread, model: str) -> dict[str, Any]:
    seen: dict[str, Any] = httpx.get(engine_url(gw, model) + "/standin/last_request").json()
    return seen


def blank(body: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":0', body)


def requests_counted(gw: ServerThread, model: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "onecard_requests_total" and s.labels.get("model") == model
    )


JSON_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/responses", {"input": "Hello there", "max_output_tokens": 4}),
    ("/v1/responses", {"input": "Hello there", "max_output_tokens": 3, "stream": True}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True}),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "Hello"}]}),
    (
        "/v1/chat/completions/batch",
        {"messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], "max_tokens": 2},
    ),
    ("/generative_scoring", {"query": "Is it?", "items": ["yes", "no"], "label_token_ids": [5, 6]}),
    ("/score", {"text_1": "a", "text_2": ["b", "c"]}),
    ("/v1/score", {"text_1": "a", "text_2": "b"}),
    ("/rerank", {"query": "q", "documents": ["x", "yy"]}),
    ("/v1/rerank", {"query": "q", "documents": ["x", "yy"]}),
    ("/v2/rerank", {"query": "q", "documents": ["x", "yy"]}),
    ("/pooling", {"input": ["a", "b"]}),
    ("/classify", {"input": "a"}),
    ("/v2/embed", {"texts": ["a"]}),
    ("/cohere/v2/chat", {"messages": [{"role": "user", "content": "a"}]}),
    ("/v1/systemone", {"prompt": "a"}),
]


@pytest.mark.parametrize(
    ("path", "body"), JSON_CASES, ids=[f"{p}{'-stream' if b.get('stream') else ''}" for p, b in JSON_CASES]
)
def test_json_route_relayed_by_alias(gateway: ServerThread, path: str, body: dict[str, Any]) -> None:
    before = requests_counted(gateway, "beta")
    via = httpx.post(gateway.url + path, json={"model": "judge", **body}, timeout=60)
    assert via.status_code == 200, via.text
    assert via.headers["x-onecard-model"] == "beta"
    seen = last_request(gateway, "beta")
    assert seen["path"] == path and seen["body"] == {"model": "beta", **body}  # only the model was rewritten
    direct = httpx.post(engine_url(gateway, "beta") + path, json={"model": "beta", **body}, timeout=60)
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert blank(via.content) == blank(direct.content)
    assert requests_counted(gateway, "beta") == before + 1


def test_unknown_model_and_missing_model_are_openai_errors(gateway: ServerThread) -> None:
    r = httpx.post(gateway.url + "/v1/rerank", json={"model": "nope", "query": "q", "documents": []})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "alpha" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/v1/messages", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_responses_are_retrieved_from_the_engine_that_made_them(gateway: ServerThread) -> None:
    made = {}
    for alias in ("candidate", "judge"):
        r = httpx.post(
            gateway.url + "/v1/responses", json={"model": alias, "input": "Hi", "max_output_tokens": 2}, timeout=60
        )
        assert r.status_code == 200, r.text
        made[alias] = r.json()
    stream = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "alpha", "input": "Hi", "max_output_tokens": 2, "stream": True},
        timeout=60,
    )
    streamed_id = re.search(r'"id":"(resp_[^"]+)"', stream.text)
    assert streamed_id
    for alias, model in (("candidate", "alpha"), ("judge", "beta")):
        rid = made[alias]["id"]
        got = httpx.get(f"{gateway.url}/v1/responses/{rid}", timeout=60)
        assert got.status_code == 200 and got.json() == made[alias]
        assert got.headers["x-onecard-model"] == model
        cancel = httpx.post(f"{gateway.url}/v1/responses/{rid}/cancel", timeout=60)
        direct = httpx.post(f"{engine_url(gateway, model)}/v1/responses/{rid}/cancel", timeout=60)
        assert (cancel.status_code, cancel.content) == (direct.status_code, direct.content)
    got = httpx.get(f"{gateway.url}/v1/responses/{streamed_id.group(1)}", timeout=60)
    assert got.status_code == 200 and got.headers["x-onecard-model"] == "alpha"
    unknown = httpx.get(gateway.url + "/v1/responses/resp_never", timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "response_not_found"


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_audio_form_routed_by_its_model_field(gateway: ServerThread, path: str) -> None:
    files = {"file": ("a.wav", b"RIFF" + bytes(range(256)) * 200, "audio/wav")}
    via = httpx.post(gateway.url + path, data={"model": "candidate", "language": "en"}, files=files, timeout=60)
    assert via.status_code == 200, via.text
    assert via.headers["x-onecard-model"] == "alpha"
    direct = httpx.post(
        engine_url(gateway, "alpha") + path, data={"model": "alpha", "language": "en"}, files=files, timeout=60
    )
    assert via.content == direct.content
    missing = httpx.post(gateway.url + path, data={"language": "en"}, files=files, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_tokenizer_info_by_query(gateway: ServerThread) -> None:
    via = httpx.get(gateway.url + "/tokenizer_info", params={"model": "judge"}, timeout=60)
    assert via.status_code == 200 and via.headers["x-onecard-model"] == "beta"
    assert via.content == httpx.get(engine_url(gateway, "beta") + "/tokenizer_info").content
    missing = httpx.get(gateway.url + "/tokenizer_info", timeout=60)
    assert missing.status_code == 400 and "?model=" in missing.json()["error"]["message"]


def test_form_model_is_found_and_replaced_in_place() -> None:
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"model": "candidate", "temperature": "0"},
        files={"file": ("a.wav", b"\r\n--not-a-boundary\r\n", "audio/wav")},
    )
    body = request.read()
    found = form_model(body, request.headers["content-type"])
    assert found is not None and found[0] == "candidate"
    assert body[found[1] : found[2]] == b"candidate"
    assert form_model(body, "multipart/form-data") is None
    assert (
        form_model(
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n', "multipart/form-data; boundary=b"
        )
        is None
    )


def test_response_owners_are_bounded() -> None:
    owners = ResponseOwners(limit=2)
    watch = owners.watcher("alpha")
    watch(b'event: response.created\ndata: {"response":{"id":"resp_')  # the id split across two reads
    assert owners.owner("resp_1") is None
    watch(b'1","x":1}')
    assert owners.owner("resp_1") == "alpha"
    owners.remember("resp_2", "beta")
    owners.remember("resp_3", "beta")
    assert owners.owner("resp_1") is None and owners.owner("resp_2") == "beta"


def test_not_relayed_paths_say_why_and_are_not_relayed() -> None:
    assert set(NOT_RELAYED).isdisjoint(RELAYED)
    assert all(len(reason) > 20 for reason in NOT_RELAYED.values())
