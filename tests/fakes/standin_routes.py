"""The stand-in engine's answers on vLLM 0.32's other model routes, in vLLM's shapes, with fake values.

Responses (``vllm/entrypoints/openai/responses/``; every response is stored, as with
``VLLM_ENABLE_RESPONSES_API_STORE=1``), Anthropic Messages (``vllm/entrypoints/anthropic/``),
``/tokenizer_info`` (``vllm/entrypoints/serve/tokenize/``), batch chat, generative scoring, score and
rerank (``vllm/entrypoints/pooling/scoring/``), pooling, classify, and audio transcription and translation
(multipart, ``vllm/entrypoints/speech_to_text/``). ``/v2/embed``, ``/cohere/v2/chat`` and
``/v1/systemone`` answer a small JSON naming the model and path. Shapes were read from the CPU build's
answers; values come from the stand-in's fake model (:mod:`tests.fakes.standin_model`).
"""

from __future__ import annotations

import functools
import re
import time
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from tests.fakes.standin_asgi import (
    SSE_START,
    ApiError,
    ClientGone,
    bad_request,
    int_field,
    random_id,
    read_body,
    read_json,
    request_header,
    respond,
    send_chunk,
)
from tests.fakes.standin_model import (
    DEFAULT_MAX_TOKENS,
    WORDS,
    encode,
    generate_words,
    message_text,
    render_chat,
    sequence_seed,
)
from tests.fakes.standin_requests import RequestRun

if TYPE_CHECKING:
    from tests.fakes.standin_asgi import JSON, Handler, Receive, Scope, Send
    from tests.fakes.standin_engine import StandInEngine


def _score(*parts: str) -> float:
    return round((zlib.crc32("\0".join(parts).encode()) % 1000) / 1000, 3)


def usage_json(prompt: int, completion: int = 0) -> JSON:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def _text(req: JSON, key: str) -> str:
    value = req.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(message_text(m.get("content")) if isinstance(m, dict) else str(m) for m in value)
    return ""


def _not_found(response_id: str) -> ApiError:
    # vllm/entrypoints/openai/responses/serving.py, _make_not_found_error
    return ApiError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", "response_id")


async def _generate(engine: StandInEngine, receive: Receive, seed: str, prompt: str, tokens: int) -> list[str]:
    run = RequestRun(engine, receive, len(encode(prompt)) + tokens)
    done = False
    try:
        if not await run.prefill():
            raise ClientGone
        words = generate_words(sequence_seed(seed, prompt, 0), tokens)
        done = True
        return [WORDS[w] for w in words]
    finally:
        run.close(completed=done, tokens=tokens if done else 0, finish_reason="length")


