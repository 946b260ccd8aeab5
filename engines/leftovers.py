"""A state file of live engines, so a new supervisor can kill what a dead one left behind.

Each engine gets a random ``ONECARD_ENGINE_ID`` in its environment. The file records it with the
pid, process group and start time. At start-up, :meth:`StateFile.reap` kills every process whose
group matches a record AND whose environment carries that id: a recycled pid is never touched.

::

    state = StateFile(Path("~/.cache/onecard/state/engines.json").expanduser())
    killed = state.reap()          # at start-up
    state.add(EngineRecord(...))   # after each spawn
    state.remove(engine_id)        # after each stop
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

ENV_ID = "ONECARD_ENGINE_ID"


@dataclass(frozen=True)
class EngineRecord:
    engine_id: str
    model: str
    pid: int
    pgid: int
    port: int
    started_at: float  # wall clock
    tmpdir: str


class StateFile:
    """JSON file of records; every write is atomic (write then rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        engines = data.get("engines", {}) if isinstance(data, dict) else {}
        return engines if isinstance(engines, dict) else {}

    def _save(self, engines: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        data = self._read_all()
        data["engines"] = engines
        if extra:
            data.update(extra)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    def _read_all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def records(self) -> list[EngineRecord]:
        out = []
        for rec in self._load().values():
            with contextlib.suppress(TypeError):
                out.append(EngineRecord(**rec))
        return out

    def add(self, rec: EngineRecord) -> None:
        engines = self._load()
        engines[rec.engine_id] = asdict(rec)
        self._save(engines)

    def remove(self, engine_id: str) -> None:
        engines = self._load()
        if engines.pop(engine_id, None) is not None:
            self._save(engines)

    def get_section(self, key: str) -> Any:
        return self._read_all().get(key)

    def set_section(self, key: str, value: Any) -> None:
        self._save(self._load(), {key: value})

    def reap(self, *, grace_s: float = 5.0) -> list[int]:
        """Kill the leftovers of every recorded engine; return the pids that were signalled."""
        killed: list[int] = []
        for rec in self.records():
            procs = owned_processes(rec)
            if procs:
                log.warning(
                    "killing %d leftover process(es) of engine %s (model %s, pid %d) from an earlier run",
                    len(procs), rec.engine_id, rec.model, rec.pid,
                )
                killed += _terminate(procs, grace_s)
            _remove_tree(Path(rec.tmpdir))
            self.remove(rec.engine_id)
        return killed


def owned_processes(rec: EngineRecord) -> list[psutil.Process]:
    """Processes that provably belong to this record: its pid or process group, and carrying its id."""
    found: list[psutil.Process] = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) != rec.pgid and p.pid != rec.pid:
                continue
            if p.environ().get(ENV_ID) != rec.engine_id:
                continue
            found.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError, OSError):
            continue
    return found


def _terminate(procs: list[psutil.Process], grace_s: float) -> list[int]:
    pids = [p.pid for p in procs]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return pids


def _remove_tree(path: Path) -> None:
    """Remove an engine's temp dir, and only that: a folder named ``onecard-*`` in the temp dir."""
    import shutil
    import tempfile

    if path.name.startswith("onecard-") and path.parent == Path(tempfile.gettempdir()) and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
