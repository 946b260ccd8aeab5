"""Load and validate ``model_registry.yaml`` into frozen, typed specs.

The registry is the one file a lab edits. Every problem in it is reported as a
:class:`RegistryError` whose message names the file, the model, the field and the fix::

    >>> reg = load_registry("model_registry.yaml")
    >>> reg.resolve("judge").name
    'llama-3.1-70b-awq'

Validation happens in two passes: pydantic checks shapes and types (unknown keys are
errors, with a "did you mean"), then :func:`_check_semantics` checks what spans fields and
models (duplicate names, adapters on a base without LoRA, ranks, paths, context limits).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


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


class RegistryError(ValueError):
    """One or more problems in a registry file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


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


class LoraSpec(_Strict):
    """Runtime LoRA settings of a base model; adapters map a served name to a folder or hub id."""

    enabled: bool = False
    max_rank: Annotated[int, Field(gt=0)] = 16
    max_loras: Annotated[int, Field(gt=0)] = 4
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    watch_dirs: tuple[str, ...] = ()


class AdapterSpec(_Strict):
    path: str
    rank: Annotated[int, Field(gt=0)] | None = None


class ModelSpec(_Strict):
    """One registered model: where its weights are, how to run it, how to plan it."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    source: str
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

    @field_validator("quantization", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

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
    max_queue: Annotated[int, Field(gt=0)] = 256
    keepalive_s: Annotated[float, Field(gt=0)] = 15.0


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

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def names(self) -> dict[str, Target]:
        """Every name a client may use: models, aliases and adapters."""
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


# --- loading ---------------------------------------------------------------------------------------


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file; raise :class:`RegistryError` listing every problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RegistryError([f"{p}: cannot read the registry ({e.strerror}); pass an existing file"]) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RegistryError([f"{p}: not valid YAML: {e}"]) from e
    return parse_registry(data, path=p)


def parse_registry(data: Any, *, path: Path) -> Registry:
    if not isinstance(data, Mapping):
        raise RegistryError([f"{path}: the registry must be a mapping with a 'models' list"])
    try:
        raw = RegistryFile.model_validate(data)
    except ValidationError as e:
        raise RegistryError([_explain(path, data, err) for err in e.errors()]) from e
    problems, warnings = _check_semantics(path, raw)
    if problems:
        raise RegistryError(problems)
    for w in warnings:
        log.warning(w)
    return Registry(
        path=path.resolve(),
        gpu=raw.gpu,
        vllm=raw.vllm,
        scheduler=raw.scheduler,
        models=raw.models,
        warnings=tuple(warnings),
    )


_FIXES: dict[str, str] = {
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string",
    "missing": "add it",
    "greater_than": "use a positive value",
    "greater_than_equal": "use a value that is not negative",
    "string_pattern_mismatch": "use letters, digits and . _ : - (starting with a letter or digit)",
    "dict_type": "write a mapping (key: value)",
    "tuple_type": "write a list",
    "model_type": "write a mapping (key: value)",
}


def _where(path: Path, data: Any, loc: tuple[int | str, ...]) -> tuple[str, str]:
    """Turn a pydantic location into ('model X' or 'top level', 'dotted.field')."""
    scope = "top level"
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "models" and isinstance(parts[1], int):
        idx = parts[1]
        models = data.get("models") if isinstance(data, Mapping) else None
        name = None
        if isinstance(models, list) and idx < len(models) and isinstance(models[idx], Mapping):
            name = models[idx].get("name")
        scope = f"model {name!r}" if name else f"model #{idx + 1}"
        parts = parts[2:]
    field = ".".join(str(x) for x in parts if not str(x).startswith(("function-", "literal[")))
    return scope, field or "(entry)"


def _allowed_keys(loc: tuple[int | str, ...]) -> Iterable[str]:
    model: type[BaseModel] = RegistryFile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return ()
        ann = field.annotation
        inner = _find_model(ann)
        if inner is None:
            return ()
        model = inner
    return model.model_fields.keys()


def _find_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _explain(path: Path, data: Any, err: Any) -> str:
    loc = tuple(err["loc"])
    scope, field = _where(path, data, loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        near = difflib.get_close_matches(key, list(_allowed_keys(loc)), n=1, cutoff=0.6)
        hint = f"did you mean '{near[0]}'?" if near else "remove it (see the comments in model_registry.yaml)"
        return f"{path}: {scope}: unknown key '{field}'; {hint}"
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: {scope}: field '{field}' has {err.get('input')!r}; use one of {expected}"
    fix = _FIXES.get(kind, "see the comments in model_registry.yaml")
    got = err.get("input")
    shown = "" if kind == "missing" else f" (got {got!r})"
    return f"{path}: {scope}: field '{field}': {err['msg'].lower()}{shown}; {fix}"


def _check_semantics(path: Path, reg: RegistryFile) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    owner: dict[str, str] = {}

    def claim(name: str, who: str, field: str) -> None:
        if name in owner:
            problems.append(
                f"{path}: model {who!r}: field '{field}': the name {name!r} is already used by {owner[name]}; "
                "every model, alias and adapter name must be unique"
            )
        else:
            owner[name] = f"model {who!r}" if field == "name" else f"{field} of model {who!r}"

    for m in reg.models:
        claim(m.name, m.name, "name")
    for m in reg.models:
        for a in m.aliases:
            claim(a, m.name, "aliases")
        for ad in m.lora.adapters:
            if not re.match(NAME_PATTERN, ad):
                problems.append(
                    f"{path}: model {m.name!r}: field 'lora.adapters': adapter name {ad!r} is not valid; "
                    "use letters, digits and . _ : - (no slashes)"
                )
            claim(ad, m.name, "lora.adapters")

    if reg.gpu.budget_gib != "auto" and reg.gpu.headroom_gib >= reg.gpu.budget_gib:
        problems.append(
            f"{path}: top level: field 'gpu.headroom_gib' ({reg.gpu.headroom_gib}) leaves no room in "
            f"'gpu.budget_gib' ({reg.gpu.budget_gib}); lower the headroom or raise the budget"
        )

    for m in reg.models:
        where = f"{path}: model {m.name!r}"
        if m.quantization is Quantization.AWQ:
            warnings.append(
                f"{where}: quantization 'awq' is planned and launched as 'awq_marlin' "
                "(the legacy AWQ kernel halves throughput on Ada); write awq_marlin to silence this"
            )
        if m.lora.adapters and not m.lora.enabled:
            problems.append(
                f"{where}: field 'lora.adapters': adapters are listed but LoRA is not enabled on this base; "
                "set 'lora.enabled: true'"
            )
        for ad_name, ad in m.lora.adapters.items():
            if ad.rank is not None and ad.rank > m.lora.max_rank:
                problems.append(
                    f"{where}: field 'lora.adapters.{ad_name}.rank': rank {ad.rank} is above the base's "
                    f"'lora.max_rank' ({m.lora.max_rank}); raise lora.max_rank to at least {ad.rank}"
                )
            if _is_local(ad.path) and not _local(path, ad.path).exists():
                problems.append(
                    f"{where}: field 'lora.adapters.{ad_name}.path': {ad.path!r} does not exist; "
                    "fix the path or remove the adapter"
                )
        if _is_local(m.source) and not _local(path, m.source).exists():
            problems.append(
                f"{where}: field 'source': local path {m.source!r} does not exist; "
                "fix the path or use a hub id like 'org/model'"
            )
        arch = m.architecture or _arch_from_local(path, m.source)
        if arch is None and m.params_b is None:
            problems.append(
                f"{where}: field 'architecture': the planner needs the model's figures; add an "
                "'architecture' block (from its config.json) or 'params_b', or point 'source' at a local folder"
            )
        if arch is not None and arch.max_position_embeddings and m.max_model_len > arch.max_position_embeddings:
            problems.append(
                f"{where}: field 'max_model_len': {m.max_model_len} is above the model's limit "
                f"({arch.max_position_embeddings}); use at most {arch.max_position_embeddings}"
            )
        if arch is not None and arch.num_attention_heads % arch.num_key_value_heads:
            problems.append(
                f"{where}: field 'architecture.num_key_value_heads': {arch.num_key_value_heads} does not "
                f"divide num_attention_heads ({arch.num_attention_heads}); copy both from config.json"
            )
    return problems, warnings


def _is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def _local(registry_path: Path, source: str) -> Path:
    p = Path(source).expanduser()
    return p if p.is_absolute() else registry_path.parent / p


def _arch_from_local(registry_path: Path, source: str) -> Architecture | None:
    if not _is_local(source):
        return None
    return architecture_from_config(_local(registry_path, source) / "config.json")


def architecture_from_config(config_path: Path) -> Architecture | None:
    """Read the figures the planner needs from a Hugging Face ``config.json``; None if absent."""
    import json

    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    keys = Architecture.model_fields.keys()
    picked = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    picked.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    if "num_local_experts" not in picked and cfg.get("num_experts"):
        picked["num_local_experts"] = cfg["num_experts"]
    try:
        return Architecture.model_validate(picked)
    except ValidationError:
        return None


def model_architecture(registry: Registry, model: ModelSpec) -> Architecture | None:
    """The declared architecture, else the one read from a local ``config.json``."""
    return model.architecture or _arch_from_local(registry.path, model.source)


LoraSpec.model_rebuild()
