"""Reading only the ``usage`` object of a non-stream answer gives what parsing the whole answer gives."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.usage_events import usage_of

texts = st.text(alphabet=st.sampled_from('ab {}[]":,\\usage'), max_size=40)
usages = st.one_of(st.none(), st.fixed_dictionaries({
    "prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6),
    "prompt_tokens_details": st.one_of(st.none(), st.fixed_dictionaries({"cached_tokens": st.integers(0, 99)}))}))


@given(text=texts, usage=usages, compact=st.booleans(), after=st.one_of(st.none(), texts))
def test_usage_of_agrees_with_a_whole_parse(text: str, usage: dict[str, Any] | None, compact: bool,
                                            after: str | None) -> None:
    answer: dict[str, Any] = {"id": "cmpl-1", "choices": [{"text": text, "logprobs": {"tokens": [text]}}],
                              "usage": usage, "kv_transfer_params": after}
    body = json.dumps(answer, separators=(",", ":") if compact else None).encode()
    assert usage_of(body) == orjson.loads(body)["usage"]


def test_an_answer_without_usage_has_none() -> None:
    assert usage_of(b'{"object":"list","data":[]}') is None
    assert usage_of(b"not json") is None
