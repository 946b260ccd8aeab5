"""The stand-in engine's fake model: vLLM's version and limits, the tokenizer and the
deterministic generation (:func:`expected_text` predicts an answer).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from tests.fakes.standin_asgi import bad_request

VLLM_VERSION: Final = "0.32.0"
DEFAULT_MAX_MODEL_LEN: Final = 8192
DEFAULT_MAX_TOKENS: Final = 16
MAX_LOGPROBS: Final = 20
EMBEDDING_DIM: Final = 32
KV_CAPACITY_SEQUENCES: Final = 16  # fake KV cache: room for this many full-length sequences

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_PIECE_RE: Final = re.compile(r"[\x01-\x7f]{1,4}|[^\x01-\x7f]")
_MAX_CHAR_ID: Final = 0x10FFFF
_MIN_CHUNK_ID: Final = 0x01000000
_MAX_CHUNK_ID: Final = 0x7F7F7F7F


@functools.lru_cache(maxsize=1 << 16)
def _piece_id(piece: str) -> int:
    if len(piece) == 1 and not 0 < ord(piece) < 0x80:
        return ord(piece)
    return int.from_bytes(piece.encode("ascii").ljust(4, b"\0"), "big")


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the rule)."""
    return [_piece_id(piece) for piece in _PIECE_RE.findall(text)]


def token_text(token_id: int) -> str:
    """The text of one token id; ValueError when the id is not in the vocabulary."""
    if 0 <= token_id <= _MAX_CHAR_ID and not 0xD800 <= token_id <= 0xDFFF:
        return chr(token_id)
    if _MIN_CHUNK_ID <= token_id <= _MAX_CHUNK_ID:
        raw = token_id.to_bytes(4, "big").rstrip(b"\0")
        if all(0 < byte < 0x80 for byte in raw):
            return raw.decode("ascii")
    raise ValueError(f"Token id {token_id} is out of vocabulary")


def decode(token_ids: Sequence[int]) -> str:
    """Text of ``token_ids``; ValueError on an id outside the vocabulary."""
    return "".join(map(token_text, token_ids))


def render_chat(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The prompt text a chat request is tokenized as; a message that is no object is a 400, as vLLM's
    request validation (pydantic) makes it."""
    if not all(isinstance(m, Mapping) for m in messages):
        raise bad_request("Each message must be an object with a `role` and `content`.", "messages")
    text = "".join(f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def message_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                parts.append(f"<{part['type']}>")
            else:
                raise bad_request("Each content part must be an object with a `type`.", "messages")
        return "\n".join(parts)
    raise bad_request("Message `content` must be a string or a list of parts.", "messages")


# --------------------------------------------------------------------------------------------------
# Deterministic fake generation
# --------------------------------------------------------------------------------------------------

WORDS: Final[tuple[str, ...]] = tuple(
    f" {a}{b}{c}" for a in "bdfghjklmnprstvz" for b in "aeiou" for c in "bdfghjklmnprstvz"
)
WORD_JSON: Final = tuple(orjson.dumps(word) for word in WORDS)
GOLDEN: Final = 0x9E3779B1


def mix32(value: int) -> int:
    value &= 0xFFFFFFFF
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & 0xFFFFFFFF
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & 0xFFFFFFFF
    return value ^ (value >> 16)


def sequence_seed(model: str, prompt: str, index: int) -> int:
    """Seed of one output sequence: choice ``index`` of ``prompt`` answered by ``model``."""
    return zlib.crc32(f"{model}\0{index}\0{prompt}".encode("utf-8", "surrogatepass"))


def generate_words(seed: int, count: int) -> list[int]:
    """Indices into :data:`WORDS` of the first ``count`` output tokens of a sequence."""
    return [mix32(seed + k * GOLDEN) % len(WORDS) for k in range(count)]


def expected_text(model: str, prompt: str, max_tokens: int, index: int = 0) -> str:
    """What the engine answers: ``model`` is the first served name or the adapter name, ``prompt``
    the completion prompt or :func:`render_chat` of the messages, ``index`` the choice index."""
    return "".join(WORDS[w] for w in generate_words(sequence_seed(model, prompt, index), max_tokens))


def fake_logprob(seed: int, position: int) -> float:
    return -round((mix32(seed ^ (position * 0x27D4EB2F) ^ 0x5BD1E995) % 2000) / 1000 + 0.001, 4)


def fake_top_logprobs(token: str, logprob: float, salt: int, count: int) -> dict[str, float]:
    top = {token: logprob}
    for j in range(1, count + 1):
        alternative = WORDS[(salt + j * 97) % len(WORDS)]
        if alternative not in top:
            top[alternative] = round(logprob - 0.5 * j, 4)
    return top
