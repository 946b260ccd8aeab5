"""Adapter discovery: PEFT LoRA folders that appear under a base model's ``lora.watch_dirs``.

A folder ``<watch_dir>/<name>/adapter_config.json`` becomes the adapter ``<name>`` of that base when
its ``base_model_name_or_path`` names the base and its rank fits the base's ``max_rank``. A bad folder
is reported with the reason and never hides the others::

    found, problems = scan_adapters(registry)
    found["llama-8b-tuesday"].base      # 'llama-3.1-8b-fp8'
    problems["/adapters/llama/broken"]  # 'adapter_config.json is not valid JSON: ...'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engines.registry import NAME_PATTERN, ModelSpec, Registry, is_local

_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class FoundAdapter:
    name: str
    base: str
    path: Path
    rank: int


def _base_matches(declared: str, model: ModelSpec, registry: Registry) -> bool:
    """Whether an adapter's declared base model is this registry model (hub id, path, or name)."""
    if not declared:
        return False
    candidates = {model.source, model.name, model.source.rstrip("/").rsplit("/", 1)[-1]}
    if is_local(model.source):
        candidates.add(str(registry.resolve_path(model.source).resolve()))
    declared_path = Path(declared).expanduser()
    if declared_path.is_absolute():
        candidates_resolved = {str(Path(c).resolve()) for c in candidates if c.startswith("/")}
        if str(declared_path.resolve()) in candidates_resolved:
            return True
    return declared in candidates or declared.rstrip("/").rsplit("/", 1)[-1] in candidates


def inspect_adapter(folder: Path, model: ModelSpec, registry: Registry) -> FoundAdapter | str:
    """A valid adapter of ``model``, or the reason it is not one."""
    name = folder.name
    if not _NAME.match(name):
        return f"folder name {name!r} is not a valid model name (letters, digits and . _ : -)"
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError as e:
        return f"cannot read adapter_config.json: {e.strerror}"
    except ValueError as e:
        return f"adapter_config.json is not valid JSON: {e}"
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    declared = str(config.get("base_model_name_or_path") or "")
    if not _base_matches(declared, model, registry):
        return f"its base model {declared!r} is not {model.name} ({model.source})"
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        return f"rank r={rank!r} is not a positive whole number"
    if rank > model.lora.max_rank:
        return f"rank {rank} is above {model.name}'s lora.max_rank ({model.lora.max_rank})"
    if not any((folder / f).exists() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return "no adapter_model.safetensors (or .bin) next to adapter_config.json"
    return FoundAdapter(name=name, base=model.name, path=folder.resolve(), rank=rank)


def scan_adapters(registry: Registry) -> tuple[dict[str, FoundAdapter], dict[str, str]]:
    """Every valid adapter under every watched folder, and the problems of the others."""
    taken = set(registry.names())
    found: dict[str, FoundAdapter] = {}
    problems: dict[str, str] = {}
    for model in registry.models:
        if not model.lora.enabled:
            continue
        for watch in model.lora.watch_dirs:
            root = registry.resolve_path(watch)
            try:
                folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for folder in folders:
                if not (folder / "adapter_config.json").exists():
                    continue  # still being written, or not an adapter
                result = inspect_adapter(folder, model, registry)
                if isinstance(result, str):
                    problems[str(folder)] = result
                elif result.name in taken or result.name in found:
                    problems[str(folder)] = f"the name {result.name!r} is already in use; rename the folder"
                else:
                    found[result.name] = result
    return found, problems
