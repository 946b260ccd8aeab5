"""The stand-in engine's sleep mode and runtime LoRA: ``/sleep``, ``/wake_up``, ``/is_sleeping``,
``/collective_rpc``, ``/reset_prefix_cache`` (with ``VLLM_SERVER_DEV_MODE=1``) and
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import parse_qs

import orjson

from tests.fakes import simcard
from tests.fakes.standin_asgi import (
    ApiError,
    Receive,
    Scope,
    Send,
    bad_request,
    query_param,
    read_json,
    respond,
    vllm_log,
)
from tests.fakes.standin_base import EngineBase
from tests.fakes.standin_config import LoraModule, ServeArgs


class LifecycleRoutes(EngineBase):
    """Sleep and wake by vLLM's memory pools, and adapters loaded and unloaded at run time."""

    # -- sleep mode --------------------------------------------------------------------------------

    async def _sleep(self, scope: Scope, receive: Receive, send: Send) -> None:
        level_text = query_param(scope, "level") or "1"
        if level_text not in ("1", "2"):
            raise bad_request(f"Sleep level must be 1 or 2, got {level_text!r}.", "level")
        if not self.args.enable_sleep_mode:
            vllm_log("WARNING", "gpu_worker.py:118",
                     "Sleep mode was not enabled (--enable-sleep-mode): sleeping frees no memory.")
        self.sleep_level = int(level_text)
        self.awake.clear()
        self.sleeping_tags = set(simcard.SLEEP_TAGS)
        if self.sim is not None and self.args.enable_sleep_mode:
            freed, used = self.sim.sleep(self.sleep_level, adapters=sorted(self.loras))
            vllm_log("INFO", "gpu_worker.py:330", f"Sleep mode freed {simcard.format_gib(freed)} GiB memory, "
                     f"{simcard.format_gib(used)} GiB memory is still in use.")
        vllm_log("INFO", "gpu_worker.py:124", f"Sleep level {level_text}: it took 0.000001 seconds to fall asleep.")
        await respond(send, 200, orjson.dumps({"status": "sleeping", "level": self.sleep_level}))

    async def _wake_up(self, scope: Scope, receive: Receive, send: Send) -> None:
        tags = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("tags") or None
        if self.sleep_level:
            if self.knobs.wake_delay > 0:
                await asyncio.sleep(self.knobs.wake_delay)
            if self.knobs.fail_wake is not None:
                vllm_log("ERROR", "gpu_worker.py:140", self.knobs.fail_wake, sys.stderr)
                raise ApiError(500, self.knobs.fail_wake, "InternalServerError")
            if self.sim is not None and self.args.enable_sleep_mode:
                try:
                    self.sim.wake(tags)
                except simcard.CudaOutOfMemory as exc:
                    vllm_log("ERROR", "cumem.py:300", str(exc), sys.stderr)
                    raise ApiError(500, str(exc), "InternalServerError") from exc
            self.sleeping_tags -= set(tags) if tags else self.sleeping_tags
            if not self.sleeping_tags:  # vllm/v1/engine/core.py EngineCore.wake_up: only when fully awake
                self.sleep_level = 0
                self.awake.set()
            vllm_log("INFO", "gpu_worker.py:150", f"Woke up tags {tags} in {self.knobs.wake_delay:.3f} seconds.")
        fully = self.awake.is_set()
        await respond(send, 200, orjson.dumps({"status": "awake" if fully else "sleeping", "tags": tags}))

    async def _collective_rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        method = req.get("method")
        if method is None:
            raise ApiError(400, "Missing 'method' in request body", "BadRequestError")
        if method != "reload_weights":
            raise ApiError(500, f"Method {method!r} is not supported by the stand-in", "InternalServerError")
        if self.sim is not None:
            try:
                self.sim.reload_weights()
            except RuntimeError as exc:
                raise ApiError(500, str(exc), "InternalServerError") from exc
        vllm_log("INFO", "gpu_model_runner.py:2700", "Reloading weights inplace...")
        await respond(send, 200, orjson.dumps({"results": [None]}))

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        vllm_log("INFO", "api_router.py:39", "Resetting prefix cache...")
        await respond(send, 200, orjson.dumps({"success": True}))

    async def _is_sleeping(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, orjson.dumps({"is_sleeping": not self.awake.is_set()}))

    # -- runtime LoRA ------------------------------------------------------------------------------

    async def _load_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        name, path = req.get("lora_name"), req.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.loras and not req.get("load_inplace"):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                           "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        error = check_lora(self.args, LoraModule(name, path))
        if error is not None:
            raise error
        self.loras[name] = LoraModule(name, path, None)
        if self.sim is not None:
            self.sim.adapter_reloaded(name)
        vllm_log("INFO", "serving_models.py:200", f"Loaded new LoRA adapter: name '{name}', path '{path}'")
        body = f"Success: LoRA adapter '{name}' added successfully.".encode()
        await respond(send, 200, body, b"text/plain; charset=utf-8")

    async def _unload_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_json(receive)
        name = req.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if name not in self.loras:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loras[name]
        vllm_log("INFO", "serving_models.py:230", f"Removed LoRA adapter: name '{name}'")
        body = f"Success: LoRA adapter '{name}' removed successfully.".encode()
        await respond(send, 200, body, b"text/plain; charset=utf-8")


def check_lora(args: ServeArgs, module: LoraModule) -> ApiError | None:
    """The error vLLM gives when this adapter cannot be loaded, else None."""
    if not args.enable_lora:
        return ApiError(500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", "InternalServerError")
    path = Path(module.path)
    if not path.exists():
        return ApiError(404, f"Loading lora {module.name} failed: No adapter found for {module.path}",
                        "NotFoundError")
    config = path / "adapter_config.json"
    if config.is_file():
        try:
            rank = orjson.loads(config.read_bytes()).get("r")
        except (orjson.JSONDecodeError, AttributeError, OSError):
            rank = None
        if isinstance(rank, int) and rank > args.max_lora_rank:
            return ApiError(500, f"LoRA rank {rank} is greater than max_lora_rank {args.max_lora_rank}.",
                            "InternalServerError")
    return None
