"""The registry's schema: frozen pydantic specs of the file, and the validated :class:`Registry`.

Every spec refuses unknown keys (``extra="forbid"``) and is immutable once read::

    >>> spec = ModelSpec(name="tiny", source="org/tiny", max_model_len=4096, quantization="AWQ")
    >>> spec.quantization, spec.effective_quantization
    (<Quantization.AWQ: 'awq'>, <Quantization.AWQ_MARLIN: 'awq_marlin'>)
    >>> is_local("./models/tiny"), is_local("org/tiny")
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines.checkpoints import CheckpointQuantMethod, CheckpointRead

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


def is_local(source: str) -> bool:
    """Whether a source or adapter path names a local folder rather than a hub id."""
    return source.startswith(("/", "./", "../", "~"))


class Quantization(StrEnum):
    """Weight formats the planner knows how to size."""

    NONE = "none"
    FP8 = "fp8"
    AWQ = "awq"
    AWQ_MARLIN = "awq_marlin"
    GPTQ = "gptq"
    GPTQ_MARLIN = "gptq_marlin"
    BITSANDBYTES = "bitsandbytes"


class Platform(StrEnum):
    CUDA = "cuda"
    CPU = "cpu"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Architecture(_Strict):
    """Published architecture figures (as in the model's ``config.json``).

    Needed to size weights and KV cache without downloading anything.
    """

    num_hidden_layers: Annotated[int, Field(gt=0)]
    hidden_size: Annotated[int, Field(gt=0)]
    intermediate_size: Annotated[int, Field(gt=0)]
    num_attention_heads: Annotated[int, Field(gt=0)]
    num_key_value_heads: Annotated[int, Field(gt=0)]
    vocab_size: Annotated[int, Field(gt=0)]
    head_dim: Annotated[int, Field(gt=0)] | None = None
    num_local_experts: Annotated[int, Field(ge=1)] = 1
    tie_word_embeddings: bool = False
    max_position_embeddings: Annotated[int, Field(gt=0)] | None = None

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class AdapterSpec(_Strict):
    """A LoRA adapter: loaded at runtime on first use, or at engine start with ``preload: true``."""

    path: Annotated[str, Field(min_length=1)]
    rank: Annotated[int, Field(gt=0)] | None = None
    preload: bool = False


class LoraSpec(_Strict):
    """Runtime LoRA settings of a base model; adapters map a served name to a folder or hub id."""

    enabled: bool = False
    max_rank: Annotated[int, Field(gt=0)] = 16
    max_loras: Annotated[int, Field(gt=0)] = 4
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    watch_dirs: tuple[str, ...] = ()


class ModelSpec(_Strict):
    """One registered model: where its weights are, how to run it, how to plan it."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    source: Annotated[str, Field(min_length=1)]
    aliases: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = ()
    quantization: Quantization = Quantization.NONE
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "float16", "bfloat16", "float32"] = "auto"
    max_model_len: Annotated[int, Field(gt=0)]
    concurrent_seqs: Annotated[int, Field(gt=0)] = 1
    architecture: Architecture | None = None
    params_b: Annotated[float, Field(gt=0)] | None = None
    cpu_offload_gib: Annotated[float, Field(ge=0)] = 0.0
    enable_prefix_caching: bool = True
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    pinned: bool = False
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = None
    sleep_level: Literal[0, 1, 2] = 1
    start_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    revision: str | None = None
    checkpoint_quant_method: CheckpointQuantMethod | None = None

    @field_validator("quantization", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        if v is None:  # 'quantization: null' means unquantized
            return Quantization.NONE
        return v.strip().lower() if isinstance(v, str) else v

    @property
    def effective_quantization(self) -> Quantization:
        """``awq`` is planned and launched as ``awq_marlin`` (the legacy kernel is slow on Ada)."""
        if self.quantization is Quantization.AWQ:
            return Quantization.AWQ_MARLIN
        if self.quantization is Quantization.GPTQ:
            return Quantization.GPTQ_MARLIN
        return self.quantization


class GpuSpec(_Strict):
    budget_gib: Annotated[float, Field(gt=0)] | Literal["auto"] = 24.0
    headroom_gib: Annotated[float, Field(ge=0)] = 1.0
    platform: Platform = Platform.CUDA
    host_ram_for_sleep_gib: Annotated[float, Field(ge=0)] = 0.0


class VllmSpec(_Strict):
    executable: str = "vllm"
    env: dict[str, str] = Field(default_factory=dict)
    log_dir: str | None = None


class SchedulerSpec(_Strict):
    max_wait_s: Annotated[float, Field(gt=0)] = 60.0
    #: The wait bound of interactive users' requests (capped at max_wait_s, which bounds batch requests).
    interactive_max_wait_s: Annotated[float, Field(gt=0)] = 15.0
    max_queue: Annotated[int, Field(gt=0)] = 256
    keepalive_s: Annotated[float, Field(gt=0)] = 15.0
    policy: Literal["swap-aware", "fifo"] = "swap-aware"


class RegistryFile(_Strict):
    version: Literal[1] = 1
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    models: tuple[ModelSpec, ...]


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` names: a base model, reached directly, by alias or through an adapter."""

    model: ModelSpec
    adapter: str | None = None

    @property
    def served_name(self) -> str:
        return self.adapter or self.model.name


@dataclass(frozen=True)
class Registry:
    """A validated registry. ``path`` is where it was read from (for messages and relative paths)."""

    path: Path
    gpu: GpuSpec
    vllm: VllmSpec
    scheduler: SchedulerSpec
    models: tuple[ModelSpec, ...]
    warnings: tuple[str, ...] = ()
    #: What each local checkpoint's ``config.json`` gave, by source, read once at load (None: unreadable).
    local_architectures: Mapping[str, Architecture | None] = field(default_factory=dict, repr=False, compare=False)
    #: What each local checkpoint's ``config.json`` says of its quantization, by source, read once at load.
    local_quant_methods: Mapping[str, CheckpointRead] = field(default_factory=dict, repr=False, compare=False)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def names(self) -> dict[str, Target]:
        """Every name a client may use: models, aliases and adapters (built once; the registry is frozen)."""
        return self._names

    @cached_property
    def _names(self) -> dict[str, Target]:
        out: dict[str, Target] = {}
        for m in self.models:
            out[m.name] = Target(m)
            for a in m.aliases:
                out[a] = Target(m)
            for adapter in m.lora.adapters:
                out[adapter] = Target(m, adapter)
        return out

    def resolve(self, name: str) -> Target:
        target = self.names().get(name)
        if target is None:
            raise KeyError(name)
        return target

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    def locate(self, source: str) -> str:
        """A local path (``/``, ``./``, ``../``, ``~``) resolved against the registry's folder; a hub id as is."""
        return str(self.resolve_path(source)) if is_local(source) else source
