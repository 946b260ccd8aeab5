"""Proving an engine's weights after a wake: vLLM's full level-2 sequence, then a greedy fingerprint.

At sleep level 2 vLLM discards the weights (``vllm/v1/worker/gpu_worker.py``, ``Worker.sleep`` keeps only
the model's buffers); ``/wake_up`` gives the pool back but not its contents, and the engine then answers
with garbage, without an error. So a wake is proven by what the engine says, not by "it answered": a
fixed token-id prompt, greedy, must give the ids it gave when the engine first became ready.

::

    prints = Fingerprints()
    prints.record("llama-8b", await api.fingerprint("llama-8b"))     # when the engine became ready
    ...
    await restore(api, discarded=True, adapters={"domain-r16": "/adapters/domain-r16"})
    await prints.verify(api)                                           # WeightsMismatch if it differs
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engines.vllm import VllmApi


class WeightsMismatch(Exception):
    """The engine's answers after a wake differ from those it gave when it became ready."""

    def __init__(self, served: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(
            f"{served}: the fingerprint probe gave token ids {list(got)} after the wake, "
            f"{list(expected)} before: the weights are not the ones it was started with"
        )
        self.served = served


class AdapterReloadFailed(Exception):
    pass


@dataclass
class Fingerprints:
    """Greedy token ids per served name (the model, or a LoRA adapter on it)."""

    ids: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def record(self, served: str, ids: tuple[int, ...]) -> None:
        self.ids[served] = ids

    def forget(self, served: str) -> None:
        self.ids.pop(served, None)

    async def take(self, api: VllmApi, served: str) -> None:
        self.record(served, await api.fingerprint(served))

    async def verify(self, api: VllmApi) -> None:
        """Probe every recorded name; the first difference raises :class:`WeightsMismatch`.

        The probe is also the wake's warm-up request.
        """
        for served, expected in self.ids.items():
            got = await api.fingerprint(served)
            if got != expected:
                raise WeightsMismatch(served, expected, got)


async def restore(api: VllmApi, *, discarded: bool, adapters: Mapping[str, str]) -> None:
    """Wake an engine; where its weights were discarded (level 2), run vLLM's whole sequence.

    vLLM 0.32's order for weights dropped at level 2: wake the ``weights`` pool alone
    (``vllm/entrypoints/serve/dev/sleep/api_router.py`` ``wake_up?tags=weights``), read the checkpoint
    into it (``POST /collective_rpc {"method": "reload_weights"}``, ``vllm/entrypoints/serve/dev/rpc/
    api_router.py``, reaching ``vllm/v1/worker/gpu_worker.py`` ``Worker.reload_weights``), then wake the
    ``kv_cache`` pool (the engine schedules again only once no pool sleeps: ``vllm/v1/engine/core.py``
    ``EngineCore.wake_up``), and drop prefix-cache entries computed with the old weights
    (``POST /reset_prefix_cache``, ``vllm/entrypoints/serve/dev/cache/api_router.py``). LoRA adapters
    lived in the discarded pool too: each is loaded again in place (``load_inplace``).
    """
    if not discarded:
        await api.wake_up()
        return
    await api.wake_up(("weights",))
    await api.collective_rpc("reload_weights")
    await api.wake_up(("kv_cache",))
    await api.reset_prefix_cache()
    for name, path in adapters.items():
        status, body = await api.load_lora(name, path, inplace=True)
        if status != 200:
            raise AdapterReloadFailed(f"reloading adapter {name!r} after the wake failed ({status}): {body[:300]}")
