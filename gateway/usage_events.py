"""Take the gateway's own usage event out of a stream, so the client gets the engine's bytes for its request.

The gateway asks every chat or completion stream for usage (``stream_options.include_usage``) to count
tokens. vLLM 0.32 then changes two things: it appends a usage-only event, and it moves
``system_fingerprint`` from the terminal chunks (those whose choice has a ``finish_reason``) to that usage
event (``vllm/entrypoints/openai/chat_completion/serving.py``, ``chat_completion_stream_generator``, and
``vllm/entrypoints/openai/completion/serving.py``, ``completion_stream_generator``: "Stamp the fingerprint
on terminal chunks only ... When include_usage is on, the trailing usage chunk overrides this").
:class:`UsageFilter` undoes both: from the first terminal chunk on it holds the events back (the usage
event follows at once), then stamps the usage event's fingerprint where vLLM would have put it and drops
the usage event. The fingerprint is fixed for an engine's life (vLLM computes it once, at start:
``vllm/entrypoints/serve/utils/fingerprint.py``), so once a stream has shown it, later streams of that
engine pass ``fingerprint=`` and nothing is held back::

    f = UsageFilter(strip=True, fingerprint=None)   # or the engine's fingerprint, when known
    out = f.feed(events)        # complete SSE events, each without its b"\\n\\n"
    out += f.flush()            # at the end of the stream: whatever is still held, unchanged
    f.usage                     # the engine's usage figures, for metrics
    f.seen_fingerprint          # the fingerprint the usage event carried, to remember for the engine
"""

from __future__ import annotations

from typing import Any, Final

import orjson

#: A choice that finished: ``"finish_reason":"stop"`` (pydantic's compact JSON; ``null`` when running).
#: Inside a JSON string the quotes would be escaped, so these bytes only occur as the key itself.
FINISHED: Final = b'"finish_reason":"'
#: The top-level fields vLLM 0.32 declares after ``system_fingerprint`` on each stream response class
#: (``ChatCompletionStreamResponse`` in ``openai/chat_completion/protocol.py``, ``CompletionStreamResponse``
#: in ``openai/completion/protocol.py``); pydantic writes fields in declaration order.
AFTER_FINGERPRINT: Final = {
    "chat.completion.chunk": ("prompt_token_ids", "prompt_text", "metrics"),
    "text_completion": ("metrics",),
}


#: The key of a response's usage object (compact JSON; escaped inside strings, so only the key matches).
USAGE_KEY: Final = b'"usage":'


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of a whole JSON answer, parsed alone: an answer with logprobs can be megabytes,
    and only these few numbers are counted. Anything unexpected falls back to parsing the whole body.

    >>> usage_of(b'{"id":"x","choices":[{"text":"say \\\\"usage\\\\":{}"}],"usage":{"prompt_tokens":3,"total_tokens":5,'
    ...          b'"completion_tokens":2,"prompt_tokens_details":null},"kv_transfer_params":null}')
    {'prompt_tokens': 3, 'total_tokens': 5, 'completion_tokens': 2, 'prompt_tokens_details': None}
    >>> usage_of(b'{"usage":null}') is None
    True
    """
    at = body.rfind(USAGE_KEY)
    if at < 0:
        return None
    start = at + len(USAGE_KEY)
    if body.startswith(b"null", start):
        return None
    end = _object_end(body, start) if body.startswith(b"{", start) else -1
    if end > 0:
        try:
            found = orjson.loads(body[start:end])
        except orjson.JSONDecodeError:
            found = None
        if isinstance(found, dict):
            return found
    try:
        whole = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = whole.get("usage") if isinstance(whole, dict) else None
    return usage if isinstance(usage, dict) else None


def _object_end(body: bytes, start: int, *, limit: int = 4096) -> int:
    """One past the ``}`` that may close the JSON object opening at ``start``: the first ``}`` at which the
    braces since ``start`` balance, looking at most ``limit`` bytes (a usage object is a few hundred);
    -1 if none. Braces inside strings can mislead it, never into a wrong answer: the caller parses what
    it found, and only a whole JSON object starting at ``start`` parses."""
    stop = min(len(body), start + limit)
    end = body.find(b"}", start, stop)
    while end >= 0:
        if body.count(b"{", start, end) == body.count(b"}", start, end) + 1:
            return end + 1
        end = body.find(b"}", end + 1, stop)
    return -1


def stamp_fingerprint(event: bytes, fingerprint: str) -> bytes:
    """``event`` (``data: {...}``) with ``"system_fingerprint"`` where vLLM's serializer puts it: after
    ``choices`` and ``usage``, before the fields declared after it. Unchanged if it already has one or is
    no JSON object."""
    try:
        data = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return event
    if not isinstance(data, dict) or "system_fingerprint" in data or not event.endswith(b"}"):
        return event
    field = b',"system_fingerprint":' + orjson.dumps(fingerprint)
    for key in AFTER_FINGERPRINT.get(str(data.get("object")), ()):
        if key in data:
            at = event.rfind(b',"' + key.encode() + b'":')
            if at < 0:
                return event
            return event[:at] + field + event[at:]
    return event[:-1] + field + b"}"


class UsageFilter:
    """Reads the usage event of one stream and, when ``strip`` is set (the gateway asked for usage, the
    client did not), hides it and restores the terminal chunks' fingerprint."""

    def __init__(self, *, strip: bool, fingerprint: str | None = None) -> None:
        self.strip = strip
        self.fingerprint = fingerprint
        self.usage: dict[str, Any] | None = None
        self.seen_fingerprint: str | None = None
        self._held: list[bytes] = []

    def wants(self, chunk: bytes) -> bool:
        """Whether ``chunk`` (raw bytes from the engine) must go through :meth:`feed` rather than straight
        to the client."""
        return bool(self._held) or b'"usage"' in chunk or (self.strip and FINISHED in chunk)

    def feed(self, events: list[bytes]) -> bytes:
        """The bytes to send now for these complete events (each without its ``\\n\\n``)."""
        out = bytearray()
        for ev in events:
            data = None
            if b'"usage"' in ev and ev.startswith(b"data: {"):
                try:
                    data = orjson.loads(ev[6:])
                except orjson.JSONDecodeError:
                    data = None
            if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                self.usage = data["usage"]
                fingerprint = data.get("system_fingerprint")
                if isinstance(fingerprint, str):
                    self.seen_fingerprint = fingerprint
                if self.strip and not data.get("choices"):
                    out += self._release(self.seen_fingerprint)
                    continue
            if self.strip and (self._held or (FINISHED in ev and ev.startswith(b"data: {"))):
                if self.fingerprint is not None and not self._held:
                    ev = stamp_fingerprint(ev, self.fingerprint)
                else:
                    self._held.append(ev)
                    continue
            out += ev + b"\n\n"
        return bytes(out)

    def flush(self) -> bytes:
        """What is still held when the stream ends without a usage event (an error, a cut connection)."""
        return self._release(None)

    def _release(self, fingerprint: str | None) -> bytes:
        out = bytearray()
        for ev in self._held:
            if fingerprint is not None and FINISHED in ev and ev.startswith(b"data: {"):
                ev = stamp_fingerprint(ev, fingerprint)
            out += ev + b"\n\n"
        self._held.clear()
        return bytes(out)
