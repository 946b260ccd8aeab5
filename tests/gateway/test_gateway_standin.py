"""The gateway over a real socket, with real clients, in front of stand-in engine processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[ServerThread]:
    adapter = tmp_path / "adapters" / "a-lora"
    adapter.mkdir(parents=True)
    models = [
        standin_model("alpha", aliases=["candidate"],
                      lora={"enabled": True, "max_rank": 8, "adapters": {"alpha-lora": {"path": str(adapter)}}}),
        standin_model("beta", aliases=["judge"]),
        standin_model("broken", env={"STANDIN_FAIL_START": "ValueError: bad flag --frobnicate"}),
    ]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=1.5,
                         scheduler={"max_wait_s": 30, "max_queue": 64, "keepalive_s": 0.5})
    with running_gateway(reg, tmp_path / "run", max_body_bytes=1_000_000) as server:
        yield server


def oai(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_lists_models_aliases_and_adapters(gateway: ServerThread) -> None:
    ids = {m.id for m in oai(gateway).models.list()}
    assert {"alpha", "beta", "candidate", "judge", "alpha-lora", "broken"} <= ids
    data = httpx.get(gateway.url + "/v1/models").json()["data"]
    alpha = next(m for m in data if m["id"] == "alpha")
    assert alpha["onecard"]["state"] == "stopped" and alpha["onecard"]["footprint_gib"] > 0
    lora = next(m for m in data if m["id"] == "alpha-lora")
    assert lora["parent"] == "alpha" and lora["onecard"]["kind"] == "adapter"


def test_chat_stream_and_not_by_alias_and_adapter(gateway: ServerThread) -> None:
    client = oai(gateway)
    r = client.chat.completions.create(model="candidate", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5)
    assert r.model == "alpha" and r.usage is not None and r.usage.completion_tokens == 5
    text = r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # The gateway asked the engine for usage; the client did not, so it sees no usage chunk.
    assert all(c.usage is None for c in chunks)
    withusage = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert withusage[-1].usage is not None and withusage[-1].usage.completion_tokens == 5
    lora = client.chat.completions.create(model="alpha-lora", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5)
    assert lora.model == "alpha-lora" and lora.choices[0].message.content != text


def test_unknown_fields_pass_through_and_model_is_rewritten(gateway: ServerThread) -> None:
    body = {"model": "candidate", "prompt": "x", "max_tokens": 2, "frobnicate": {"deep": [1, 2.5, None]},
            "top_k": 3}
    r = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    engine = gateway.gw.pool.owner.engines["alpha"]
    seen = httpx.get(f"{engine.base_url}/standin/last_request").json()["body"]
    assert seen == {**body, "model": "alpha"}
    assert r.headers["x-onecard-model"] == "alpha"


def test_completions_echo_logprobs_and_token_ids(gateway: ServerThread) -> None:
    client = oai(gateway)
    r = client.completions.create(model="alpha", prompt="The cat sat", echo=True, logprobs=1, max_tokens=0)
    assert r.choices[0].text == "The cat sat"
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.token_logprobs[0] is None
    ids = client.completions.create(model="alpha", prompt=[[72, 101, 108]], max_tokens=2)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


def test_error_statuses(gateway: ServerThread) -> None:
    url = gateway.url
    r = httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "alpha" in err["message"] and err["param"] == "model"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "alpha", "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x" * 2_000_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user",
                                                                                        "content": "x"}]},
                   timeout=60)
    assert r.status_code == 502
    assert "ValueError: bad flag --frobnicate" in r.json()["error"]["message"]
    # Right after, the engine is in its backoff: 503 with Retry-After, the cause repeated.
    r = httpx.post(url + "/v1/chat/completions", json={"model": "broken", "messages": []}, timeout=60)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "bad flag" in r.json()["error"]["message"]
    r = httpx.get(url + "/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_gives_503_with_retry_after(tmp_path: Path) -> None:
    models = [standin_model("slow", env={"STANDIN_START_DELAY": "3"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path),
                         scheduler={"max_wait_s": 30, "max_queue": 2, "keepalive_s": 5})

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": "slow", "prompt": "x", "max_tokens": 1}
            return list(await asyncio.gather(*(c.post(url + "/v1/completions", json=body) for _ in range(5))))

    with running_gateway(reg, tmp_path / "run") as server:
        results = asyncio.run(burst(server.url))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 503, 503, 503]
    refused = next(r for r in results if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "waiting" in refused.json()["error"]["message"]


def test_alternating_models_that_cannot_coreside(gateway: ServerThread) -> None:
    client = oai(gateway)
    answers: dict[str, set[str]] = {}
    for i in range(6):
        model = "alpha" if i % 2 == 0 else "beta"
        r = client.completions.create(model=model, prompt="same prompt", max_tokens=4)
        answers.setdefault(model, set()).add(r.choices[0].text)
        states = {e["model"]: e["state"] for e in httpx.get(gateway.url + "/admin/engines").json()["engines"]}
        assert states[model] == "ready"
        assert sum(s == "ready" for s in states.values()) == 1
    assert all(len(v) == 1 for v in answers.values()) and answers["alpha"] != answers["beta"]
    kinds = [s["kind"] for s in httpx.get(gateway.url + "/admin/swaps").json()["swaps"]]
    assert kinds[0] == "co_load" and kinds[1:] == ["cold"] * 5


def test_hundred_concurrent_streams_complete_intact(gateway: ServerThread) -> None:
    async def one(c: httpx.AsyncClient, i: int) -> str:
        body = {"model": "alpha", "prompt": f"p{i}", "max_tokens": 20, "stream": True}
        async with c.stream("POST", gateway.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            return (await r.aread()).decode()

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as c:
            return list(await asyncio.gather(*(one(c, i) for i in range(100))))

    httpx.post(gateway.url + "/admin/engines/alpha/load", timeout=60)
    for i, text in enumerate(asyncio.run(main())):
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert sum(len(c["choices"]) for c in chunks) == 20, i
        assert all(c["choices"] for c in chunks)  # the gateway's own usage chunk was hidden


def test_client_disconnect_cancels_upstream(tmp_path: Path) -> None:
    models = [standin_model("slowgen", env={"STANDIN_TOKEN_DELAY": "0.05"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path))
    with running_gateway(reg, tmp_path / "run") as server:
        body = {"model": "slowgen", "prompt": "x", "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_raw()):
                if n >= 3:
                    break
        engine = server.gw.pool.owner.engines["slowgen"]
        deadline = time.monotonic() + 10
        stats = {}
        while time.monotonic() < deadline:
            stats = httpx.get(f"{engine.base_url}/standin/stats").json()
            if stats["cancelled"] >= 1:
                break
            time.sleep(0.1)
        assert stats["cancelled"] == 1 and stats["in_flight"] == 0
        assert engine.in_flight == 0


def test_waiting_stream_gets_keepalives(tmp_path: Path) -> None:
    models = [standin_model("late", env={"STANDIN_START_DELAY": "2"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path),
                         scheduler={"keepalive_s": 0.5})
    with running_gateway(reg, tmp_path / "run") as server:
        body = {"model": "late", "prompt": "x", "max_tokens": 3, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
            text = r.read().decode()
    assert text.startswith(": waiting for model late")
    assert text.rstrip().endswith("data: [DONE]")
    assert text.count('"text"') == 3
