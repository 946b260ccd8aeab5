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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engines.engine_args import engine_args
from engines.listener import PortOwner
from engines.planner import ModelPlan
from engines.registry import ModelSpec, Platform, Registry

#: The fingerprint probe: a fixed token-id prompt (ids every vocabulary of 1,000+ tokens has) and how many
#: greedy tokens it asks for.
FINGERPRINT_PROMPT = (100, 200, 300, 400)
FINGERPRINT_TOKENS = 4


@dataclass(frozen=True)
class LaunchConfig:
    """Everything about launching engines that is not per model."""

    registry: Registry
    executable: str
    platform: Platform
    budget_gib: float
    run_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    #: The card's real total memory (NVML), which vLLM's utilization share is of; None: the card is the budget.
    card_total_gib: float | None = None

    @property
    def sleep_supported(self) -> bool:
        return self.platform is Platform.CUDA


def build_argv(cfg: LaunchConfig, *, model: ModelSpec, plan: ModelPlan, port: int) -> list[str]:
    """The ``vllm serve`` command line for one registry entry: :func:`engine_args` plus host and port."""
    source, *flags = engine_args(
        cfg.registry, model, plan, platform=cfg.platform, budget_gib=cfg.budget_gib,
        card_total_gib=cfg.card_total_gib,
    )
    return [cfg.executable, "serve", source, "--host", "127.0.0.1", "--port", str(port), *flags]


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

    async def wake_up(self, tags: Sequence[str] = ()) -> None:
        """``POST /wake_up``, all of it or only the pools named by ``tags`` (``weights``, ``kv_cache``).

        vLLM 0.32: ``vllm/entrypoints/serve/dev/sleep/api_router.py`` ``wake_up`` reads repeated ``tags``
        query parameters; the engine serves again only once no pool sleeps (``vllm/v1/engine/core.py``
        ``EngineCore.wake_up``).
        """
        params = httpx.QueryParams([("tags", t) for t in tags])
        r = await self.client.post(f"{self.base_url}/wake_up", params=params, timeout=300)
        r.raise_for_status()

    async def collective_rpc(self, method: str, timeout_s: float = 600) -> None:
        """``POST /collective_rpc {"method": ...}``: call a method on every worker.

        vLLM 0.32: ``vllm/entrypoints/serve/dev/rpc/api_router.py``, ``collective_rpc``.
        """
        r = await self.client.post(f"{self.base_url}/collective_rpc", json={"method": method}, timeout=timeout_s)
        r.raise_for_status()

    async def reset_prefix_cache(self) -> None:
        """``POST /reset_prefix_cache`` (``vllm/entrypoints/serve/dev/cache/api_router.py``): cached KV is stale."""
        r = await self.client.post(f"{self.base_url}/reset_prefix_cache", timeout=60)
        r.raise_for_status()

    async def fingerprint(self, served_name: str, timeout_s: float = 60.0) -> tuple[int, ...]:
        """The token ids a fixed token-id prompt gives, greedy: the same weights give the same ids.

        ``return_token_ids`` makes vLLM 0.32 put the output ids in ``choices[0].token_ids``
        (``vllm/entrypoints/openai/completion/protocol.py`` / ``serving.py``).
        """
        body = {"model": served_name, "prompt": list(FINGERPRINT_PROMPT), "max_tokens": FINGERPRINT_TOKENS,
                "temperature": 0, "return_token_ids": True}
        r = await self.client.post(f"{self.base_url}/v1/completions", json=body, timeout=timeout_s)
        if r.status_code != 200:
            raise NotReady(f"fingerprint probe answered {r.status_code}: {r.text[:300]}")
        try:
            ids = r.json()["choices"][0]["token_ids"]
            return tuple(int(i) for i in ids)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise NotReady(f"fingerprint probe: no token ids in the answer: {r.text[:300]}") from e

    async def is_sleeping(self) -> bool:
        r = await self.client.get(f"{self.base_url}/is_sleeping", timeout=10)
        r.raise_for_status()
        return bool(r.json().get("is_sleeping"))

    async def load_lora(self, name: str, path: str, *, inplace: bool = False) -> tuple[int, str]:
        body: dict[str, object] = {"lora_name": name, "lora_path": path}
        if inplace:  # replace a loaded adapter's weights (vllm/entrypoints/serve/lora/protocol.py)
            body["load_inplace"] = True
        r = await self.client.post(f"{self.base_url}/v1/load_lora_adapter", json=body, timeout=120)
        return r.status_code, r.text

    async def unload_lora(self, name: str) -> tuple[int, str]:
        r = await self.client.post(f"{self.base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        return r.status_code, r.text

    async def metrics_text(self, timeout_s: float = 5.0) -> str:
        r = await self.client.get(f"{self.base_url}/metrics", timeout=timeout_s)
        r.raise_for_status()
        return r.text
