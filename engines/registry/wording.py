"""How registry problems are worded: one line per mistake, naming the file, the model, the field and the fix.

pydantic's raw errors are folded by :func:`explain_all`: a union reports one error per location, a typo
of a required key is one mistake (the typo) rather than two, and several missing keys of one mapping
make one line::

    >>> _suggest("AWQ-marlin", ["awq", "awq_marlin", "fp8"])
    "did you mean 'awq_marlin'? "
    >>> str(RegistryError(["r.yaml: model 'x': field 'max_model_len' is missing; add it"]))
    "r.yaml: model 'x': field 'max_model_len' is missing; add it"
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from engines.registry.schema import RegistryFile


class RegistryError(ValueError):
    """One or more problems in a registry file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


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


def explain_all(path: Path, data: Any, errors: list[Any]) -> list[str]:
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
