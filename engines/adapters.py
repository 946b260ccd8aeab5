"""Adapter discovery: PEFT LoRA folders that appear under a base model's ``lora.watch_dirs``.

A folder ``<watch_dir>/<name>/adapter_config.json`` becomes the adapter ``<name>`` of that base when
its ``base_model_name_or_path`` names the base and its rank fits the base's ``max_rank``. A bad folder
is reported with the reason and never hides the others::

    found, problems = scan_adapters(registry)
    found["llama-8b-tuesday"].base      # 'llama-3.1-8b-fp8'
    problems["/adapters/llama/broken"]  # 'adapter_config.json is not valid JSON: ...'

The folders are untrusted (anyone in the lab may write there): files are read only when they are
regular files of bounded size inside the watched folder (a FIFO, a device or a link out of the
folder is refused unread), JSON nested past the interpreter's recursion limit is refused, and
whatever goes wrong with one folder is that folder's problem, never the scan's.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from engines.registry import NAME_PATTERN, ModelSpec, Registry, is_local

_NAME = re.compile(NAME_PATTERN)

#: A PEFT ``adapter_config.json`` is a few hundred bytes; anything past this is not one.
CONFIG_MAX_BYTES = 1024 * 1024


class Refused(Exception):
    """A file that is not read, and why."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def check_file(path: Path, root: Path) -> os.stat_result:
    """The file's status when it is a regular file inside ``root`` (resolved); else :class:`Refused`."""
    try:
        st = path.stat()  # follows links; opens nothing (opening a FIFO blocks, a device may act)
    except OSError as e:
        raise Refused(f"cannot read {path.name}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{path.name} is not a regular file")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise Refused(f"cannot resolve {path.name}: {e}") from e
    if not _inside(real, root):
        raise Refused(f"{path.name} resolves to {real}, outside the watched folder {root}")
    return st


def read_bounded(path: Path, root: Path, limit: int = CONFIG_MAX_BYTES) -> bytes:
    """At most ``limit`` bytes of a regular file inside ``root``, or :class:`Refused` with the reason."""
    st = check_file(path, root)
    if st.st_size > limit:
        raise Refused(f"{path.name} is larger than {limit} bytes ({st.st_size})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"cannot read {path.name}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        again = os.fstat(f.fileno())
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(again.st_mode):
            raise Refused(f"{path.name} changed while it was being read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{path.name} is larger than {limit} bytes")
    return data


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


def inspect_adapter(folder: Path, model: ModelSpec, registry: Registry, root: Path | None = None) -> FoundAdapter | str:
    """A valid adapter of ``model`` in ``folder`` (inside the watched folder ``root``), or why it is not."""
    name = folder.name
    if not _NAME.fullmatch(name):
        return f"folder name {name!r} is not a valid model name (letters, digits and . _ : -)"
    root = (root or folder.parent).resolve()
    real = folder.resolve()
    if not _inside(real, root):
        return f"the folder resolves to {real}, outside the watched folder {root}"
    try:
        config = json.loads(read_bounded(folder / "adapter_config.json", root))
    except Refused as e:
        return str(e)
    except RecursionError:
        return "adapter_config.json is nested too deeply to be an adapter config"
    except ValueError as e:
        return f"adapter_config.json is not valid JSON: {e}"
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {str(config.get('peft_type'))[:100]!r} is not LORA"
    declared = str(config.get("base_model_name_or_path") or "")[:1000]
    if not _base_matches(declared, model, registry):
        return f"its base model {declared!r} is not {model.name} ({model.source})"
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        return f"rank r={str(rank)[:100]!r} is not a positive whole number"
    if rank > model.lora.max_rank:
        return f"rank {rank} is above {model.name}'s lora.max_rank ({model.lora.max_rank})"
    weights = [folder / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (folder / f).exists()]
    if not weights:
        return "no adapter_model.safetensors (or .bin) next to adapter_config.json"
    try:
        check_file(weights[0], root)
    except Refused as e:
        return str(e)
    return FoundAdapter(name=name, base=model.name, path=real, rank=rank)


def scan_adapters(registry: Registry) -> tuple[dict[str, FoundAdapter], dict[str, str]]:
    """Every valid adapter under every watched folder, and the problems of the others."""
    taken = set(registry.names())
    found: dict[str, FoundAdapter] = {}
    problems: dict[str, str] = {}
    for model in registry.models:
        if not model.lora.enabled:
            continue
        for watch in model.lora.watch_dirs:
            try:
                root = registry.resolve_path(watch).resolve()
                folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            except (OSError, RuntimeError):
                continue
            for folder in folders:
                try:
                    result = _inspect_folder(folder, model, registry, root)
                except Exception as e:  # one folder's surprise is that folder's problem, never the scan's
                    result = f"could not be inspected: {type(e).__name__}: {e}"
                if result is None:
                    continue
                if isinstance(result, str):
                    problems[str(folder)] = result
                elif result.name in taken or result.name in found:
                    problems[str(folder)] = f"the name {result.name!r} is already in use; rename the folder"
                else:
                    found[result.name] = result
    return found, problems


def _inspect_folder(folder: Path, model: ModelSpec, registry: Registry, root: Path) -> FoundAdapter | str | None:
    if not os.path.lexists(folder / "adapter_config.json"):
        return None  # still being written, or not an adapter
    return inspect_adapter(folder, model, registry, root)
