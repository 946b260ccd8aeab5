"""A simulated GPU shared by stand-in engines (and a fake trainer), following vLLM 0.32's memory rules.

The card is a small JSON ledger guarded by ``fcntl.flock``: its total memory, a temperature and power
reading, and one entry per process holding memory (pid, what it holds on the card and in host RAM).
An entry whose process has died is dropped on the next read, as the driver frees a dead process's
memory. The fake NVML (``tests/fakes/fake_nvml/pynvml.py``) reads the same ledger, so the gateway's
real NVML code sees this card.

::

    ledger = Ledger.create(tmp_path / "card.json", total_gib=24)        # the test makes the card
    # a stand-in started with STANDIN_SIMCARD=<ledger path> joins it (see tests/fakes/standin_engine.py):
    sim = SimEngine.start(ledger, model_dir="/models/llama-8b", flags=["--kv-cache-memory-bytes", "4294967296",
                          "--gpu-memory-utilization", "0.5880"], served_name="llama-8b")
    sim.sleep(2); sim.wake(["weights"]); sim.reload_weights(); sim.wake(["kv_cache"])

Each rule names the vLLM 0.32 source it was read from:

- start-up check: free memory >= ``gpu_memory_utilization x total``, with vLLM's error text
  (``vllm/v1/worker/utils.py`` ``request_memory``, called from ``vllm/v1/worker/gpu_worker.py``
  ``Worker.init_device``); default utilization 0.92 (``vllm/config/cache.py``).
- weights are loaded first, less ``--cpu-offload-gb`` GiB kept in host RAM (``vllm/config/offload.py``
  ``cpu_offload_gb``; ``vllm/model_executor/offloader/base.py``: ``cpu_offload_gb * 1024**3`` bytes);
  CUDA OOM when the card cannot hold them (``gpu_worker.py`` ``Worker.load_model``).
- the KV pool is exactly ``--kv-cache-memory-bytes`` when given (``gpu_worker.py``
  ``Worker.determine_available_memory``); otherwise requested memory less weights and runtime, and
  "No available memory for the cache blocks" when that is not positive
  (``vllm/v1/core/kv_cache_utils.py`` ``_check_enough_kv_cache_memory``).
- ``--quantization`` must equal the checkpoint's ``quantization_config.quant_method`` unless a method
  registers itself as an override of it (``vllm/config/model.py`` ``ModelConfig._verify_quantization``;
  AWQ: ``vllm/model_executor/layers/quantization/auto_awq.py``, GPTQ: ``auto_gptq.py``,
  ``override_quantization_method``); an unquantized checkpoint takes any method (online quantization).
- sleep: level 1 offloads the ``weights`` pool to host RAM, level 2 discards it; the KV cache and the
  runtime pools are released at every level (``vllm/device_allocator/sleep_mode_backend.py``
  ``CuMemBackend.suspend``; ``vllm/v1/worker/gpu_worker.py`` ``Worker.sleep``, which keeps only the
  model's buffers at level 2).
- wake by tags ``weights`` / ``kv_cache`` (``vllm/v1/executor/abstract.py`` ``SLEEP_TAGS``,
  ``Executor.wake_up``); the engine serves again only when no tag sleeps (``vllm/v1/engine/core.py``
  ``EngineCore.wake_up``). Weights woken after level 2 are garbage until ``reload_weights``
  (``gpu_worker.py`` ``Worker.reload_weights``, reached by ``POST /collective_rpc``,
  ``vllm/entrypoints/serve/dev/rpc/api_router.py``); LoRA slots likewise until reloaded in place.
- the CUDA context and NCCL buffers, which lie outside vLLM's pools, are not modelled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
ENV_LEDGER = "STANDIN_SIMCARD"
ENV_SKIP_RELOAD = "STANDIN_SKIP_RELOAD"
#: The file beside a model's config.json that gives the stand-in the planner's figures for that model.
SIDECAR = "simcard.json"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vllm/config/cache.py, CacheConfig.gpu_memory_utilization
DEVICE = "cuda:0"
#: vllm/v1/executor/abstract.py, SLEEP_TAGS
SLEEP_TAGS = ("weights", "kv_cache")
#: Methods that override a checkpoint's quant_method, and the user values they accept
#: (auto_awq.py / auto_gptq.py, override_quantization_method).
OVERRIDES: dict[str, tuple[str, tuple[str, ...]]] = {
    "awq": ("auto_awq", ("awq", "awq_marlin", "auto_awq", "marlin")),
    "gptq": ("auto_gptq", ("gptq", "gptq_marlin", "auto_gptq", "marlin")),
}


def format_gib(b: float) -> str:
    """vllm/utils/mem_utils.py, format_gib."""
    return f"{round(b / GIB, 2)}"


class StartRefused(Exception):
    """vLLM refuses to start; ``lines`` are the log lines it prints (the last one names the cause)."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[-1])
        self.lines = lines


