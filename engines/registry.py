"""Load and validate ``model_registry.yaml`` into frozen, typed specs.

The registry is the one file a lab edits. Every problem in it is reported as a
:class:`RegistryError` whose message names the file, the model, the field and the fix::

    >>> reg = load_registry("model_registry.yaml")
    >>> reg.resolve("judge").name
    'llama-3.1-70b-awq'

Validation happens in three passes, each reporting every problem it finds:

1. YAML: syntax, and a key given twice in one mapping (plain YAML silently keeps the last);
2. pydantic: shapes and types; unknown keys are errors with a "did you mean", and
   :func:`_explain_all` folds pydantic's raw errors into one message per mistake;
3. :func:`_check_semantics`: what spans fields and models (duplicate names, adapters on a base
   without LoRA, ranks, local paths, context limits, vLLM flags the gateway sets itself).

Whether each model can fit on the card is the planner's question: ``engines.planner.check_plan``
adds those problems (``onecard check`` runs both).
"""

from __future__ import annotations

import difflib
import logging
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engines.checkpoints import CheckpointQuantMethod

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

#: The LoRA ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: vLLM flags the gateway sets itself, and the registry field (or component) that owns each.
MANAGED_FLAGS: dict[str, str] = {
    "--model": "source",
    "--served-model-name": "name",
    "--revision": "revision",
    "--quantization": "quantization",
    "-q": "quantization",
    "--dtype": "dtype",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--max-model-len": "max_model_len",
    "--cpu-offload-gb": "cpu_offload_gib",
    "--enable-prefix-caching": "enable_prefix_caching",
    "--no-enable-prefix-caching": "enable_prefix_caching",
    "--enable-lora": "lora.enabled",
    "--max-lora-rank": "lora.max_rank",
    "--max-loras": "lora.max_loras",
    "--lora-modules": "lora.adapters",
    "--enable-sleep-mode": "sleep_level",
    "--gpu-memory-utilization": "the planner (gpu.budget_gib, max_model_len, concurrent_seqs)",
    "--kv-cache-memory-bytes": "the planner (max_model_len x concurrent_seqs)",
    "--host": "the gateway",
    "--port": "the gateway (it picks a free port)",
}


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
    """A LoRA adapter: loaded at runtime on first use, or at engine start with ``preload: true``."""

    path: Annotated[str, Field(min_length=1)]
    rank: Annotated[int, Field(gt=0)] | None = None
    preload: bool = False


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


# --- loading ---------------------------------------------------------------------------------------


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file; raise :class:`RegistryError` listing every problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RegistryError([f"{p}: cannot read the registry ({e.strerror}); pass an existing file"]) from e
    return parse_registry(_load_yaml(p, text), path=p)


