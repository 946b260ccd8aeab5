"""The vLLM stand-in engine, run as a real subprocess and exercised over HTTP (httpx and the openai SDK)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import standin_engine as se
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    logdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return (self.logdir / "stdout").read_text() + (self.logdir / "stderr").read_text()

    def stderr(self) -> str:
        return (self.logdir / "stderr").read_text()

    def wait_ready(self, timeout: float = 10.0) -> float:
        """Seconds until /health answers 200; fails with the log if the process dies first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"engine exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                time.sleep(0.02)
        pytest.fail(f"engine not ready after {timeout} s:\n{self.logs()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def launch(logdir: Path, *flags: str, env: dict[str, str] | None = None, model: str = "org/base-model") -> Engine:
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "VLLM_"))}
    command = [sys.executable, "-m", "tests.fakes.standin_engine", "serve", model,
               "--host", "127.0.0.1", "--port", str(port), *flags]
    with (logdir / "stdout").open("wb") as out, (logdir / "stderr").open("wb") as err:
        proc = subprocess.Popen(command, cwd=REPO, env={**clean, **(env or {})}, stdout=out, stderr=err,
                                start_new_session=True)
    return Engine(proc, port, logdir)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.kill()


def make_adapter(path: Path, rank: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(orjson.dumps({"r": rank, "target_modules": ["q_proj"]}))
    return path


@pytest.fixture(scope="module")
def main_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    tmp = tmp_path_factory.mktemp("standin")
    static = make_adapter(tmp / "static-adapter")
    engine = launch(
        tmp / "logs",
        "--served-model-name", "base", "alias", "--max-model-len", "512", "--enable-lora",
        "--max-lora-rank", "8", "--lora-modules", f"static={static}", "--enable-sleep-mode",
        "--dtype", "float16", "--gpu-memory-utilization", "0.3", "--enforce-eager",
        env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    engine.wait_ready()
    yield engine
    engine.proc.send_signal(signal.SIGTERM)
    try:
        assert engine.proc.wait(5) is not None
    finally:
        engine.kill()


@pytest.fixture
def client(main_engine: Engine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=main_engine.url, timeout=10) as http:
        yield http


def sse_events(body: str) -> list[str]:
    """The data of each SSE event; asserts vLLM's framing (``data: ...`` then a blank line)."""
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body
    return [e.removeprefix("data: ") for e in events]


def chunks(body: str) -> list[dict[str, Any]]:
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


# -- pure helpers ------------------------------------------------------------------------------------


def test_command_line_like_vllm_serve() -> None:
    args = se.parse_args([
        "serve", "/models/llama", "--dtype", "float32", "--port", "9001", "--served-model-name", "a", "b",
        "--max-model-len", "4K", "--enforce-eager", "--enable-lora", "--lora-modules", "x=/a/x",
        '{"name": "y", "path": "/a/y", "base_model_name": "a"}', "--kv-cache-memory-bytes", "64M",
    ])
    assert args.model == "/models/llama"
    assert (args.port, args.names, args.max_model_len, args.enable_lora) == (9001, ("a", "b"), 4096, True)
    assert args.lora_modules == (se.LoraModule("x", "/a/x"), se.LoraModule("y", "/a/y", "a"))
    assert args.ignored == ("--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "64M")
    assert se.parse_args(["serve", "m", "--max-model-len", "4k"]).names == ("m",)
    assert se.parse_args(["serve", "m", "--max-model-len", "4k"]).max_model_len == 4000


def test_tokenizer_rule() -> None:
    text = "Hello, wörld!\n"
    ids = se.encode(text)
    assert [se.token_text(i) for i in ids] == ["Hell", "o, w", "ö", "rld!", "\n"]
    assert se.decode(ids) == text
    assert all(0 <= i < 2**31 for i in ids)
    assert len(se.encode("x" * 41)) == 11
    with pytest.raises(ValueError, match="out of vocabulary"):
        se.token_text(-1)


# -- endpoints ---------------------------------------------------------------------------------------


def test_health_version_models(client: httpx.Client, main_engine: Engine) -> None:
    health = client.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert client.get("/ping").status_code == 200
    assert client.get("/version").json() == {"version": "0.32.0"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {card["id"]: card for card in models["data"]}
    assert list(cards) == ["base", "alias", "static"]
    assert cards["base"]["root"] == "org/base-model" and cards["base"]["max_model_len"] == 512
    assert cards["base"]["parent"] is None and cards["base"]["owned_by"] == "vllm"
    assert cards["static"]["parent"] == "base" and cards["static"]["root"].endswith("static-adapter")
    assert cards["static"]["permission"][0]["object"] == "model_permission"
    out = main_engine.logs()
    assert f"Starting vLLM API server 0 on http://127.0.0.1:{main_engine.port}" in out
    assert "ignored flags: --dtype float16 --gpu-memory-utilization 0.3 --enforce-eager" in out


def test_chat_completion_shape_and_determinism(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json={"model": "alias", "messages": MESSAGES, "max_tokens": 5},
                        headers={"X-Request-Id": "req-42"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "prompt_logprobs", "prompt_token_ids", "kv_transfer_params"]
    assert (body["id"], body["object"], body["model"]) == ("chatcmpl-req-42", "chat.completion", "base")
    seen = client.get("/standin/last_request").json()
    assert seen["path"] == "/v1/chat/completions" and seen["headers"]["x-request-id"] == "req-42"
    assert seen["body"] == {"model": "alias", "messages": MESSAGES, "max_tokens": 5}
    (choice,) = body["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = se.render_chat(MESSAGES)
    assert choice["message"]["content"] == se.expected_text("base", prompt, 5)
    assert body["usage"] == {"prompt_tokens": len(se.encode(prompt)), "total_tokens": len(se.encode(prompt)) + 5,
                             "completion_tokens": 5, "prompt_tokens_details": None}
    again = client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES, "max_tokens": 5})
    assert again.json()["choices"][0]["message"]["content"] == choice["message"]["content"]
    default = client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES}).json()
    assert default["usage"]["completion_tokens"] == 16 and default["choices"][0]["finish_reason"] == "stop"
    two = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "n": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] == 6
    assert two["choices"][0]["message"]["content"] != two["choices"][1]["message"]["content"]


def test_chat_stream_chunks_match_vllm(client: httpx.Client) -> None:
    request = {"model": "base", "messages": MESSAGES, "max_tokens": 4, "stream": True,
               "stream_options": {"include_usage": True}}
    reply = client.post("/v1/chat/completions", json=request)
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = chunks(reply.text)
    first, *tokens, final, usage = events
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert list(first) == ["id", "object", "created", "model", "choices", "prompt_token_ids"]
    assert len(tokens) == 3 and all(
        list(t["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "token_ids"] for t in tokens)
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["stop_reason"] is None
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    # With include_usage the fingerprint rides on the usage chunk, not the terminal one
    # (vllm/entrypoints/openai/chat_completion/serving.py, chat_completion_stream_generator).
    assert list(usage) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert "system_fingerprint" not in final and usage["system_fingerprint"].startswith("vllm-0.32.0-")
    assert len({e["id"] for e in events}) == 1 and {e["object"] for e in events} == {"chat.completion.chunk"}
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    assert text == se.expected_text("base", se.render_chat(MESSAGES), 4)
    plain = chunks(client.post("/v1/chat/completions", json={**request, "stream_options": None, "n": 2}).text)
    assert [e["choices"][0]["index"] for e in plain] == [0, 1] + [0, 1] * 4
    assert [list(e)[-1] for e in plain[-2:]] == ["system_fingerprint"] * 2  # each terminal chunk, no usage
    # StreamOptions.include_usage defaults to False (vllm/entrypoints/generate/base/protocol.py).
    continuous = chunks(client.post("/v1/chat/completions", json={
        **request, "stream_options": {"continuous_usage_stats": True}}).text)
    assert all("usage" not in e for e in continuous)
    logprobs = chunks(client.post("/v1/chat/completions", json={
        **request, "logprobs": True, "top_logprobs": 2,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).text)
    entry = logprobs[1]["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == logprobs[1]["choices"][0]["delta"]["content"]
    assert entry["top_logprobs"][0]["token"] == entry["token"] and len(entry["top_logprobs"]) == 2
    assert logprobs[2]["usage"]["completion_tokens"] == 2


def test_completion_prompt_forms(client: httpx.Client) -> None:
    def complete(**fields: Any) -> dict[str, Any]:
        reply = client.post("/v1/completions", json={"model": "base", "max_tokens": 3, **fields})
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    one = complete(prompt="The capital of France is")
    assert one["object"] == "text_completion" and one["id"].startswith("cmpl-")
    assert one["choices"][0]["text"] == se.expected_text("base", "The capital of France is", 3)
    assert one["usage"]["prompt_tokens"] == len(se.encode("The capital of France is"))
    ids = se.encode("The capital of France is")
    assert complete(prompt=ids)["choices"][0]["text"] == one["choices"][0]["text"]
    many = complete(prompt=["one", "two words"], n=2)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"] == {"prompt_tokens": 1 + 3, "total_tokens": 4 + 12, "completion_tokens": 12,
                             "prompt_tokens_details": None}
    lists = complete(prompt=[se.encode("one"), se.encode("two words")])
    assert [c["text"] for c in lists["choices"]] == [many["choices"][0]["text"], many["choices"][2]["text"]]


def test_completion_echo_logprobs_for_loglikelihood(client: httpx.Client) -> None:
    prompt = "Question: 2+2? Answer: 4"
    n_prompt = len(se.encode(prompt))
    body = client.post("/v1/completions", json={
        "model": "base", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    (choice,) = body["choices"]
    assert choice["text"] == prompt and body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert list(logprobs) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    assert "".join(logprobs["tokens"]) == prompt and len(logprobs["tokens"]) == n_prompt
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) and lp < 0 for lp in logprobs["token_logprobs"][1:])
    for token, lp, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:],
                              strict=True):
        assert top[token] == lp == max(top.values())
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(n_prompt)]
    generated = client.post("/v1/completions", json={
        "model": "base", "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0}).json()["choices"][0]
    assert generated["text"] == prompt + se.expected_text("base", prompt, 2)
    assert len(generated["logprobs"]["tokens"]) == n_prompt + 2
    streamed = chunks(client.post("/v1/completions", json={
        "model": "base", "prompt": prompt, "max_tokens": 0, "echo": True, "stream": True}).text)
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in streamed] == [(prompt, "length")]
    stream = chunks(client.post("/v1/completions", json={
        "model": "base", "prompt": prompt, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}}).text)
    assert list(stream[0]["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                             "prompt_token_ids", "token_ids"]
    assert "".join(c["choices"][0]["text"] for c in stream[:-1]) == se.expected_text("base", prompt, 3)
    assert stream[-1]["choices"] == [] and stream[-1]["usage"]["total_tokens"] == n_prompt + 3


def test_embeddings_tokenize_detokenize(client: httpx.Client) -> None:
    floats = client.post("/v1/embeddings", json={"model": "base", "input": ["a b", "c"]}).json()
    assert floats["object"] == "list" and [d["index"] for d in floats["data"]] == [0, 1]
    vector = floats["data"][0]["embedding"]
    assert len(vector) == se.EMBEDDING_DIM and abs(sum(v * v for v in vector) - 1) < 1e-9
    packed = client.post("/v1/embeddings", json={"input": "a b", "encoding_format": "base64"}).json()
    decoded = struct.unpack(f"<{se.EMBEDDING_DIM}f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)
    tokens = client.post("/tokenize", json={"model": "base", "prompt": "héllo", "return_token_strs": True}).json()
    assert tokens == {"count": 3, "max_model_len": 512, "tokens": se.encode("héllo"),
                      "token_strs": ["h", "é", "llo"]}
    chat = client.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == len(se.encode(se.render_chat(MESSAGES)))
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "héllo"}
    assert client.post("/detokenize", json={"tokens": [-5]}).status_code == 400


def test_errors_like_vllm(client: httpx.Client) -> None:
    unknown = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError",
                                        "param": "model", "code": 404}}
    too_long = client.post("/v1/completions", json={"model": "base", "prompt": "x" * 4000})
    assert too_long.status_code == 400 and "maximum context length is 512" in too_long.json()["error"]["message"]
    too_many = client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 600})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/chat/completions", json={"model": "base"}).json()["error"]["code"] == 400
    options = client.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert options.status_code == 400
    assert client.get("/v1/nothing").json() == {"detail": "Not Found"}
    assert client.get("/v1/completions").status_code == 405