class CudaOutOfMemory(StartRefused):
    pass


def oom_text(*, tried: int, total: int, free: int, this_process: int) -> str:
    """PyTorch's CUDA out-of-memory message, as vLLM's log shows it."""
    return (
        f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {format_gib(tried)} GiB. GPU 0 has a "
        f"total capacity of {format_gib(total)} GiB of which {format_gib(free)} GiB is free. Including non-PyTorch "
        f"memory, this process has {format_gib(this_process)} GiB memory in use."
    )


def request_memory(*, free: int, total: int, utilization: float) -> int:
    """vllm/v1/worker/utils.py, request_memory: the bytes the engine may use, or vLLM's refusal."""
    requested = math.ceil(total * utilization)
    if free < requested:
        raise StartRefused(
            f"ValueError: Free memory on device {DEVICE} ({format_gib(free)}/{format_gib(total)} GiB) on startup "
            f"is less than desired GPU memory utilization ({utilization}, {format_gib(requested)} GiB). Decrease "
            "GPU memory utilization or reduce GPU memory used by other processes."
        )
    return requested


def verify_quantization(quant_cfg: dict[str, Any] | None, user: str | None) -> str | None:
    """vllm/config/model.py, ModelConfig._verify_quantization: the method vLLM will use, or its refusal."""
    if quant_cfg is None:
        return user  # an unquantized checkpoint: online quantization, if any
    method = str(quant_cfg.get("quant_method", "")).lower()
    override = OVERRIDES.get(method)
    if override is not None and (user is None or user in override[1]):
        return override[0]
    method_or_none = method or None
    if user is None or user == method_or_none:
        return method_or_none
    raise StartRefused(
        f"ValueError: Quantization method specified in the model config ({method_or_none}) does not match the "
        f"quantization method specified in the `quantization` argument ({user})."
    )


# --- the ledger ------------------------------------------------------------------------------------------


@dataclass
class Holder:
    """One process's memory: on the card (``weights + kv + runtime``) and in host RAM (``host``)."""

    pid: int
    kind: str  # "engine" or "trainer"
    name: str
    weights: int = 0
    kv: int = 0
    runtime: int = 0
    host: int = 0
    sleeping: list[str] = field(default_factory=list)  # tags asleep
    parked: dict[str, int] = field(default_factory=dict)  # weights / kv / runtime bytes while asleep
    weights_valid: bool = True
    stale_adapters: list[str] = field(default_factory=list)

    @property
    def on_card(self) -> int:
        return self.weights + self.kv + self.runtime


@dataclass
class Card:
    total: int
    name: str = "NVIDIA GeForce RTX 4090 (simulated)"
    temperature_c: float = 52.0
    power_w: float = 95.0
    holders: dict[int, Holder] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(h.on_card for h in self.holders.values())

    @property
    def free(self) -> int:
        return self.total - self.used