def _load_yaml(path: Path, text: str) -> Any:
    """Parse YAML, refusing a key given twice in one mapping (plain YAML silently keeps the last)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(path, node)
        if duplicates:
            raise RegistryError(duplicates)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RegistryError(
            [f"{path}: not valid YAML{at}: {problem}; fix the syntax (indent with spaces, 'key: value')"]
        ) from e
    finally:
        loader.dispose()


def _duplicate_keys(path: Path, root: yaml.Node) -> list[str]:
    problems: list[str] = []

    def check(node: yaml.MappingNode, scope: str, prefix: str) -> None:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{path}: {scope}: field '{prefix}{key}' is given twice (lines {seen[key]} and {line}); "
                    "keep one (YAML would silently use the last)"
                )
            seen.setdefault(key, line)

    def walk(node: yaml.Node, scope: str, prefix: str) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, scope, prefix)
        elif isinstance(node, yaml.MappingNode):
            check(node, scope, prefix)
            for key_node, value_node in node.value:
                walk(value_node, scope, f"{prefix}{key_node.value}.")

    if not isinstance(root, yaml.MappingNode):
        return problems
    check(root, "top level", "")
    for key_node, value_node in root.value:
        if key_node.value == "models" and isinstance(value_node, yaml.SequenceNode):
            for i, item in enumerate(value_node.value):
                walk(item, _node_model_scope(item, i), "")
        else:
            walk(value_node, "top level", f"{key_node.value}.")
    return problems


def _node_model_scope(node: yaml.Node, index: int) -> str:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == "name" and isinstance(v, yaml.ScalarNode) and v.value:
                return f"model {v.value!r}"
    return f"model #{index + 1}"


def parse_registry(data: Any, *, path: Path) -> Registry:
    if not isinstance(data, Mapping):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise RegistryError(
            [f"{path}: top level: the file holds {got}, not a mapping; "
             "write 'gpu:', 'vllm:' and a 'models:' list, as in the shipped model_registry.yaml"]
        )
    try:
        raw = RegistryFile.model_validate(data)
    except ValidationError as e:
        raise RegistryError(_explain_all(path, data, e.errors())) from e
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


#: A fix per pydantic error kind, used when the field has no fix of its own in ``_FIELD_FIXES``.
_FIXES: dict[str, str] = {
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string (quote it if YAML reads it as something else)",
    "string_too_short": "write a non-empty string",
    "missing": "add it",
    "greater_than": "use a positive value",
    "greater_than_equal": "use a value that is not negative",
    "string_pattern_mismatch": "use letters, digits and . _ : - (starting with a letter or digit)",
    "dict_type": "write a mapping (key: value)",
    "tuple_type": "write a list",
    "list_type": "write a list",
    "model_type": "write a mapping (key: value)",
    "model_attributes_type": "write a mapping (key: value)",
}

#: Fixes for fields whose generic fix would not say enough (keys: dotted field below the model or top level).
_FIELD_FIXES: dict[str, str] = {
    "gpu.budget_gib": "use a positive number of GiB (e.g. 24) or 'auto'",
    "gpu.headroom_gib": "use a number of GiB, 0 or more (e.g. 1)",
    "models": "write a list of entries, each starting with '- name: ...'",
    "max_model_len": "write the context length in tokens, e.g. 8192",
    "concurrent_seqs": "write how many full-length sequences the KV cache must hold, e.g. 4",
    "source": "write a hub id like 'org/model' or a local folder like './models/x'",
    "aliases": "write a list of names, e.g. [judge]",
    "extra_args": "write a list of strings, e.g. ['--seed', '0']",
    "lora.adapters": "write a mapping of adapter name -> {path: ..., rank: ...}",
}

#: What pydantic calls a type, in the words of a YAML file.
_KIND_WORDS: dict[str, str] = {
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "missing": "is missing",
}


@dataclass(frozen=True)
class _Loc:
    """A pydantic error location without union-branch tags, and the model that owns its last key."""

    parts: tuple[int | str, ...]
    owner: type[BaseModel] | None

    @property
    def parent(self) -> tuple[int | str, ...]:
        return self.parts[:-1]


def _strip(ann: Any) -> Any:
    """Drop ``Annotated`` and ``| None`` wrappers (pydantic puts no location tag on either)."""
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(ann) if a is not type(None)]
            if len(members) != 1:
                return ann
            ann = members[0]
        else:
            return ann


def _clean_loc(loc: tuple[int | str, ...]) -> _Loc:
    """Walk the schema along ``loc``: keep field names, list indexes and mapping keys; drop union tags."""
    ann: Any = RegistryFile
    parts: list[int | str] = []
    owner: type[BaseModel] | None = None
    for part in loc:
        ann = _strip(ann)
        origin = get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            owner = ann
            parts.append(part)
            field = ann.model_fields.get(str(part))
            ann = field.annotation if field is not None else None
        elif origin in (tuple, list):
            parts.append(part)
            ann = get_args(ann)[0]
        elif origin is dict:
            parts.append(part)
            ann = get_args(ann)[1]
        elif origin in (Union, types.UnionType):
            # ``part`` names the union member that failed; descend into a model member of that name
            ann = next(
                (a for a in map(_strip, get_args(ann)) if getattr(a, "__name__", None) == part),
                None,
            )
        else:
            parts.append(part)
            ann = None
    return _Loc(tuple(parts), owner)


def _scope(data: Any, parts: tuple[int | str, ...]) -> tuple[str, str]:
    """('model X' or 'top level', 'dotted.field') for a clean location."""
    scope = "top level"
    rest = list(parts)
    if len(rest) >= 2 and rest[0] == "models" and isinstance(rest[1], int):
        idx = rest[1]
        models = data.get("models") if isinstance(data, Mapping) else None
        name = None
        if isinstance(models, list) and idx < len(models) and isinstance(models[idx], Mapping):
            name = models[idx].get("name")
        scope = f"model {name!r}" if isinstance(name, str) and name else f"model #{idx + 1}"
        rest = rest[2:]
    return scope, ".".join(str(x) for x in rest)


def _suggest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return f"did you mean '{near[0]}'? " if near else ""


def _choices(loc: _Loc) -> list[str]:
    """The values an enum field accepts (for a 'did you mean')."""
    if loc.owner is None or not loc.parts:
        return []
    field = loc.owner.model_fields.get(str(loc.parts[-1]))
    ann = _strip(field.annotation) if field is not None else None
    if isinstance(ann, type) and issubclass(ann, Enum):
        return [str(e.value) for e in ann]
    if get_origin(ann) is Literal:
        return [str(a) for a in get_args(ann)]
    return []


def _explain_all(path: Path, data: Any, errors: list[Any]) -> list[str]:
    """One message per mistake: union branches and a typo's 'missing' twin are folded away."""
    located = [(_clean_loc(tuple(err["loc"])), err) for err in errors]

    # A union reports every branch; keep one error per location, preferring the non-literal branch.
    by_loc: dict[tuple[int | str, ...], tuple[_Loc, Any]] = {}
    for loc, err in located:
        kept = by_loc.get(loc.parts)
        if kept is None or (kept[1]["type"] == "literal_error" and err["type"] != "literal_error"):
            by_loc[loc.parts] = (loc, err)

    # An unknown key that is a typo of a missing field is one mistake, reported as the typo.
    explained_missing: set[tuple[int | str, ...]] = set()
    messages: dict[tuple[int | str, ...], str] = {}
    for parts, (loc, err) in by_loc.items():
        if err["type"] != "extra_forbidden" or loc.owner is None:
            continue
        scope, field = _scope(data, parts)
        allowed = list(loc.owner.model_fields)
        near = difflib.get_close_matches(str(parts[-1]), allowed, n=1, cutoff=0.6)
        home = _nested_home(loc.owner, str(parts[-1]))
        if near:
            explained_missing.add((*loc.parent, near[0]))
            hint = f"did you mean '{near[0]}'?"
        elif home:
            hint = f"it belongs under '{home}:'; move it there"
        else:
            hint = f"remove it (allowed here: {', '.join(allowed)})"
        messages[parts] = f"{path}: {scope}: unknown key '{field}'; {hint}"

    # Several required fields missing from one mapping: one message listing them.
    missing: dict[tuple[int | str, ...], list[str]] = {}
    for parts, (loc, err) in by_loc.items():
        if err["type"] == "missing" and parts not in explained_missing:
            missing.setdefault(loc.parent, []).append(str(parts[-1]))

    out: list[str] = []
    done_parents: set[tuple[int | str, ...]] = set()
    for parts, (loc, err) in by_loc.items():
        if parts in messages:
            out.append(messages[parts])
        elif err["type"] == "missing":
            if parts in explained_missing or loc.parent in done_parents:
                continue
            done_parents.add(loc.parent)
            out.append(_explain_missing(path, data, loc.parent, missing[loc.parent]))
        else:
            out.append(_explain(path, data, loc, err))
    return out


