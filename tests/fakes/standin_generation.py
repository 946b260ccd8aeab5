"""The stand-in engine's generation routes: ``/v1/completions`` and ``/v1/chat/completions`` (whole
and streamed, with logprobs) and ``/v1/embeddings``, in vLLM's shapes.
"""

from __future__ import annotations

import base64
import math
import struct
import time

import orjson

from tests.fakes.standin_asgi import (
    JSON,
    SSE_DONE,
    SSE_START,
    ApiError,
    Receive,
    Scope,
    Send,
    bad_request,
    int_field,
    random_id,
    read_json,
    respond,
    send_chunk,
)
from tests.fakes.standin_base import EngineBase
from tests.fakes.standin_model import (
    EMBEDDING_DIM,
    GOLDEN,
    MAX_LOGPROBS,
    WORD_JSON,
    WORDS,
    decode,
    encode,
    fake_logprob,
    fake_top_logprobs,
    message_text,
    mix32,
    render_chat,
    sequence_seed,
    token_text,
)
from tests.fakes.standin_requests import TEXT_SENTINEL, Job, Prompt, RequestRun, Seq, chunk_template, usage_json


class GenerationRoutes(EngineBase):
    """Completions, chat completions and embeddings."""

    # -- completions -------------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            prompts = _completion_prompts(req.get("prompt"))
            job = self._job(scope, req, kind="completion", model=model, seed_name=seed_name, prompts=prompts,
                            max_tokens=int_field(req, "max_tokens", None))
            job.logprobs = int_field(req, "logprobs", None)
            job.return_token_ids = bool(req.get("return_token_ids"))
            if job.logprobs is not None and job.logprobs > MAX_LOGPROBS:
                raise bad_request(f"Requested sample logprobs of {job.logprobs}, which is greater than max allowed: "
                                  f"{MAX_LOGPROBS}", "logprobs")
        except ApiError:
            self.stats.rejected += 1
            raise
        if req.get("stream"):
            await self._run(receive, send, job, lambda run: self._stream_completion(run, send, job))
        else:
            await self._run(receive, send, job, lambda run: self._complete(run, send, job))

    def _completion_logprobs(self, job: Job, seq: Seq, start: int, stop: int, *, with_prompt: bool,
                             offset: int = 0) -> JSON:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        k = job.logprobs or 0
        if with_prompt:
            for position, token_id in enumerate(seq.prompt.ids):
                text = token_text(token_id)
                tokens.append(text)
                if position == 0:
                    token_logprobs.append(None)
                    top.append(None)
                else:
                    lp = fake_logprob(token_id, position)
                    token_logprobs.append(lp)
                    top.append(fake_top_logprobs(text, lp, token_id + position, k))
        for position in range(start, stop):
            word = WORDS[seq.words[position]]
            lp = fake_logprob(seq.seed, position)
            tokens.append(word)
            token_logprobs.append(lp)
            top.append(fake_top_logprobs(word, lp, seq.seed + position, k))
        offsets: list[int] = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}

    async def _complete(self, run: RequestRun, send: Send, job: Job) -> bool:
        if not await self._generate_all(run, job):
            return False
        choices = []
        for seq in job.seqs:
            text = "".join(WORDS[w] for w in seq.words)
            logprobs = None
            if job.logprobs is not None:
                logprobs = self._completion_logprobs(job, seq, 0, job.max_tokens, with_prompt=job.echo)
            choices.append({
                "index": seq.index, "text": seq.prompt.text + text if job.echo else text, "logprobs": logprobs,
                "finish_reason": job.finish_reason, "stop_reason": None,
                "token_ids": [encode(WORDS[w])[0] for w in seq.words] if job.return_token_ids else None,
                "prompt_logprobs": None, "prompt_token_ids": seq.prompt.ids if job.return_token_ids else None,
            })
        body = {
            "id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "service_tier": None, "system_fingerprint": job.fingerprint,
            "usage": {**job.usage(), "prompt_tokens_details": None}, "kv_transfer_params": None,
        }
        await respond(send, 200, orjson.dumps(body))
        return True

    def _completion_chunk(self, job: Job, index: int, text: str, *, logprobs: JSON | None = None,
                          finish: str | None = None, usage: JSON | None = None) -> JSON:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                  "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
        chunk: JSON = {"id": job.request_id, "object": "text_completion", "created": job.created,
                       "model": job.model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        job.stamp(chunk, finish)
        return chunk

    async def _stream_completion(self, run: RequestRun, send: Send, job: Job) -> bool:
        await send(SSE_START)
        if not await run.prefill():
            return False
        plain = not (job.echo or job.logprobs is not None or job.continuous_usage)
        templates = [
            (chunk_template(self._completion_chunk(job, seq.index, TEXT_SENTINEL), TEXT_SENTINEL),
             chunk_template(self._completion_chunk(job, seq.index, TEXT_SENTINEL, finish=job.finish_reason),
                            TEXT_SENTINEL))
            for seq in job.seqs
        ] if plain else []
        offsets = [0] * len(job.seqs)
        for k in range(job.max_tokens):
            if k > 0 and not await run.decode():
                return False
            run.check_crash(k)
            last = k == job.max_tokens - 1
            for s, seq in enumerate(job.seqs):
                word = seq.words[k]
                if plain:
                    head, tail = templates[s][last]
                    await send_chunk(send, head + WORD_JSON[word] + tail)
                    continue
                echo = job.echo and k == 0
                text = seq.prompt.text + WORDS[word] if echo else WORDS[word]
                logprobs = None
                if job.logprobs is not None:
                    logprobs = self._completion_logprobs(job, seq, k, k + 1, with_prompt=echo, offset=offsets[s])
                offsets[s] += len(text)
                usage = usage_json(len(seq.prompt.ids), k + 1) if job.continuous_usage else None
                chunk = self._completion_chunk(job, seq.index, text, logprobs=logprobs,
                                               finish=job.finish_reason if last else None, usage=usage)
                await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.max_tokens == 0 and job.echo:
            for seq in job.seqs:
                logprobs = None
                if job.logprobs is not None:
                    logprobs = self._completion_logprobs(job, seq, 0, 0, with_prompt=True)
                usage = usage_json(len(seq.prompt.ids), 0) if job.continuous_usage else None
                chunk = self._completion_chunk(job, seq.index, seq.prompt.text, logprobs=logprobs,
                                               finish=job.finish_reason, usage=usage)
                await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        await self._finish_stream(send, job, "text_completion")
        return True

    async def _finish_stream(self, send: Send, job: Job, kind: str) -> None:
        if job.include_usage:
            final = {"id": job.request_id, "object": kind, "created": job.created, "model": job.model,
                     "choices": [], "usage": job.usage(), "system_fingerprint": job.fingerprint}
            await send_chunk(send, b"data: " + orjson.dumps(final) + b"\n\n")
        await send({"type": "http.response.body", "body": SSE_DONE})

    # -- chat --------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise bad_request("`messages` must be a non-empty list of objects.", "messages")
            add_generation_prompt = req.get("add_generation_prompt", True) is not False
            text = render_chat(messages, add_generation_prompt=add_generation_prompt)
            max_tokens = int_field(req, "max_completion_tokens", None)
            if max_tokens is None:
                max_tokens = int_field(req, "max_tokens", None)
            job = self._job(scope, req, kind="chat", model=model, seed_name=seed_name,
                            prompts=[Prompt(text, encode(text))], max_tokens=max_tokens)
            top = int_field(req, "top_logprobs", 0) or 0
            if top > MAX_LOGPROBS:
                raise bad_request(f"`top_logprobs` must be at most {MAX_LOGPROBS}.", "top_logprobs")
            if req.get("logprobs"):
                job.logprobs = top
            elif top:
                raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            role = "assistant" if add_generation_prompt else str(messages[-1].get("role", "assistant"))
            if job.echo and messages[-1].get("role") == role:
                job.echo_text = message_text(messages[-1].get("content"))
        except ApiError:
            self.stats.rejected += 1
            raise
        if req.get("stream"):
            await self._run(receive, send, job, lambda run: self._stream_chat(run, send, job))
        else:
            await self._run(receive, send, job, lambda run: self._chat_complete(run, send, job))

    def _chat_logprobs(self, job: Job, seq: Seq, start: int, stop: int) -> JSON:
        content = []
        for position in range(start, stop):
            word = WORDS[seq.words[position]]
            lp = fake_logprob(seq.seed, position)
            top = list(fake_top_logprobs(word, lp, seq.seed + position, job.logprobs or 0).items())
            content.append({
                "token": word, "logprob": lp, "bytes": list(word.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                 for t, v in top[: job.logprobs or 0]],
            })
        return {"content": content}

    async def _chat_complete(self, run: RequestRun, send: Send, job: Job) -> bool:
        if not await self._generate_all(run, job):
            return False
        choices = []
        for seq in job.seqs:
            message = {"role": "assistant", "content": job.echo_text + "".join(WORDS[w] for w in seq.words),
                       "refusal": None, "annotations": None, "audio": None, "function_call": None,
                       "reasoning": None}
            logprobs = self._chat_logprobs(job, seq, 0, job.max_tokens) if job.logprobs is not None else None
            choices.append({"index": seq.index, "message": message, "logprobs": logprobs,
                            "finish_reason": job.finish_reason, "stop_reason": None, "token_ids": None})
        body = {
            "id": job.request_id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "service_tier": None, "system_fingerprint": job.fingerprint,
            "usage": {**job.usage(), "prompt_tokens_details": None}, "prompt_logprobs": None,
            "prompt_token_ids": None, "kv_transfer_params": None,
        }
        await respond(send, 200, orjson.dumps(body))
        return True

    def _chat_chunk(self, job: Job, index: int, delta: JSON, *, logprobs: JSON | None = None,
                    finish: str | None = None, token_ids: bool = True, usage: JSON | None = None) -> JSON:
        choice: JSON = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        if token_ids:
            choice["token_ids"] = None
        chunk: JSON = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created,
                       "model": job.model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        job.stamp(chunk, finish)
        return chunk

    async def _stream_chat(self, run: RequestRun, send: Send, job: Job) -> bool:
        await send(SSE_START)
        if not await run.prefill():
            return False
        for seq in job.seqs:
            chunk = self._chat_chunk(job, seq.index, {"role": "assistant", "content": ""}, token_ids=False,
                                     usage=usage_json(len(seq.prompt.ids), 0) if job.continuous_usage else None)
            chunk["prompt_token_ids"] = None
            await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.echo_text:
            for seq in job.seqs:
                chunk = self._chat_chunk(job, seq.index, {"content": job.echo_text}, token_ids=False,
                                         usage=usage_json(len(seq.prompt.ids), 0) if job.continuous_usage else None)
                await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        plain = not (job.logprobs is not None or job.continuous_usage)
        templates = [
            (chunk_template(self._chat_chunk(job, seq.index, {"content": TEXT_SENTINEL}), TEXT_SENTINEL),
             chunk_template(self._chat_chunk(job, seq.index, {"content": TEXT_SENTINEL}, finish=job.finish_reason),
                            TEXT_SENTINEL))
            for seq in job.seqs
        ] if plain else []
        for k in range(job.max_tokens):
            if k > 0 and not await run.decode():
                return False
            run.check_crash(k)
            last = k == job.max_tokens - 1
            for s, seq in enumerate(job.seqs):
                word = seq.words[k]
                if plain:
                    head, tail = templates[s][last]
                    await send_chunk(send, head + WORD_JSON[word] + tail)
                    continue
                logprobs = self._chat_logprobs(job, seq, k, k + 1) if job.logprobs is not None else None
                chunk = self._chat_chunk(job, seq.index, {"content": WORDS[word]}, logprobs=logprobs,
                                         finish=job.finish_reason if last else None,
                                         usage=usage_json(len(seq.prompt.ids), k + 1) if job.continuous_usage else None)
                await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        if job.max_tokens == 0:
            for seq in job.seqs:
                chunk = self._chat_chunk(job, seq.index, {"content": ""}, finish=job.finish_reason)
                await send_chunk(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
        await self._finish_stream(send, job, "chat.completion.chunk")
        return True

    # -- embeddings ----------------------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        try:
            model, seed_name = self._admit(scope, req)
            prompts = _completion_prompts(req.get("input"), param="input")
            for prompt in prompts:
                self._check_length(len(prompt.ids), 0)
            dims = int_field(req, "dimensions", EMBEDDING_DIM, minimum=1) or EMBEDDING_DIM
            encoding = req.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise bad_request("`encoding_format` must be 'float' or 'base64'.", "encoding_format")
        except ApiError:
            self.stats.rejected += 1
            raise
        prompt_tokens = sum(len(p.ids) for p in prompts)
        self.stats.prompt_tokens += prompt_tokens
        run = RequestRun(self, receive, prompt_tokens)
        completed = False
        try:
            if not await run.prefill():
                return
            data = []
            for index, prompt in enumerate(prompts):
                vector = _embedding(sequence_seed(seed_name, prompt.text, 0), dims)
                value: list[float] | str = vector
                if encoding == "base64":
                    value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                data.append({"index": index, "object": "embedding", "embedding": value})
            body = {"id": f"embd-{random_id()}", "object": "list", "created": int(time.time()), "model": model,
                    "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                            "completion_tokens": 0, "prompt_tokens_details": None}}
            await respond(send, 200, orjson.dumps(body))
            completed = True
        finally:
            run.close(completed=completed, tokens=0, finish_reason=None)


def _completion_prompts(prompt: object, *, param: str = "prompt") -> list[Prompt]:
    """vLLM's prompt forms: a string, a list of strings, token ids, or a list of token-id lists."""

    def is_ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    def from_ids(ids: list[int]) -> Prompt:
        try:
            return Prompt(decode(ids), ids)
        except ValueError as exc:
            raise bad_request(str(exc), param) from exc

    if isinstance(prompt, str) and prompt:
        return [Prompt(prompt, encode(prompt))]
    if is_ids(prompt):
        assert isinstance(prompt, list)
        return [from_ids(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) and p for p in prompt):
            return [Prompt(p, encode(p)) for p in prompt]
        if all(is_ids(p) for p in prompt):
            return [from_ids(p) for p in prompt]
    raise bad_request(f"`{param}` must be a non-empty string, a list of strings, a list of token ids or a list of "
                      "token-id lists.", param)


def _embedding(seed: int, dims: int) -> list[float]:
    raw = [mix32(seed + i * GOLDEN) / 0x7FFFFFFF - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
