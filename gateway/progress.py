"""Opt-in, visible swap progress for chat streams: a chat UI shows the wait as folded reasoning.

A client that sends the request header ``x-onecard-progress: 1`` on a streamed ``/v1/chat/completions``
and has to wait for its model gets, instead of SSE comments, chat chunks whose delta carries the wait in
``reasoning_content`` (what chat UIs such as Open WebUI fold away), in the shape of vLLM's chunks, so the
openai SDK parses them::

    data: {"id":"chatcmpl-onecard-wait","object":"chat.completion.chunk","created":1767000000,
           "model":"llama-8b","choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":
           "Waiting for llama-8b to be loaded (queue position 1)...\\n"},"logprobs":null,"finish_reason":null}]}

The engine's own stream follows unchanged. Without the header, nothing changes: streams stay the
engine's bytes, and a wait is only SSE comments, which clients ignore.
"""

from __future__ import annotations

import time
from typing import Final

import orjson

HEADER: Final = "x-onecard-progress"
#: The only path whose stream format has a reasoning channel.
PATHS: Final = frozenset({"/v1/chat/completions"})


def wanted(path: str, header: str | None) -> bool:
    """Whether the client asked for visible progress (``1``, ``true`` or ``yes``) on a chat stream."""
    return path in PATHS and (header or "").strip().lower() in ("1", "true", "yes")


def progress_event(model: str, served_name: str, position: int, waited_s: float, *, now: float | None = None) -> bytes:
    """One chat chunk saying how long the client has waited for ``model`` and where it stands."""
    where = f"queue position {position}" if position > 0 else "next"
    text = f"Waiting for {model} to be loaded ({where}, {waited_s:.0f} s so far)...\n"
    chunk = {
        "id": "chatcmpl-onecard-wait",
        "object": "chat.completion.chunk",
        "created": int(time.time() if now is None else now),
        "model": served_name,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "reasoning_content": text},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
