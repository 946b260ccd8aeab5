"""One inference request on the stand-in engine: its prompts and sequences, pacing, waits while the
engine sleeps, client disconnects and accounting, and pre-encoded stream chunk templates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

from tests.fakes.standin_asgi import JSON, Message, Receive
from tests.fakes.standin_faults import crash_engine_core

if TYPE_CHECKING:
    from tests.fakes.standin_base import EngineBase


@dataclass
class Prompt:
    text: str
    ids: list[int]


@dataclass
class Seq:
    index: int
    prompt: Prompt
    seed: int
    words: list[int]


@dataclass
class Job:
    request_id: str
    created: int
    model: str
    prompts: list[Prompt]
    seqs: list[Seq]
    max_tokens: int
    finish_reason: str
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False
    echo_text: str = ""  # chat: the last message's content, echoed when `echo` is set
    fingerprint: str | None = None

    def stamp(self, chunk: JSON, finish: str | None) -> None:
        """vLLM 0.32 stamps ``system_fingerprint`` on a stream's terminal chunks only when no usage chunk
        follows (``vllm/entrypoints/openai/chat_completion/serving.py`` and ``completion/serving.py``,
        the stream generators); otherwise the usage chunk carries it."""
        if finish is not None and not self.include_usage and self.fingerprint is not None:
            chunk["system_fingerprint"] = self.fingerprint

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return self.max_tokens * len(self.seqs)

    def usage(self) -> JSON:
        """Usage of the whole request (each prompt counted once, every choice's tokens)."""
        return usage_json(self.prompt_tokens, self.completion_tokens)


def usage_json(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


class RequestRun:
    """Pacing, sleep, disconnect and accounting of one inference request."""

    def __init__(self, engine: EngineBase, receive: Receive, kv_tokens: int) -> None:
        self.engine = engine
        self.receive = receive
        self.kv_tokens = kv_tokens
        self.started = time.monotonic()
        self.watch: asyncio.Future[Message] | None = None
        self.waiting = False
        engine.stats.running += 1
        engine.stats.kv_tokens += kv_tokens

    def _watch(self) -> asyncio.Future[Message]:
        if self.watch is None:
            self.watch = asyncio.ensure_future(self.receive())
        return self.watch

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self.waiting:
            delta = 1 if waiting else -1
            self.engine.stats.waiting += delta
            self.engine.stats.running -= delta
            self.waiting = waiting

    async def _awake(self) -> bool:
        awake = self.engine.awake
        if awake.is_set():
            return True
        self._set_waiting(True)
        waiter = asyncio.ensure_future(awake.wait())
        done, _ = await asyncio.wait((waiter, self._watch()), return_when=asyncio.FIRST_COMPLETED)
        self._set_waiting(False)
        if waiter not in done:
            waiter.cancel()
            return False
        return True

    async def pause(self, delay: float) -> bool:
        """Let ``delay`` seconds pass (or yield once); False when the client went away."""
        watch = self._watch()
        if delay > 0:
            done, _ = await asyncio.wait((watch,), timeout=delay)
            return not done
        await asyncio.sleep(0)
        return not watch.done()

    async def prefill(self) -> bool:
        """Wait for an awake engine and the first-token delay; False when the client went away."""
        if not await self._awake():
            return False
        delay = self.engine.knobs.first_token_delay
        if delay > 0 and not (await self.pause(delay) and await self._awake()):
            return False
        self.engine.stats.ttft.observe(time.monotonic() - self.started)
        return True

    async def decode(self) -> bool:
        """Wait for the next token; False when the client went away."""
        return await self.pause(self.engine.knobs.token_delay) and await self._awake()

    def check_crash(self, produced: int) -> None:
        """Die as configured when a request that has ``produced`` tokens needs another."""
        limit = self.engine.knobs.crash_after_tokens
        if limit is not None and produced >= limit:
            crash_engine_core(f"stand-in: crashing after {produced} tokens (STANDIN_CRASH_AFTER_TOKENS={limit})")

    def close(self, *, completed: bool, tokens: int, finish_reason: str | None) -> None:
        stats = self.engine.stats
        if self.waiting:
            stats.waiting -= 1
        else:
            stats.running -= 1
        stats.kv_tokens -= self.kv_tokens
        if self.watch is not None:
            self.watch.cancel()
        stats.generation_tokens += tokens
        if completed:
            stats.completed += 1
            stats.e2e.observe(time.monotonic() - self.started)
            if finish_reason is not None:
                stats.finished[finish_reason] = stats.finished.get(finish_reason, 0) + 1
        else:
            stats.cancelled += 1


def chunk_template(chunk: JSON, sentinel: str) -> tuple[bytes, bytes]:
    """Split an SSE chunk around the JSON string ``sentinel`` to splice pre-encoded text in."""
    head, found, tail = (b"data: " + orjson.dumps(chunk) + b"\n\n").partition(orjson.dumps(sentinel))
    assert found, sentinel
    return head, tail


TEXT_SENTINEL: Final = "\x01standin-text\x01"