async def responses(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    req = await read_json(receive)
    model, seed = engine._admit(scope, req)
    prompt = _text(req, "input")
    tokens = int_field(req, "max_output_tokens", DEFAULT_MAX_TOKENS) or 0
    words = await _generate(engine, receive, seed, prompt, tokens)
    rid, mid = f"resp_{random_id()[:16]}", f"msg_{random_id()[:16]}"
    text = "".join(words)
    prompt_tokens = len(encode(prompt))

    def body(status: str, output: list[JSON], usage: JSON | None) -> JSON:
        return {
            "id": rid,
            "created_at": int(time.time()),
            "incomplete_details": None,
            "instructions": None,
            "metadata": None,
            "model": model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "none",
            "tools": [],
            "top_p": 1.0,
            "background": False,
            "max_output_tokens": tokens,
            "status": status,
            "usage": usage,
        }

    message = {
        "id": mid,
        "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}],
        "role": "assistant",
        "status": "completed",
        "type": "message",
    }
    usage = {"input_tokens": prompt_tokens, "output_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    final = body("completed", [message], usage)
    engine.stored_responses[rid] = final
    if not req.get("stream"):
        await respond(send, 200, orjson.dumps(final))
        return
    await send(SSE_START)
    events: list[tuple[str, JSON]] = [("response.created", {"response": body("in_progress", [], None)})]
    events += [
        (
            "response.output_text.delta",
            {"content_index": 0, "delta": w, "item_id": mid, "logprobs": [], "output_index": 0},
        )
        for w in words
    ]
    events.append(("response.completed", {"response": final}))
    for n, (kind, data) in enumerate(events):
        payload = orjson.dumps({**data, "sequence_number": n, "type": kind})
        await send_chunk(send, f"event: {kind}\ndata: ".encode() + payload + b"\n\n")
    await send({"type": "http.response.body", "body": b""})


async def response_by_id(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    await read_body(receive)
    path = scope["path"].removeprefix("/v1/responses/")
    rid, _, action = path.partition("/")
    stored = engine.stored_responses.get(rid)
    if stored is None:
        raise _not_found(rid)
    if action == "cancel":  # only background responses can be cancelled (serving.py, cancel_responses)
        raise ApiError(400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id")
    await respond(send, 200, orjson.dumps(stored))


async def messages(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    req = await read_json(receive)
    model, seed = engine._admit(scope, req)
    prompt = _text(req, "messages")
    prompt_tokens = len(encode(prompt))
    if scope["path"].endswith("/count_tokens"):
        body = {"input_tokens": prompt_tokens, "context_management": {"original_input_tokens": prompt_tokens}}
        await respond(send, 200, orjson.dumps(body))
        return
    tokens = int_field(req, "max_tokens", DEFAULT_MAX_TOKENS) or 0
    words = await _generate(engine, receive, seed, prompt, tokens)
    mid = f"chatcmpl-{random_id()[:16]}"
    if not req.get("stream"):
        content = [{"type": "text", "text": "".join(words)}]
        body = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": model,
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens},
        }
        await respond(send, 200, orjson.dumps(body))
        return
    await send(SSE_START)
    start: JSON = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    events: list[JSON] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "content_block": {"type": "text", "text": ""}, "index": 0},
    ]
    events += [{"type": "content_block_delta", "delta": {"type": "text_delta", "text": w}, "index": 0} for w in words]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens},
        },
        {"type": "message_stop"},
    ]
    for event in events:
        await send_chunk(send, f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
    await send({"type": "http.response.body", "body": b""})


async def tokenizer_info(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    body = {
        "tokenizer_class": "StandInTokenizer",
        "backend": "standin",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": engine.args.max_model_len,
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    await respond(send, 200, orjson.dumps(body))


async def batch_chat(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    req = await read_json(receive)
    model, seed = engine._admit(scope, req)
    conversations = req.get("messages")
    if not isinstance(conversations, list) or not all(isinstance(c, list) for c in conversations):
        raise bad_request("`messages` must be a list of conversations.", "messages")
    tokens = int_field(req, "max_tokens", DEFAULT_MAX_TOKENS) or 0
    choices, prompt_tokens = [], 0
    for index, conversation in enumerate(conversations):
        prompt = render_chat(conversation)
        prompt_tokens += len(encode(prompt))
        text = "".join(await _generate(engine, receive, seed, prompt, tokens))
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
            }
        )
    body = {
        "id": f"chatcmpl-{random_id()[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_json(prompt_tokens, tokens * len(conversations)),
    }
    await respond(send, 200, orjson.dumps(body))


async def scores(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    """``/score``, ``/v1/score``, ``/generative_scoring``, the reranks, ``/pooling`` and ``/classify``."""
    req = await read_json(receive)
    model, _ = engine._admit(scope, req)
    path, now = scope["path"], int(time.time())
    if "rerank" in path:
        query, docs = str(req.get("query", "")), [str(d) for d in req.get("documents") or []]
        ranked = sorted(enumerate(docs), key=lambda item: -_score(model, query, item[1]))
        results = [{"index": i, "document": {"text": d}, "relevance_score": _score(model, query, d)} for i, d in ranked]
        tokens = sum(len(encode(query + d)) for d in docs)
        body: JSON = {
            "id": f"rerank-{random_id()[:16]}",
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
    elif path in ("/score", "/v1/score", "/generative_scoring"):
        first = str(req.get("query", req.get("text_1", "")))
        seconds = req.get("items", req.get("documents", req.get("text_2", [])))
        seconds = [str(s) for s in (seconds if isinstance(seconds, list) else [seconds])]
        data = [{"index": i, "object": "score", "score": _score(model, first, s)} for i, s in enumerate(seconds)]
        tokens = sum(len(encode(first + s)) for s in seconds)
        prefix = "generative-scoring" if path == "/generative_scoring" else "score"
        body = {
            "id": f"{prefix}-{random_id()[:16]}",
            "object": "list",
            "created": now,
            "model": model,
            "data": data,
            "usage": usage_json(tokens),
        }
    else:
        inputs = req.get("input")
        texts = [str(t) for t in (inputs if isinstance(inputs, list) else [inputs])]
        if path == "/classify":
            data = [
                {"index": i, "label": "LABEL_0", "probs": [_score(model, t), 1 - _score(model, t)], "num_classes": 2}
                for i, t in enumerate(texts)
            ]
        else:
            data = [
                {"index": i, "object": "pooling", "data": [_score(model, t, str(k)) for k in range(4)]}
                for i, t in enumerate(texts)
            ]
        tokens = sum(len(encode(t)) for t in texts)
        kind = "classify" if path == "/classify" else "pool"
        body = {
            "id": f"{kind}-{random_id()[:16]}",
            "object": "list",
            "created": now,
            "model": model,
            "data": data,
            "usage": usage_json(tokens),
        }
    await respond(send, 200, orjson.dumps(body))


_FORM_FIELD = re.compile(rb'name="([^"]+)"(?:; filename="[^"]*")?\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--', re.S)


async def audio(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    raw = await read_body(receive)
    content_type = request_header(scope, b"content-type") or ""
    if not content_type.startswith("multipart/form-data"):
        raise bad_request("Expected a multipart/form-data body.")
    fields = {m.group(1).decode(): m.group(2) for m in _FORM_FIELD.finditer(raw)}
    if "file" not in fields:
        raise bad_request("Field required: file", "file")
    req: JSON = {"model": fields["model"].decode() if "model" in fields else None}
    _, seed = engine._admit(scope, req)
    seconds = max(1, len(fields["file"]) // 16000)
    text = "".join(await _generate(engine, receive, seed, str(zlib.crc32(fields["file"])), 4))
    body = {"text": text, "usage": {"type": "duration", "seconds": seconds}}
    await respond(send, 200, orjson.dumps(body))


async def echo(engine: StandInEngine, scope: Scope, receive: Receive, send: Send) -> None:
    req = await read_json(receive)
    model, _ = engine._admit(scope, req)
    await respond(send, 200, orjson.dumps({"model": model, "path": scope["path"]}))


def routes(engine: StandInEngine) -> dict[str, dict[str, Handler]]:
    """The fixed paths, bound to ``engine``."""

    def bind(handler: Any) -> Handler:
        bound: Handler = functools.partial(handler, engine)
        return bound

    table = {
        "/v1/responses": {"POST": bind(responses)},
        "/v1/messages": {"POST": bind(messages)},
        "/v1/messages/count_tokens": {"POST": bind(messages)},
        "/tokenizer_info": {"GET": bind(tokenizer_info)},
        "/v1/chat/completions/batch": {"POST": bind(batch_chat)},
        "/v1/audio/transcriptions": {"POST": bind(audio)},
        "/v1/audio/translations": {"POST": bind(audio)},
    }
    for path in (
        "/score",
        "/v1/score",
        "/generative_scoring",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/pooling",
        "/classify",
    ):
        table[path] = {"POST": bind(scores)}
    for path in ("/v2/embed", "/cohere/v2/chat", "/v1/systemone"):
        table[path] = {"POST": bind(echo)}
    return table


def dynamic(engine: StandInEngine, path: str) -> dict[str, Handler] | None:
    """``/v1/responses/{id}`` (GET) and ``/v1/responses/{id}/cancel`` (POST)."""
    if not path.startswith("/v1/responses/"):
        return None
    handler: Handler = functools.partial(response_by_id, engine)
    return {"POST": handler} if path.endswith("/cancel") else {"GET": handler}
