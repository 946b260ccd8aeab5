"""The reproducibility record: what exactly produced an answer (engine version, weights, flags).

::

    record = source_record(registry, spec)     # at start-up: hashes of the local config and weights index
    record |= engine_record(engine)            # once the engine runs: vLLM version and its command line
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engines.engine import Engine
from engines.registry import ModelSpec, Registry, is_local

#: Files whose hashes identify a local checkpoint without reading gigabytes of weights.
FINGERPRINT_FILES = ("config.json", "model.safetensors.index.json", "adapter_config.json", "tokenizer_config.json")
#: Weight files smaller than this are hashed whole; larger ones contribute their name and size.
SMALL_WEIGHTS_BYTES = 64 * 1024 * 1024


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_record(registry: Registry, spec: ModelSpec) -> dict[str, Any]:
    """Where the weights come from, pinned as far as the registry and the disk allow."""
    record: dict[str, Any] = {"source": spec.source, "revision": spec.revision}
    if not is_local(spec.source):
        return record
    folder = registry.resolve_path(spec.source)
    files: dict[str, str] = {}
    for name in FINGERPRINT_FILES:
        p = folder / name
        if p.is_file():
            files[name] = _sha(p)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    h = hashlib.sha256()
    for w in weights:
        size = w.stat().st_size
        h.update(f"{w.name}:{size}:".encode())
        if size <= SMALL_WEIGHTS_BYTES:
            h.update(_sha(w).encode())
    record["files_sha256"] = files
    if weights:
        record["weights_sha256"] = h.hexdigest()
    digest = hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(files.items())).encode())
    digest.update(record.get("weights_sha256", "").encode())
    record["revision"] = spec.revision or f"sha256:{digest.hexdigest()[:16]}"
    return record


def engine_record(engine: Engine) -> dict[str, Any]:
    """The engine's version and the flags it was launched with (port and paths to temp dirs left out)."""
    argv = list(engine.process.argv) if engine.process else []
    flags: list[str] = []
    skip = False
    for i, arg in enumerate(argv[2:], start=2):
        if skip:
            skip = False
            continue
        if arg in ("--port", "--host"):
            skip = True
            continue
        if i == 2:  # the model source, recorded separately
            continue
        flags.append(arg)
    return {"vllm_version": engine.vllm_version, "engine_flags": flags}


def header_value(record: dict[str, Any]) -> str:
    """A compact one-line form for the ``x-onecard-provenance`` response header."""
    flags = " ".join(record.get("engine_flags", []))
    parts = [
        f"vllm={record.get('vllm_version') or 'unknown'}",
        f"source={record.get('source')}",
        f"revision={record.get('revision') or 'unpinned'}",
        f"flags_sha256={hashlib.sha256(flags.encode()).hexdigest()[:16]}",
    ]
    # Header values must be Latin-1; escape anything else (a non-ASCII local path) rather than fail.
    return "; ".join(parts).encode("ascii", "backslashreplace").decode("ascii")