def _alive(pid: int) -> bool:
    """A process that still holds memory: not gone, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Ledger:
    """The card on disk; every change is one locked read-modify-write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def create(cls, path: str | Path, *, total_gib: float, **readings: Any) -> Ledger:
        ledger = cls(path)
        with ledger.transaction() as card:
            card.total = int(total_gib * GIB)
            for key, value in readings.items():
                setattr(card, key, value)
        return ledger

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Card]:
        with self.lock_path.open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            card = self._load()
            yield card
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(_dump(card)))
            os.replace(tmp, self.path)

    def read(self) -> Card:
        with self.lock_path.open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return self._load()

    def _load(self) -> Card:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Card(total=0)
        holders = {int(pid): Holder(**h) for pid, h in raw.pop("holders", {}).items()}
        card = Card(**raw)
        card.holders = {pid: h for pid, h in holders.items() if _alive(pid)}
        return card


def _dump(card: Card) -> dict[str, Any]:
    data = asdict(card)
    data["holders"] = {str(pid): asdict(h) for pid, h in card.holders.items()}
    return data


# --- a trainer's share ---------------------------------------------------------------------------------------


def hold(ledger: Ledger, *, pid: int, name: str, nbytes: int) -> None:
    """Take ``nbytes`` of the card for a process that is not an engine (a fine-tune); CUDA OOM if they are not free."""
    with ledger.transaction() as card:
        if card.free < nbytes:
            raise CudaOutOfMemory(oom_text(tried=nbytes, total=card.total, free=card.free, this_process=0))
        card.holders[pid] = Holder(pid=pid, kind="trainer", name=name, runtime=nbytes)


# --- an engine's share ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryFlags:
    """The ``vllm serve`` flags that decide memory, as vLLM reads them."""

    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    kv_cache_memory_bytes: int | None = None
    cpu_offload_gb: float = 0.0
    quantization: str | None = None

    @classmethod
    def parse(cls, flags: Sequence[str]) -> MemoryFlags:
        import argparse

        p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION)
        p.add_argument("--kv-cache-memory-bytes", type=_bytes, default=None)
        p.add_argument("--cpu-offload-gb", type=float, default=0.0)
        p.add_argument("--quantization", "-q", default=None)
        ns, _ = p.parse_known_args(list(flags))
        return cls(ns.gpu_memory_utilization, ns.kv_cache_memory_bytes, ns.cpu_offload_gb, ns.quantization)


def _bytes(text: str) -> int:
    """vLLM's human-readable byte figures: 64M, 4G, 1073741824 (binary multiples, as vLLM parses them)."""
    text = text.strip()
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


@dataclass(frozen=True)
class ModelFigures:
    """What the model takes on the card before offload, from the sidecar the test writes beside config.json."""

    weights_bytes: int
    runtime_bytes: int
    quant_cfg: dict[str, Any] | None

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelFigures:
        folder = Path(model_dir)
        sidecar = json.loads((folder / SIDECAR).read_text())
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        return cls(int(sidecar["weights_bytes"]), int(sidecar["runtime_bytes"]), config.get("quantization_config"))