def test_openai_sdk(main_engine: Engine) -> None:
    sdk = openai.OpenAI(base_url=f"{main_engine.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in sdk.models.list()][:2] == ["base", "alias"]
    chat = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=3)
    assert chat.choices[0].message.content == se.expected_text("base", se.render_chat(MESSAGES), 3)
    stream = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=3, stream=True,
                                         stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3
    completion = sdk.completions.create(model="static", prompt="abc", max_tokens=2, echo=True, logprobs=1)
    assert completion.model == "static" and completion.choices[0].text.startswith("abc")
    assert completion.choices[0].logprobs is not None and completion.choices[0].logprobs.token_logprobs
    assert completion.choices[0].logprobs.token_logprobs[0] is None
    embedding = sdk.embeddings.create(model="alias", input="hello")
    assert len(embedding.data[0].embedding) == se.EMBEDDING_DIM
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="missing", prompt="x")


def test_runtime_lora(client: httpx.Client, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "domain")
    load = client.post("/v1/load_lora_adapter", json={"lora_name": "domain", "lora_path": str(adapter)})
    assert (load.status_code, load.text) == (200, "Success: LoRA adapter 'domain' added successfully.")
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "domain", "lora_path": str(adapter)})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(tmp_path / "x")})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == f"Loading lora gone failed: No adapter found for {tmp_path / 'x'}"
    wide = make_adapter(tmp_path / "wide", rank=16)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(wide)}).status_code == 500
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["domain"]["parent"] == "base" and cards["domain"]["root"] == str(adapter)
    request = {"prompt": "Tell me", "max_tokens": 4}
    tuned = client.post("/v1/completions", json={**request, "model": "domain"}).json()
    base = client.post("/v1/completions", json={**request, "model": "base"}).json()
    assert tuned["model"] == "domain" and tuned["choices"][0]["text"] != base["choices"][0]["text"]
    unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "domain"})
    assert (unload.status_code, unload.text) == (200, "Success: LoRA adapter 'domain' removed successfully.")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "domain"}).status_code == 404
    assert client.post("/v1/completions", json={**request, "model": "domain"}).status_code == 404


