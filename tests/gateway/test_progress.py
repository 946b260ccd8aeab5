"""Opt-in swap progress: with ``x-onecard-progress: 1`` a chat stream that waits for its model shows the
wait as reasoning chunks the openai SDK parses; without it, the stream is the engine's (SSE comments
only while waiting)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.progress import progress_event, wanted
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[ServerThread]:
    slow = {"STANDIN_START_DELAY": "1.5"}
    models = [standin_model("alpha", env=slow), standin_model("beta", env=slow)]
    reg = write_registry(
        tmp_path / "reg.yaml",
        models,
        executable=standin_executable(tmp_path),
        budget_gib=2.5,
        scheduler={"max_wait_s": 30, "max_queue": 64, "keepalive_s": 0.3},
    )
    with running_gateway(reg, tmp_path / "run") as server:
        yield server


def test_progress_is_reasoning_the_sdk_parses(gateway: ServerThread) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=60)
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            extra_headers={"x-onecard-progress": "1"},
        )
    )
    waits = [c for c in chunks if (c.choices[0].delta.model_extra or {}).get("reasoning_content")]
    assert waits, "no progress chunk while the engine started"
    assert all(c.object == "chat.completion.chunk" and c.model == "alpha" for c in waits)
    extra = waits[0].choices[0].delta.model_extra
    assert extra is not None and "Waiting for alpha" in extra["reasoning_content"]
    assert chunks[: len(waits)] == waits  # the progress comes first, then the engine's stream
    reply = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


def test_without_the_header_the_stream_is_the_engines(gateway: ServerThread) -> None:
    body = {"model": "beta", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    via = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60).content
    events = via.split(b"\n\n")
    assert any(ev.startswith(b": waiting for model beta") for ev in events)  # it did wait
    assert b"reasoning_content" not in via
    engine = gateway.gw.pool.owner.engines["beta"]
    direct = httpx.post(engine.base_url + "/v1/chat/completions", json=body, timeout=60).content
    relayed = b"".join(ev + b"\n\n" for ev in events if ev and not ev.startswith(b":"))
    assert _VOLATILE.sub(rb'"\1":0', relayed) == _VOLATILE.sub(rb'"\1":0', direct)


def test_progress_only_on_request_and_only_for_chat() -> None:
    assert wanted("/v1/chat/completions", "1") and wanted("/v1/chat/completions", " True ")
    assert not wanted("/v1/chat/completions", None) and not wanted("/v1/chat/completions", "0")
    assert not wanted("/v1/completions", "1")
    event = progress_event("big", "big-served", 2, 3.4, now=100)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    chunk = orjson.loads(event[6:])
    assert chunk["created"] == 100 and chunk["model"] == "big-served"
    assert (
        chunk["choices"][0]["delta"]["reasoning_content"] == "Waiting for big to be loaded (queue position 2, "
        "3 s so far)...\n"
    )
