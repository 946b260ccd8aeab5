"""The reproducibility record: what exactly produced an answer (engine version, weights, flags).

::

    version = vllm_version_of("/opt/vllm/bin/vllm")  # once at start-up, off the event loop: '0.32.0'
    record = source_record(registry, spec)     # at start-up: hashes of the local config and weights index
    record |= engine_record(argv, "0.32.0")   # once the engine runs: its command line, the version it reports
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def engine_record(argv: Sequence[str], vllm_version: str | None) -> dict[str, Any]:
    """The engine's version and the flags it was launched with (port and paths to temp dirs left out).

    ``vllm_version`` is present only once the engine has reported it; until then the version read from
    the executable (:func:`vllm_version_of`) stands.
    """
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
    record: dict[str, Any] = {"engine_flags": flags}
    if vllm_version is not None:
        record["vllm_version"] = vllm_version
    return record


#: A version string as ``vllm --version`` prints it ('0.32.0', '0.32.0+cpu', '0.11.1rc2.dev5+g1234').
_VERSION = re.compile(r"\d+\.\d+[\w.+-]*")
#: Asks an interpreter for the installed ``vllm`` distribution's version without importing vLLM.
_ASK_METADATA = "import importlib.metadata as m; print(m.version('vllm'))"


def vllm_version_of(executable: str, *, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> str | None:
    """The vLLM version ``executable`` runs, or None when it cannot be told. Blocking: run it in a thread.

    A Python entry point (``#!/venv/bin/python``, as pip writes ``bin/vllm``) has its interpreter asked
    for the ``vllm`` distribution's version from its metadata: a fraction of a second, no vLLM import.
    Any other executable (a wrapper script, a container launcher) is run with ``--version``.
    """
    path = shutil.which(executable)
    if path is None:
        return None
    run_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ} | (env or {})
    interpreter = _python_of(Path(path), search_path=run_env.get("PATH"))
    if interpreter is not None:
        found = _version_from([interpreter, "-c", _ASK_METADATA], env=run_env, timeout_s=timeout_s)
        if found is not None:
            return found
    return _version_from([path, "--version"], env=run_env, timeout_s=timeout_s)


def _python_of(script: Path, *, search_path: str | None) -> str | None:
    """The Python interpreter a script's ``#!`` line names (also ``/usr/bin/env python3``), else None."""
    try:
        with script.open("rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if words and Path(words[0]).name == "env" and len(words) > 1:
        words = [shutil.which(words[1], path=search_path) or words[1]]
    if not words or not Path(words[0]).name.startswith("python"):
        return None
    return words[0]


def _version_from(argv: list[str], *, env: dict[str, str], timeout_s: float) -> str | None:
    try:
        proc = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines or not _VERSION.fullmatch(lines[-1]):
        return None
    return lines[-1]


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