async def test_sleep_holds_requests_until_wake(main_engine: Engine) -> None:
    async with httpx.AsyncClient(base_url=main_engine.url, timeout=10) as http:
        assert (await http.post("/sleep", params={"level": 2})).status_code == 200
        assert (await http.get("/is_sleeping")).json() == {"is_sleeping": True}
        pending = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
        await asyncio.sleep(0.3)
        assert not pending.done()
        stats = (await http.get("/standin/stats")).json()
        assert stats["waiting"] == 1 and stats["sleeping"] and stats["sleep_level"] == 2
        metrics = (await http.get("/metrics")).text
        assert 'vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="discard_all"} 1.0' in metrics
        assert 'vllm:num_requests_waiting{engine="0",model_name="base"} 1.0' in metrics
        assert (await http.post("/wake_up")).status_code == 200
        assert (await pending).status_code == 200
        assert (await http.get("/is_sleeping")).json() == {"is_sleeping": False}


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    def scrape() -> dict[str, float]:
        reply = client.get("/metrics")
        assert reply.headers["content-type"].startswith("text/plain")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                assert sample.labels["model_name"] == "base" and sample.labels["engine"] == "0"
                key = sample.name + (f"[{sample.labels['sleep_state']}]" if "sleep_state" in sample.labels else "")
                if "le" not in sample.labels and "finished_reason" not in sample.labels:
                    values[key] = sample.value
        return values

    before = scrape()
    client.post("/v1/completions", json={"prompt": "abcd efgh", "max_tokens": 7})
    after = scrape()
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 7
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 3
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    assert after["vllm:engine_sleep_state[awake]"] == 1.0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in after