class SimEngine:
    """One stand-in engine's share of the simulated card."""

    def __init__(self, ledger: Ledger, pid: int, *, skip_reload: bool = False) -> None:
        self.ledger = ledger
        self.pid = pid
        self.skip_reload = skip_reload
        self.host_offload = 0
        # what the ledger says too, kept here so that answering a request reads no file
        self.weights_valid = True
        self.stale_adapters: set[str] = set()

    @classmethod
    def start(
        cls,
        ledger: Ledger,
        *,
        model_dir: str | Path,
        flags: Sequence[str],
        served_name: str,
        pid: int | None = None,
        skip_reload: bool = False,
    ) -> SimEngine:
        """vLLM's start-up order: verify quantization, check free memory, load weights, allocate the KV pool."""
        pid = os.getpid() if pid is None else pid
        f = MemoryFlags.parse(flags)
        figures = ModelFigures.read(model_dir)
        verify_quantization(figures.quant_cfg, f.quantization)
        offload = min(figures.weights_bytes, int(f.cpu_offload_gb * GIB))
        weights = figures.weights_bytes - offload
        with ledger.transaction() as card:
            requested = request_memory(free=card.free, total=card.total, utilization=f.gpu_memory_utilization)
            if weights > card.free:
                raise CudaOutOfMemory(oom_text(tried=weights, total=card.total, free=card.free, this_process=0))
            if f.kv_cache_memory_bytes is not None:
                kv = f.kv_cache_memory_bytes
            else:
                kv = requested - weights - figures.runtime_bytes
                if kv <= 0:
                    raise StartRefused(
                        "ValueError: No available memory for the cache blocks. Try increasing "
                        "`gpu_memory_utilization` when initializing the engine (this flag also controls CPU memory "
                        "reservation on the CPU backend, despite its name). See "
                        "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
                    )
            rest = kv + figures.runtime_bytes
            if weights + rest > card.free:
                raise CudaOutOfMemory(
                    oom_text(tried=rest, total=card.total, free=card.free - weights, this_process=weights)
                )
            card.holders[pid] = Holder(
                pid=pid,
                kind="engine",
                name=served_name,
                weights=weights,
                kv=kv,
                runtime=figures.runtime_bytes,
                host=offload,
            )
        sim = cls(ledger, pid, skip_reload=skip_reload)
        sim.host_offload = offload
        return sim

    def holder(self) -> Holder:
        h = self.ledger.read().holders.get(self.pid)
        if h is None:
            raise RuntimeError(f"pid {self.pid} holds nothing on the simulated card")
        return h

    def sleep(self, level: int, *, adapters: Sequence[str] = ()) -> tuple[int, int]:
        """Free the pools; returns (freed bytes, bytes still used on the card), as vLLM logs them."""
        with self.ledger.transaction() as card:
            h = card.holders[self.pid]
            if h.sleeping:
                return 0, card.used
            freed = h.on_card
            h.parked = {"weights": h.weights, "kv": h.kv, "runtime": h.runtime}
            h.sleeping = list(SLEEP_TAGS)
            h.host = self.host_offload + (h.weights if level == 1 else 0)
            if level >= 2:
                self.weights_valid = False
                self.stale_adapters |= set(adapters)
                h.weights_valid, h.stale_adapters = False, sorted(self.stale_adapters)
            h.weights = h.kv = h.runtime = 0
            return freed, card.used

    def wake(self, tags: Sequence[str] | None) -> bool:
        """Bring tagged pools back to the card; True when fully awake. CudaOutOfMemory when they do not fit."""
        wanted = [t for t in (tags or SLEEP_TAGS) if t in SLEEP_TAGS]
        with self.ledger.transaction() as card:
            h = card.holders[self.pid]
            waking = [t for t in wanted if t in h.sleeping]
            back = {
                "weights": h.parked.get("weights", 0),
                "kv_cache": h.parked.get("kv", 0) + h.parked.get("runtime", 0),
            }
            need = sum(back[t] for t in waking)
            if need > card.free:
                raise CudaOutOfMemory(oom_text(tried=need, total=card.total, free=card.free, this_process=h.on_card))
            if "weights" in waking:
                h.weights = h.parked.get("weights", 0)
                h.host = self.host_offload
            if "kv_cache" in waking:
                h.kv, h.runtime = h.parked.get("kv", 0), h.parked.get("runtime", 0)
            h.sleeping = [t for t in h.sleeping if t not in waking]
            return not h.sleeping

    def reload_weights(self) -> None:
        """``collective_rpc("reload_weights")``: the checkpoint read again into the woken weights pool."""
        if self.skip_reload:
            return
        with self.ledger.transaction() as card:
            h = card.holders[self.pid]
            if "weights" in h.sleeping:
                raise RuntimeError("reload_weights: the weights pool is asleep; wake it with tags=weights first")
            h.weights_valid = self.weights_valid = True

    def adapter_reloaded(self, name: str) -> None:
        with self.ledger.transaction() as card:
            h = card.holders[self.pid]
            self.stale_adapters.discard(name)
            h.stale_adapters = sorted(self.stale_adapters)

    def garbage(self, served: str) -> bool:
        """Whether answers under ``served`` (the model or an adapter) come from discarded weights."""
        return not self.weights_valid or served in self.stale_adapters
