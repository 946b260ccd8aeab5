"""The LoRA adapters loaded in one running engine, loaded and unloaded through vLLM's runtime routes.

vLLM loads an adapter at runtime with ``POST /v1/load_lora_adapter`` and answers 400 "already loaded"
for a name it has (vllm/entrypoints/serve/lora/api_router.py, ``load_lora_adapter``); both count as loaded.
"""

from __future__ import annotations

import asyncio

import httpx

from engines.errors import EngineError
from engines.vllm import VllmApi


class LoadedAdapters:
    """Names and paths of the adapters one engine holds; one load or unload at a time."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.names: set[str] = set()
        self.paths: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def preloaded(self, paths: dict[str, str]) -> None:
        """A new process starts with these (``--lora-modules``)."""
        self.paths = dict(paths)
        self.names = set(paths)

    def loaded_paths(self) -> dict[str, str]:
        """Adapter name -> path for every loaded adapter whose path is known, sorted by name."""
        return {a: self.paths[a] for a in sorted(self.names) if a in self.paths}

    async def ensure(self, api: VllmApi, name: str, path: str) -> None:
        if name in self.names:
            return
        async with self._lock:
            if name in self.names:
                return
            try:
                status, body = await api.load_lora(name, path)
            except httpx.HTTPError as e:
                raise EngineError(f"model {self.model}: loading adapter {name!r} failed: the engine did not "
                                  f"answer ({type(e).__name__})", model=self.model) from e
            if status == 200 or (status == 400 and "already" in body.lower()):
                self.names.add(name)
                self.paths[name] = path
                return
            raise EngineError(f"model {self.model}: loading adapter {name!r} failed ({status}): {body[:300]}",
                              model=self.model)

    async def unload(self, api: VllmApi, name: str) -> None:
        async with self._lock:
            if name not in self.names:
                return
            await api.unload_lora(name)
            self.names.discard(name)
