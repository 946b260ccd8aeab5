"""End to end with real CPU vLLM engines behind ``onecard serve``, driven by the official openai SDK.

One gateway serves the whole module (engine starts are the cost); tests run in file order and the last
one kills the gateway with -9 and checks that the next gateway leaves no vLLM process alive.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.real.conftest import RealVllm, vllm_processes
from tests.support import GatewayProcess

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def gateway(demo_gateway: GatewayProcess) -> GatewayProcess:
    return demo_gateway


def sdk(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def engines(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    rows = httpx.get(gw.url + "/admin/engines", timeout=10).json()["engines"]
    return {r["model"]: r for r in rows}


def test_models_list_every_name(gateway: GatewayProcess) -> None:
    ids = {m.id for m in sdk(gateway).models.list()}
    assert ids == {"tiny-llama", "candidate", "tiny-llama-b", "judge", "tiny-llama-lora", "tiny-lora"}


def test_chat_streamed_and_not(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea."}]
    r = client.chat.completions.create(model="candidate", messages=messages, max_tokens=12, temperature=0)
    assert r.model == "tiny-llama" and r.usage is not None and r.usage.completion_tokens == 12
    text = r.choices[0].message.content
    assert text
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert all(c.usage is None for c in chunks)


def test_reproducibility_record(gateway: GatewayProcess) -> None:
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "candidate", "prompt": "x", "max_tokens": 1},
                   timeout=120)
    header = r.headers["x-onecard-provenance"]
    assert "vllm=0.32.0" in header and "revision=sha256:" in header
    card = next(m for m in httpx.get(gateway.url + "/v1/models").json()["data"] if m["id"] == "tiny-llama")
    info = card["onecard"]
    assert str(info["vllm_version"]).startswith("0.32.0")  # the engine's own /version
    assert info["revision"].startswith("sha256:") and len(info["files_sha256"]["config.json"]) == 64
    assert "--max-model-len" in info["engine_flags"] and "--port" not in info["engine_flags"]


def test_engines_schedule_by_priority_and_answer_requests_carrying_it(gateway: GatewayProcess) -> None:
    """Engines run vLLM's priority scheduling; a request's ``priority`` (the gateway's, or the client's
    sent to the engine directly) is taken, whatever its value."""
    r = httpx.post(gateway.url + "/v1/completions", timeout=120,
                   json={"model": "candidate", "prompt": "x", "max_tokens": 2, "priority": 7})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    card = next(m for m in httpx.get(gateway.url + "/v1/models").json()["data"] if m["id"] == "tiny-llama")
    flags = card["onecard"]["engine_flags"]
    assert flags[flags.index("--scheduling-policy") + 1] == "priority"
    port = engines(gateway)["tiny-llama"]["port"]
    for priority in (-10, 0, 10):
        direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "priority": priority})
        assert direct.status_code == 200, direct.text
        assert direct.json()["usage"]["completion_tokens"] == 3


def test_completions_echo_logprobs_equal_the_engines_own(gateway: GatewayProcess) -> None:
    body = {"model": "tiny-llama", "prompt": "The quick brown fox", "echo": True, "logprobs": 1, "max_tokens": 0}
    via = sdk(gateway).completions.create(**body)  # type: ignore[call-overload]
    assert via.choices[0].text == "The quick brown fox"
    port = engines(gateway)["tiny-llama"]["port"]
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
    assert via.choices[0].logprobs.token_logprobs == direct["choices"][0]["logprobs"]["token_logprobs"]
    assert via.choices[0].logprobs.tokens == direct["choices"][0]["logprobs"]["tokens"]
    assert via.choices[0].logprobs.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in via.choices[0].logprobs.token_logprobs[1:])


def test_token_id_prompts(gateway: GatewayProcess) -> None:
    tokens = httpx.post(gateway.url + "/tokenize", json={"model": "tiny-llama", "prompt": "Hello there"},
                        timeout=60).json()["tokens"]
    r = sdk(gateway).completions.create(model="candidate", prompt=tokens, max_tokens=3, temperature=0, echo=True,
                                        logprobs=1)
    assert r.usage is not None and r.usage.prompt_tokens == len(tokens)
    assert "Hello there" in r.choices[0].text  # the ids decode back (with the bos token)


def test_adapter_by_name_answers_differently(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    prompt = "Once upon a time"
    base = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
    lora = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=8, temperature=0)
    assert lora.model == "tiny-lora"
    assert lora.choices[0].text != base.choices[0].text
    assert "tiny-lora" in engines(gateway)["tiny-llama-lora"]["adapters"]  # loaded at runtime, on first use


def test_two_models_that_cannot_coreside_alternate(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    prompt = "Rain falls on"
    seen: dict[str, set[str]] = {}
    for model in ("judge", "candidate", "judge"):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        seen.setdefault(r.model, set()).add(r.choices[0].text)
        states = {m: row["state"] for m, row in engines(gateway).items()}
        assert list(states.values()).count("ready") == 1
    assert set(seen) == {"tiny-llama", "tiny-llama-b"}
    assert all(len(answers) == 1 for answers in seen.values())  # the same answer after a swap back
    swaps = httpx.get(gateway.url + "/admin/swaps", timeout=10).json()["swaps"]
    assert [s["kind"] for s in swaps[-3:]] == ["cold", "cold", "cold"]


def test_metrics_reexport_vllm_series_with_model_label(gateway: GatewayProcess) -> None:
    sdk(gateway).completions.create(model="judge", prompt="count", max_tokens=4)
    deadline = time.monotonic() + 30
    families: dict[str, list[dict[str, str]]] = {}
    while time.monotonic() < deadline:
        text = httpx.get(gateway.url + "/metrics", timeout=10).text
        families = {f.name: [s.labels for s in f.samples] for f in text_string_to_metric_families(text)}
        if any(n.startswith("vllm:") for n in families):
            break
        time.sleep(1)
    vllm_names = [n for n in families if n.startswith("vllm:")]
    assert vllm_names, "no vllm:* series re-exported"
    assert any(labels.get("model") == "tiny-llama-b" for n in vllm_names for labels in families[n])
    assert any(labels.get("model") == "tiny-llama-b" and labels.get("status") == "200"
               for labels in families["onecard_requests"])


def test_closed_judge_loop_stays_near_the_swap_floor(gateway: GatewayProcess) -> None:
    items, workers = 8, 4
    floor = 2 * -(-items // workers) - 1
    before = len(httpx.get(gateway.url + "/admin/swaps", timeout=10).json()["swaps"])

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=300)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(items):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                answer = await client.completions.create(model="candidate", prompt=f"Item {i}:", max_tokens=6)
                verdict = await client.completions.create(
                    model="judge", prompt=f"Grade: {answer.choices[0].text}", max_tokens=2)
                assert verdict.choices[0].text is not None

        await asyncio.gather(*(worker() for _ in range(workers)))

    asyncio.run(run())
    swaps = httpx.get(gateway.url + "/admin/swaps", timeout=10).json()["swaps"][before:]
    evicting = [s for s in swaps if s["evicted"]]
    assert len(evicting) <= floor + 2, [(s["model"], s["reason"]) for s in swaps]


def test_new_adapter_folder_is_served_by_name_within_10s(gateway: GatewayProcess, real_vllm: RealVllm) -> None:
    import shutil

    target = gateway.run_dir / "adapters" / "tuesday-lora"
    shutil.copytree(real_vllm.models.lora, gateway.run_dir / "adapters" / ".tmp-copy")
    t0 = time.monotonic()
    (gateway.run_dir / "adapters" / ".tmp-copy").rename(target)  # appears at once, complete
    client = sdk(gateway)
    while "tuesday-lora" not in {m.id for m in client.models.list()}:
        assert time.monotonic() - t0 < 10, "the new adapter was not listed within 10 s"
        time.sleep(0.2)
    prompt = "Once upon a time"
    tuned = client.completions.create(model="tuesday-lora", prompt=prompt, max_tokens=8, temperature=0)
    print(f"adapter listed and answered {time.monotonic() - t0:.1f} s after its folder appeared")
    base = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
    assert tuned.model == "tuesday-lora" and tuned.choices[0].text != base.choices[0].text


def test_kill9_of_gateway_then_next_start_leaves_no_vllm(gateway: GatewayProcess, tmp_path: Path) -> None:
    assert any(row["state"] == "ready" for row in engines(gateway).values())
    assert vllm_processes(), "expected a live engine before the kill"
    assert gateway.proc is not None
    gateway.proc.kill()
    gateway.proc.wait()
    assert vllm_processes(), "the engine outlives a gateway killed with -9 (its own session)"
    successor = GatewayProcess(gateway.registry, gateway.run_dir)
    successor.start()
    try:
        deadline = time.monotonic() + 30
        while vllm_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert vllm_processes() == []
        assert "leftover" in successor.log()
    finally:
        successor.stop()
    assert vllm_processes() == []
