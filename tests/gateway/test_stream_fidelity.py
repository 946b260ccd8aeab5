"""A stream through the gateway is the engine's own stream for the client's request, byte for byte.

The gateway asks the engine for usage on its own account; the engine then moves ``system_fingerprint``
from the terminal chunks to a usage event (vLLM 0.32's rule, followed by the stand-in). These tests send
the same request to the gateway and to the engine directly and compare the two streams event by event,
field by field and in field order; only ``id`` and ``created`` may differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.usage_events import UsageFilter, stamp_fingerprint
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)

_ID = re.compile(rb'"id":"[^"]*","object":"([^"]*)","created":\d+')


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("fidelity")
    reg = write_registry(tmp / "reg.yaml", [standin_model("alpha")], executable=standin_executable(tmp))
    with running_gateway(reg, tmp / "run") as server:
        yield server


def normalised(raw: bytes) -> list[bytes]:
    """The stream's events with ``id`` and ``created`` blanked (they differ per request)."""
    return [_ID.sub(rb'"id":"-","object":"\1","created":0', ev) for ev in raw.split(b"\n\n") if ev]


def both(gw: ServerThread, path: str, body: dict[str, Any]) -> tuple[list[bytes], list[bytes]]:
    """The gateway's and the engine's own stream for ``body``."""
    via = httpx.post(gw.url + path, json=body, timeout=60)
    assert via.status_code == 200, via.text
    engine = gw.gw.pool.owner.engines["alpha"]
    direct = httpx.post(engine.base_url + path, json=body, timeout=60)
    assert direct.status_code == 200, direct.text
    return normalised(via.content), normalised(direct.content)


def fields(events: list[bytes]) -> list[list[tuple[str, Any]]]:
    return [list(orjson.loads(ev[6:]).items()) if ev.startswith(b"data: {") else [("raw", ev)] for ev in events]


CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream_options": {"include_usage": True}},
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream_options": {"include_usage": False}},
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream_options": {"continuous_usage_stats": True},
        },
    ),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 4}),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "n": 2}),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 3, "stream_options": {"include_usage": True}}),
]


IDS = [f"{'chat' if 'chat' in path else 'completions'}-{i}" for i, (path, _) in enumerate(CASES)]


@pytest.mark.parametrize(("path", "body"), CASES, ids=IDS)
def test_stream_equals_the_engines_own(gateway: ServerThread, path: str, body: dict[str, Any]) -> None:
    via, direct = both(gateway, path, {"model": "alpha", "stream": True, **body})
    assert fields(via) == fields(direct)
    assert via == direct
    terminal = [ev for ev in direct if b'"finish_reason":"' in ev]
    assert terminal, "the engine sent no terminal chunk"
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    assert all((b'"system_fingerprint":"vllm-0.32.0-' in ev) != usage for ev in terminal)


def test_non_stream_keeps_the_fingerprint(gateway: ServerThread) -> None:
    for path, body in CASES[:1] + CASES[6:7]:
        via = httpx.post(gateway.url + path, json={"model": "alpha", **body}, timeout=60).json()
        assert via["system_fingerprint"].startswith("vllm-0.32.0-")


# -- the filter alone, on vLLM 0.32's own bytes ---------------------------------------------------------

#: A chat stream as vLLM 0.32 sends it with include_usage on (pydantic's compact JSON, terminal chunk
#: without fingerprint, usage event with it), and the terminal chunk it sends with include_usage off.
VLLM_TERMINAL = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" x"},"logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null,"token_ids":null}]}'
)
VLLM_USAGE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2},'
    b'"system_fingerprint":"vllm-0.32.0-1a2b3c4d"}'
)


def test_filter_restores_the_fingerprint_and_drops_the_usage_event() -> None:
    f = UsageFilter(strip=True)
    assert f.feed([VLLM_TERMINAL]) == b""  # held until the usage event says what the fingerprint is
    out = f.feed([VLLM_USAGE, b"data: [DONE]"]) + f.flush()
    assert out == VLLM_TERMINAL[:-1] + b',"system_fingerprint":"vllm-0.32.0-1a2b3c4d"}\n\ndata: [DONE]\n\n'
    assert f.usage == {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}


def test_filter_without_usage_event_releases_the_held_events_unchanged() -> None:
    f = UsageFilter(strip=True)
    assert f.feed([VLLM_TERMINAL, b"data: [DONE]"]) == b""
    assert f.flush() == VLLM_TERMINAL + b"\n\ndata: [DONE]\n\n"


def test_filter_keeps_usage_the_client_asked_for() -> None:
    f = UsageFilter(strip=False)
    assert f.feed([VLLM_TERMINAL, VLLM_USAGE]) == VLLM_TERMINAL + b"\n\n" + VLLM_USAGE + b"\n\n"


def test_fingerprint_goes_before_the_fields_declared_after_it() -> None:
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"metrics":{"a":1}}'
    assert stamp_fingerprint(chunk, "fp") == (
        b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"system_fingerprint":"fp","metrics":{"a":1}}'
    )
    usage = b'data: {"object":"text_completion","choices":[],"usage":{"prompt_tokens":1}}'
    assert stamp_fingerprint(usage, "fp").endswith(b'"usage":{"prompt_tokens":1},"system_fingerprint":"fp"}')


def test_filter_with_a_known_fingerprint_holds_nothing_back() -> None:
    f = UsageFilter(strip=True, fingerprint="vllm-0.32.0-1a2b3c4d")
    stamped = VLLM_TERMINAL[:-1] + b',"system_fingerprint":"vllm-0.32.0-1a2b3c4d"}\n\n'
    assert f.feed([VLLM_TERMINAL]) == stamped  # at once: the engine's fingerprint does not change
    assert f.feed([VLLM_USAGE, b"data: [DONE]"]) == b"data: [DONE]\n\n"
    assert f.seen_fingerprint == "vllm-0.32.0-1a2b3c4d"
