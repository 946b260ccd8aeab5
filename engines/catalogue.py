"""The adapter catalogue: the registry's names, aliases and adapters, plus adapters found on disk.

Folders named in a model's ``lora.watch_dirs`` are scanned off the event loop every ``scan_s`` seconds
(:func:`engines.adapters.scan_adapters`); a new folder becomes a servable name, a vanished one is unloaded
from its running engine::

    catalogue = AdapterCatalogue(registry)
    await catalogue.rescan(unload=unload_from_engine)
    catalogue.resolve("my-lora")          # Target(model=<base spec>, adapter='my-lora') or None
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engines.adapters import FoundAdapter, scan_adapters
from engines.aio import logged
from engines.registry import Registry, Target

log = logging.getLogger(__name__)

#: Unload an adapter (name) from its base model's running engine (model), if it is loaded there.
Unload = Callable[[str, str], Awaitable[None]]


class AdapterCatalogue:
    def __init__(self, registry: Registry, *, scan_s: float = 2.0) -> None:
        self.registry = registry
        self.scan_s = scan_s
        self.discovered: dict[str, FoundAdapter] = {}
        self.problems: dict[str, str] = {}

    @property
    def watching(self) -> bool:
        return any(m.lora.watch_dirs for m in self.registry.models)

    def resolve(self, name: str) -> Target | None:
        """A registry name, alias or adapter, else a discovered adapter, else None."""
        try:
            return self.registry.resolve(name)
        except KeyError:
            found = self.discovered.get(name)
            return Target(self.registry.model(found.base), name) if found else None

    def names(self) -> list[str]:
        return [*self.registry.names(), *self.discovered]

    def path(self, target: Target) -> str:
        """Where ``target``'s adapter lives: a discovered folder, or the registry's path."""
        assert target.adapter is not None
        found = self.discovered.get(target.adapter)
        if found is not None and target.adapter not in target.model.lora.adapters:
            return str(found.path)
        return self.registry.locate(target.model.lora.adapters[target.adapter].path)

    async def rescan(self, unload: Unload) -> None:
        found, problems = await asyncio.to_thread(scan_adapters, self.registry)
        for name in found.keys() - self.discovered.keys():
            log.info("adapter %s discovered for %s at %s", name, found[name].base, found[name].path)
        for path, why in problems.items():
            if self.problems.get(path) != why:
                log.warning("adapter folder %s is not usable: %s", path, why)
        for name in self.discovered.keys() - found.keys():
            log.info("adapter %s is gone from disk", name)
            try:
                await unload(self.discovered[name].base, name)
            except Exception as e:  # the engine may be gone or busy; the adapter is no longer offered anyway
                logged(e, f"unloading vanished adapter {name}", logger=log)
        self.discovered, self.problems = found, problems

    async def watch(self, unload: Unload) -> None:
        """Rescan every ``scan_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.scan_s)
            try:
                await self.rescan(unload)
            except Exception:
                log.exception("adapter scan failed")
