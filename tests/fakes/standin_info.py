"""The stand-in engine's plain routes: ``/health``, ``/version``, ``/v1/models``, ``/metrics`` (vLLM's
series), the tokenizer routes and the test-only ``/standin/*`` routes.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import orjson

from tests.fakes.standin_asgi import JSON, ApiError, Receive, Scope, Send, bad_request, random_id, read_json, respond
from tests.fakes.standin_base import EngineBase, prom_label, prom_num
from tests.fakes.standin_model import KV_CAPACITY_SEQUENCES, VLLM_VERSION, decode, encode, render_chat, token_text


class InfoRoutes(EngineBase):
    """Health, version, models, metrics, tokenizer and test-only routes."""

    # -- plain endpoints ---------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.knobs.slow_health > 0:
            await asyncio.sleep(self.knobs.slow_health)
        await respond(send, 200, content_type=None)

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, orjson.dumps({"version": VLLM_VERSION}))

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = int(time.time())

        def card(name: str, root: str, parent: str | None, max_model_len: int | None) -> JSON:
            permission = {
                "id": f"modelperm-{random_id()}", "object": "model_permission", "created": now,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }
            return {"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": root,
                    "parent": parent, "max_model_len": max_model_len, "permission": [permission]}

        data = [card(name, self.args.model, None, self.args.max_model_len) for name in self.names]
        data += [card(m.name, m.path, m.base_model_name or self.base_name, None) for m in self.loras.values()]
        await respond(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.stats
        body = {
            "requests": s.requests, "cancelled": s.cancelled, "in_flight": s.running + s.waiting,
            "completed": s.completed, "rejected": s.rejected, "running": s.running, "waiting": s.waiting,
            "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
            "by_model": s.by_model, "sleeping": not self.awake.is_set(), "sleep_level": self.sleep_level,
            "loras": sorted(self.loras), "pid": os.getpid(), "received": s.received,
        }
        await respond(send, 200, orjson.dumps(body))

    async def _last_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        last = dict(self.last_request)
        if "headers" in last:
            last["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in last["headers"]}
        await respond(send, 200, orjson.dumps(last))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, self.metrics_text().encode(), b"text/plain; version=0.0.4; charset=utf-8")

    def metrics_text(self) -> str:
        """Prometheus text with the ``vllm:*`` series gateways read, labelled like vLLM's."""
        s = self.stats
        model = prom_label(self.base_name)
        labels = f'engine="0",model_name="{model}"'
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

        def sample(name: str, value: float, extra: str = "") -> None:
            out.append(f"{name}{{{labels}{extra}}} {prom_num(value)}\n")

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        sample("vllm:num_requests_running", s.running)
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        sample("vllm:num_requests_waiting", s.waiting)
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        capacity = KV_CAPACITY_SEQUENCES * self.args.max_model_len
        sample("vllm:kv_cache_usage_perc", min(1.0, s.kv_tokens / capacity))
        family("vllm:engine_sleep_state", "gauge",
               "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
               "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.")
        for state, on in (("awake", self.sleep_level == 0), ("weights_offloaded", self.sleep_level == 1),
                          ("discard_all", self.sleep_level == 2)):
            out.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {prom_num(on)}\n')
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        sample("vllm:prompt_tokens_total", s.prompt_tokens)
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        sample("vllm:generation_tokens_total", s.generation_tokens)
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason in ("abort", "length", "stop"):
            out.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{model}"}} '
                       f"{prom_num(s.finished.get(reason, 0))}\n")
        for name, text, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.e2e),
        ):
            family(name, "histogram", text)
            cumulative = 0
            for bound, count in zip((*hist.buckets, math.inf), hist.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else prom_num(bound)
                out.append(f'{name}_bucket{{engine="0",le="{le}",model_name="{model}"}} {prom_num(cumulative)}\n')
            sample(f"{name}_count", hist.count)
            sample(f"{name}_sum", hist.total)
        return "".join(out)

    # -- tokenizer -----------------------------------------------------------------------------------

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        self._admit_tokenizer(scope, req)
        if "messages" in req:
            messages = req["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise bad_request("`messages` must be a list of objects.", "messages")
            text = render_chat(messages, add_generation_prompt=req.get("add_generation_prompt", True) is not False)
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                raise bad_request("`prompt` must be a string.", "prompt")
            text = prompt
        ids = encode(text)
        strs = [token_text(i) for i in ids] if req.get("return_token_strs") else None
        body = {"count": len(ids), "max_model_len": self.args.max_model_len, "tokens": ids, "token_strs": strs}
        await respond(send, 200, orjson.dumps(body))

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        self._admit_tokenizer(scope, req)
        tokens = req.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("`tokens` must be a list of integers.", "tokens")
        try:
            text = decode(tokens)
        except ValueError as exc:
            raise bad_request(str(exc), "tokens") from exc
        await respond(send, 200, orjson.dumps({"prompt": text}))

    def _admit_tokenizer(self, scope: Scope, req: JSON) -> None:
        name = req.get("model")
        if name and name not in self.names and name not in self.loras:
            raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
