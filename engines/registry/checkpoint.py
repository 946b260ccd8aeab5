"""What a local checkpoint's ``config.json`` says about the model's architecture.

Only local sources are read (planning never downloads), each once, when the registry is loaded; an
``architecture:`` block in the registry takes precedence over the file::

    >>> local_path(Path("/srv/onecard/model_registry.yaml"), "./models/tiny")
    PosixPath('/srv/onecard/models/tiny')
    >>> architecture_from_config(Path("/no/such/model/config.json")) is None
    True
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from engines.checkpoints import CheckpointRead, read_quant_method
from engines.registry.schema import Architecture, ModelSpec, Registry, is_local


def local_path(registry_path: Path, source: str) -> Path:
    """A local source or adapter path; a relative one starts from the registry file's folder."""
    p = Path(source).expanduser()
    return p if p.is_absolute() else registry_path.parent / p


def architecture_from_config(config_path: Path) -> Architecture | None:
    """Read the figures the planner needs from a Hugging Face ``config.json``; None if absent."""
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


def local_architecture(registry_path: Path, source: str) -> Architecture | None:
    """The figures in a local source's ``config.json``; None for a hub id or an unreadable file."""
    if not is_local(source):
        return None
    return architecture_from_config(local_path(registry_path, source) / "config.json")


def read_local_architectures(registry_path: Path, models: Iterable[ModelSpec]) -> dict[str, Architecture | None]:
    """By source, the ``config.json`` figures of every local model that declares no architecture (one read each)."""
    out: dict[str, Architecture | None] = {}
    for m in models:
        if m.architecture is None and is_local(m.source) and m.source not in out:
            out[m.source] = local_architecture(registry_path, m.source)
    return out


def model_architecture(registry: Registry, model: ModelSpec) -> Architecture | None:
    """The declared architecture, else the one read from the local ``config.json`` when the registry was loaded.

    A spec whose source the registry did not load has its ``config.json`` read now.
    """
    if model.architecture is not None:
        return model.architecture
    if model.source in registry.local_architectures:
        return registry.local_architectures[model.source]
    return local_architecture(registry.path, model.source)


def read_local_quant_methods(registry_path: Path, models: Iterable[ModelSpec]) -> dict[str, CheckpointRead]:
    """By source, what every local checkpoint's ``config.json`` says of its quantization (one read each)."""
    return {m.source: read_quant_method(local_path(registry_path, m.source) / "config.json")
            for m in models if is_local(m.source)}