# -- knobs -------------------------------------------------------------------------------------------


def test_slow_engine_knobs_and_cancellation(engines: list[Engine], tmp_path: Path) -> None:
    engine = launch(tmp_path, env={
        "STANDIN_START_DELAY": "0.6", "STANDIN_SLOW_HEALTH": "0.2", "STANDIN_TOKEN_DELAY": "0.05",
        "STANDIN_FIRST_TOKEN_DELAY": "0.1", "STANDIN_WAKE_DELAY": "0.3", "STANDIN_FAIL_WAKE": "wake exploded",
        "STANDIN_IGNORE_SIGTERM": "1", "VLLM_SERVER_DEV_MODE": "1"})
    engines.append(engine)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{engine.url}/health")
    assert engine.wait_ready() > 0.2
    with httpx.Client(base_url=engine.url, timeout=10) as http:
        start = time.monotonic()
        assert http.get("/health").status_code == 200 and time.monotonic() - start >= 0.2
        start = time.monotonic()
        body = {"model": "org/base-model", "prompt": "x", "max_tokens": 40, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line)
            assert time.monotonic() - start >= 0.1 and first.startswith("data: ")
            next(line for line in lines if line)
        deadline = time.monotonic() + 3
        while (stats := http.get("/standin/stats").json())["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats["cancelled"] == 1 and stats["in_flight"] == 0 and stats["completed"] == 0
        assert http.post("/sleep").status_code == 200
        start = time.monotonic()
        wake = http.post("/wake_up")
        assert wake.status_code == 500 and wake.json()["error"]["message"] == "wake exploded"
        assert time.monotonic() - start >= 0.3 and http.get("/is_sleeping").json() == {"is_sleeping": True}
    engine.proc.send_signal(signal.SIGTERM)
    time.sleep(0.4)
    assert engine.proc.poll() is None


def test_crash_after_tokens(engines: list[Engine], tmp_path: Path) -> None:
    engine = launch(tmp_path, env={"STANDIN_CRASH_AFTER_TOKENS": "3"})
    engines.append(engine)
    engine.wait_ready()
    with httpx.Client(base_url=engine.url, timeout=5) as http:
        assert http.post("/sleep").status_code == 404  # no VLLM_SERVER_DEV_MODE, no sleep routes
        assert http.post("/v1/load_lora_adapter", json={}).status_code == 404
        assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
        received: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError), http.stream(
                "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True}) as stream:
            received.extend(line for line in stream.iter_lines() if line)
    assert len(received) == 3
    assert engine.proc.wait(5) == 1
    assert "EngineCore encountered a fatal error" in engine.stderr()


def test_die_in_batch(engines: list[Engine], tmp_path: Path) -> None:
    """A full batch kills the "EngineCore": every request in it gets vLLM's 500, the log names the
    RuntimeError, the process exits 0; a smaller batch before it was served."""
    engine = launch(tmp_path, env={"STANDIN_DIE_IN_BATCH": "3", "STANDIN_FIRST_TOKEN_DELAY": "0.3"})
    engines.append(engine)
    engine.wait_ready()

    async def batch(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=engine.url, timeout=10) as http:
            return list(await asyncio.gather(*(
                http.post("/v1/completions", json={"prompt": f"q{i}", "max_tokens": 1, "echo": True, "logprobs": 1})
                for i in range(n))))

    assert [r.status_code for r in asyncio.run(batch(2))] == [200, 200]
    answers = asyncio.run(batch(3))
    assert [r.status_code for r in answers] == [500] * 3
    assert all(r.json()["error"] == {"message": se.ENGINE_DEAD_MESSAGE, "type": "InternalServerError",
                                     "param": None, "code": 500} for r in answers)
    assert engine.proc.wait(5) == 0
    log = engine.stderr().splitlines()
    cause = next(i for i, line in enumerate(log) if "RuntimeError: einsum(): subscript b has size 3" in line)
    assert len(log) - cause > 200  # the cause scrolls far up, as in the real log
    with pytest.raises(ValueError, match="STANDIN_DIE_IN_BATCH must be an integer >= 1"):
        se.Knobs.from_env({"STANDIN_DIE_IN_BATCH": "0"})


def test_start_failures(engines: list[Engine], tmp_path: Path) -> None:
    failing = [
        launch(tmp_path / "fail", env={"STANDIN_FAIL_START": "ValueError: no kernel image for sm_89"}),
        launch(tmp_path / "oom", env={"STANDIN_OOM": "1"}),
        launch(tmp_path / "lora", "--enable-lora", "--lora-modules", f"bad={tmp_path / 'absent'}"),
    ]
    engines.extend(failing)
    assert [engine.proc.wait(10) for engine in failing] == [1, 1, 1]
    assert "ERROR" in failing[0].stderr() and "ValueError: no kernel image for sm_89" in failing[0].stderr()
    assert "torch.OutOfMemoryError: CUDA out of memory." in failing[1].stderr()
    assert "Loading lora bad failed: No adapter found for" in failing[2].stderr()
    assert all("Starting vLLM API server" not in engine.logs() for engine in failing)


def test_hang_ignores_sigterm_and_health(engines: list[Engine], tmp_path: Path) -> None:
    engine = launch(tmp_path, env={"STANDIN_HANG": "0.3"})
    engines.append(engine)
    engine.wait_ready()
    time.sleep(0.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{engine.url}/health", timeout=0.5)
    engine.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert engine.proc.poll() is None
    engine.proc.kill()
    assert engine.proc.wait(5) == -signal.SIGKILL


def test_sigterm_stops_promptly(engines: list[Engine], tmp_path: Path) -> None:
    engine = launch(tmp_path, "--served-model-name", "quick")
    engines.append(engine)
    engine.wait_ready()
    start = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    engine.proc.wait(5)
    assert time.monotonic() - start < 2.5
