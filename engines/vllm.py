"""vLLM specifics: the command line, readiness, sleep/wake, runtime LoRA, the metrics scrape.

::

    argv = build_argv(LaunchConfig(...), model=spec, plan=model_plan, port=8123)
    api = VllmApi(client, "http://127.0.0.1:8123")
    await api.wait_ready(served_name="tiny", timeout_s=120, alive=lambda: proc.returncode is None)
    await api.sleep(level=1); await api.wake_up()
    await api.load_lora("tiny-lora", "/models/tiny-lora")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engines.listener import PortOwner
from engines.planner import ModelPlan, vllm_memory_args
from engines.registry import ModelSpec, Platform, Quantization, Registry

#: vLLM on the CPU: bf16 picks an AMX kernel that dies with "Illegal instruction"; float32 works.
CPU_DTYPE = "float32"


@dataclass(frozen=True)
class LaunchConfig:
    """Everything about launching engines that is not per model."""

    registry: Registry
    executable: str
    platform: Platform
    budget_gib: float
    run_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def sleep_supported(self) -> bool:
        return self.platform is Platform.CUDA


def build_argv(cfg: LaunchConfig, *, model: ModelSpec, plan: ModelPlan, port: int) -> list[str]:
    """The ``vllm serve`` command line for one registry entry."""
    source = cfg.registry.locate(model.source)
    argv = [cfg.executable, "serve", source, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--served-model-name", model.name, "--max-model-len", str(model.max_model_len)]
    quant = model.effective_quantization
    if quant is not Quantization.NONE:
        argv += ["--quantization", quant.value]
    dtype = CPU_DTYPE if cfg.platform is Platform.CPU and model.dtype in ("auto", "bfloat16") else model.dtype
    argv += ["--dtype", dtype]
    if model.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", model.kv_cache_dtype]
    if model.revision:
        argv += ["--revision", model.revision]
    argv += vllm_memory_args(plan, budget_gib=cfg.budget_gib, platform=cfg.platform)
    argv.append("--enable-prefix-caching" if model.enable_prefix_caching else "--no-enable-prefix-caching")
    if model.lora.enabled:
        argv += ["--enable-lora", "--max-lora-rank", str(model.lora.max_rank), "--max-loras", str(model.lora.max_loras)]
        startup = [
            f"{name}={cfg.registry.locate(ad.path)}" for name, ad in model.lora.adapters.items() if ad.preload
        ]
        if startup:
            argv += ["--lora-modules", *startup]
    if cfg.sleep_supported and model.sleep_level > 0:
        argv.append("--enable-sleep-mode")
    if cfg.platform is Platform.CPU:
        argv.append("--enforce-eager")
    argv += list(model.extra_args)
    return argv


def build_env(cfg: LaunchConfig, *, model: ModelSpec, engine_id: str, tmpdir: Path) -> dict[str, str]:
    """An explicit environment: only what the engine needs, never the gateway's secrets."""
    import os

    keep = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_TOKEN",
            "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        {
            "TMPDIR": str(tmpdir),
            "PYTHONUNBUFFERED": "1",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "ONECARD_ENGINE_ID": engine_id,
        }
    )
    if cfg.platform is Platform.CPU:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.update(cfg.registry.vllm.env)
    env.update(cfg.extra_env)
    env.update(model.env)
    return env


class NotReady(Exception):
    pass


class PortTaken(NotReady):
    """Another process listens on the engine's port: nothing may be sent there."""


class VllmApi:
    """Calls to one engine's management endpoints over the shared client."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url

    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            r = await self.client.get(f"{self.base_url}/health", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def probe(self, served_name: str, timeout_s: float = 60.0) -> None:
        """A 1-token completion: proves the engine serves, and warms it up."""
        r = await self.client.post(
            f"{self.base_url}/v1/completions",
            json={"model": served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
            timeout=timeout_s,
        )
        if r.status_code != 200:
            raise NotReady(f"1-token probe answered {r.status_code}: {r.text[:300]}")

    async def wait_ready(
        self,
        *,
        served_name: str,
        timeout_s: float,
        alive: Callable[[], bool],
        owner: Callable[[], PortOwner] | None = None,
        poll_s: float = 0.02,
    ) -> float:
        """Poll /health until 200, then probe. Returns seconds waited; raises TimeoutError or NotReady.

        With ``owner`` (who listens on the engine's port, :func:`engines.listener.port_owner`), nothing is
        sent until the engine's own process listens there, and :class:`PortTaken` is raised as soon as
        another process does: a squatter never sees a request, not even ``/health``."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        owned = owner is None
        while True:
            if not alive():
                raise NotReady("the engine process exited during start-up")
            if not owned:
                assert owner is not None
                owned = await self._owned(owner)
            if owned and await self.health(timeout_s=min(5.0, max(0.1, deadline - time.monotonic()))):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no healthy /health within {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)
        if owner is not None and not await self._owned(owner):
            raise NotReady("the engine stopped listening on its port before the first request")
        remaining = max(1.0, deadline - time.monotonic())
        try:
            await self.probe(served_name, timeout_s=remaining)
        except httpx.HTTPError as e:
            if not alive():
                raise NotReady("the engine process exited during the first request") from e
            raise NotReady(f"1-token probe failed: {e!r}") from e
        return time.monotonic() - t0

    @staticmethod
    async def _owned(owner: Callable[[], PortOwner]) -> bool:
        """Whether the engine itself listens on its port; :class:`PortTaken` if anyone else does."""
        found = await asyncio.to_thread(owner)
        if found.foreign:
            raise PortTaken(f"address already in use: {found.describe()}")
        return found.owned

    async def version(self) -> str | None:
        try:
            r = await self.client.get(f"{self.base_url}/version", timeout=5)
            return str(r.json().get("version")) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    async def sleep(self, level: int) -> None:
        r = await self.client.post(f"{self.base_url}/sleep", params={"level": level}, timeout=120)
        r.raise_for_status()

    async def wake_up(self) -> None:
        r = await self.client.post(f"{self.base_url}/wake_up", timeout=300)
        r.raise_for_status()

    async def is_sleeping(self) -> bool:
        r = await self.client.get(f"{self.base_url}/is_sleeping", timeout=10)
        r.raise_for_status()
        return bool(r.json().get("is_sleeping"))

    async def load_lora(self, name: str, path: str) -> tuple[int, str]:
        r = await self.client.post(
            f"{self.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120
        )
        return r.status_code, r.text

    async def unload_lora(self, name: str) -> tuple[int, str]:
        r = await self.client.post(f"{self.base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        return r.status_code, r.text

    async def metrics_text(self, timeout_s: float = 5.0) -> str:
        r = await self.client.get(f"{self.base_url}/metrics", timeout=timeout_s)
        r.raise_for_status()
        return r.text