def _nested_home(model: type[BaseModel], key: str) -> str | None:
    """The field of ``model`` whose own mapping accepts ``key`` (e.g. 'head_dim' -> 'architecture')."""
    for name, field in model.model_fields.items():
        inner = _strip(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and key in inner.model_fields:
            return name
    return None


def _explain_missing(path: Path, data: Any, parent: tuple[int | str, ...], names: list[str]) -> str:
    scope, field = _scope(data, parent)
    if len(names) == 1:
        full = f"{field}.{names[0]}" if field else names[0]
        fix = _FIELD_FIXES.get(full, "add it")
        return f"{path}: {scope}: field '{full}' is missing; {fix}"
    keys = ", ".join(names)
    where = f"field '{field}'" if field else "the entry"
    fix = "copy them from the model's config.json" if field == "architecture" else "add them"
    return f"{path}: {scope}: {where} is missing {keys}; {fix}"


def _explain(path: Path, data: Any, loc: _Loc, err: Any) -> str:
    scope, field = _scope(data, loc.parts)
    kind = err["type"]
    got = err.get("input")
    if not field:  # the whole entry is wrong, e.g. '- llama' instead of a mapping
        return (
            f"{path}: {scope}: the entry is not a mapping (got {got!r}); "
            "write keys like 'name:', 'source:', 'max_model_len:' under it"
        )
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        hint = _suggest(str(got), _choices(loc))
        return f"{path}: {scope}: field '{field}' has {got!r}; {hint}use one of {expected}"
    fix = _FIELD_FIXES.get(field) or _FIXES.get(kind, "see the comments in model_registry.yaml")
    if re.fullmatch(r"lora\.adapters\.[^.]+", field) and kind in ("model_type", "model_attributes_type"):
        example = got if isinstance(got, str) else "..."
        fix = f"write it as {{path: {example}, rank: 16}}"
    problem = _KIND_WORDS.get(kind) or err["msg"][0].lower() + err["msg"][1:]
    return f"{path}: {scope}: field '{field}': {problem} (got {got!r}); {fix}"


def _check_semantics(path: Path, reg: RegistryFile) -> tuple[list[str], list[str]]:
    """What spans fields and models; returns (problems, warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    owner: dict[str, str] = {}

    def claim(name: str, who: str, field: str) -> None:
        if name in owner:
            by = "another model entry" if owner[name] == f"model {who!r}" else owner[name]
            problems.append(
                f"{path}: model {who!r}: field '{field}': the name {name!r} is already used by "
                f"{by}; rename one (every model, alias and adapter name must be unique)"
            )
        else:
            owner[name] = f"model {who!r}" if field == "name" else f"{field} of model {who!r}"

    if not reg.models:
        problems.append(
            f"{path}: top level: field 'models': the list is empty; add at least one model "
            "(see the comments in the shipped model_registry.yaml)"
        )
    for m in reg.models:
        claim(m.name, m.name, "name")
    for m in reg.models:
        for a in m.aliases:
            claim(a, m.name, "aliases")
        for ad in m.lora.adapters:
            if not re.fullmatch(NAME_PATTERN, ad):
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
    if is_local(reg.vllm.executable) and not _local(path, reg.vllm.executable).exists():
        warnings.append(
            f"{path}: top level: field 'vllm.executable': {reg.vllm.executable!r} does not exist here; "
            "engines cannot start on this machine until it does (point it at your vLLM venv's bin/vllm)"
        )

    for m in reg.models:
        problems += _check_model(path, m, warnings)
    return problems, warnings


def _check_model(path: Path, m: ModelSpec, warnings: list[str]) -> list[str]:
    where = f"{path}: model {m.name!r}"
    problems: list[str] = []
    if m.quantization is Quantization.AWQ:
        warnings.append(
            f"{where}: field 'quantization': 'awq' is planned and launched as 'awq_marlin' "
            "(the legacy AWQ kernel halves throughput on Ada); write awq_marlin to silence this"
        )
    if m.lora.adapters and not m.lora.enabled:
        problems.append(
            f"{where}: field 'lora.adapters': adapters are listed but LoRA is not enabled on this base; "
            "set 'lora.enabled: true'"
        )
    if m.lora.enabled and m.lora.max_rank not in VLLM_LORA_RANKS:
        up = next((r for r in VLLM_LORA_RANKS if r >= m.lora.max_rank), VLLM_LORA_RANKS[-1])
        problems.append(
            f"{where}: field 'lora.max_rank': vLLM does not accept {m.lora.max_rank}; use one of "
            f"{', '.join(map(str, VLLM_LORA_RANKS))} (e.g. {up})"
        )
    for ad_name, adapter in m.lora.adapters.items():
        if adapter.rank is not None and adapter.rank > m.lora.max_rank:
            problems.append(
                f"{where}: field 'lora.adapters.{ad_name}.rank': rank {adapter.rank} is above the base's "
                f"'lora.max_rank' ({m.lora.max_rank}); raise lora.max_rank to at least {adapter.rank}"
            )
        if is_local(adapter.path) and not _local(path, adapter.path).exists():
            problems.append(
                f"{where}: field 'lora.adapters.{ad_name}.path': {adapter.path!r} does not exist; "
                "fix the path (relative paths start from the registry's folder) or remove the adapter"
            )
    if is_local(m.source) and not _local(path, m.source).exists():
        problems.append(
            f"{where}: field 'source': local path {m.source!r} does not exist; "
            "fix the path or use a hub id like 'org/model'"
        )
    for i, arg in enumerate(m.extra_args):
        flag = arg.split("=", 1)[0]
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
        if flag in MANAGED_FLAGS:
            problems.append(
                f"{where}: field 'extra_args.{i}': {flag} is set by {_owner_words(MANAGED_FLAGS[flag])}; "
                "remove it from extra_args"
            )
    arch = m.architecture or _arch_from_local(path, m.source)
    if arch is None and m.params_b is None:
        problems.append(
            f"{where}: field 'architecture': the planner needs the model's figures; add an 'architecture' "
            "block (from its config.json) or 'params_b', or point 'source' at a local folder"
        )
    if arch is None:
        return problems
    limit = arch.max_position_embeddings
    if limit and m.max_model_len > limit:
        problems.append(
            f"{where}: field 'max_model_len': {m.max_model_len} is above the model's limit "
            f"({limit}, architecture.max_position_embeddings); use at most {limit}"
        )
    if arch.num_attention_heads % arch.num_key_value_heads:
        problems.append(
            f"{where}: field 'architecture.num_key_value_heads': {arch.num_key_value_heads} does not "
            f"divide num_attention_heads ({arch.num_attention_heads}); copy both from config.json"
        )
    if arch.head_dim is None and arch.hidden_size % arch.num_attention_heads:
        problems.append(
            f"{where}: field 'architecture.head_dim': hidden_size ({arch.hidden_size}) is not a multiple "
            f"of num_attention_heads ({arch.num_attention_heads}); add head_dim from config.json"
        )
    return problems


def _owner_words(owner: str) -> str:
    return owner if owner.startswith("the ") else f"the field '{owner}'"


def is_local(source: str) -> bool:
    """Whether a source or adapter path names a local folder rather than a hub id."""
    return source.startswith(("/", "./", "../", "~"))


def _local(registry_path: Path, source: str) -> Path:
    p = Path(source).expanduser()
    return p if p.is_absolute() else registry_path.parent / p


def _arch_from_local(registry_path: Path, source: str) -> Architecture | None:
    if not is_local(source):
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
