"""A state file of live engines, so a new supervisor can kill what a dead one left behind.

Each engine gets a random ``ONECARD_ENGINE_ID`` in its environment. The file records it with the
pid, process group and start time. At start-up, :meth:`StateFile.reap` kills every process whose
group matches a record AND whose environment carries that id: a recycled pid is never touched.

::

    lock = RunLock(Path(".onecard")); lock.acquire()   # one gateway per run folder, or RunFolderBusy
    state = StateFile(Path(".onecard/state/engines.json"))
    killed = state.reap()          # at start-up
    state.add(EngineRecord(...))   # after each spawn
    state.remove(engine_id)        # after each stop
    state.flush()                  # now and then: retries a write that failed

The file is untrusted input (a crash, a hand edit, another version): every record is validated,
and a bad one is logged and dropped, never acted on. Writes are best effort: the records live in
memory, a failed write (disk full, read-only folder) is logged once and retried by :meth:`flush`,
and never stops the state change that asked for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from engines.errors import RunFolderBusy

log = logging.getLogger(__name__)

ENV_ID = "ONECARD_ENGINE_ID"
_ENGINE_ID = re.compile(r"[A-Za-z0-9_-]{4,64}")


@dataclass(frozen=True)
class EngineRecord:
    engine_id: str
    model: str
    pid: int
    pgid: int
    port: int
    started_at: float  # wall clock
    tmpdir: str

    @classmethod
    def parse(cls, raw: object) -> EngineRecord:
        """A record from the file, checked field by field; ValueError says what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError(f"not an object but {type(raw).__name__}")

        def field(name: str, kind: type | tuple[type, ...]) -> Any:
            value = raw.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name} is {value!r}, not {getattr(kind, '__name__', 'a number')}")
            return value

        engine_id, model, tmpdir = field("engine_id", str), field("model", str), field("tmpdir", str)
        pid, pgid, port = field("pid", int), field("pgid", int), field("port", int)
        started_at = float(field("started_at", (int, float)))
        if not _ENGINE_ID.fullmatch(engine_id):
            raise ValueError(f"engine_id {engine_id!r} is not an engine id")
        if pid <= 1 or pgid <= 1:
            raise ValueError(f"pid {pid} / pgid {pgid} cannot be an engine's")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not a port")
        return cls(engine_id=engine_id, model=model, pid=pid, pgid=pgid, port=port, started_at=started_at,
                   tmpdir=tmpdir)


class StateFile:
    """JSON file of records, kept in memory; every write is atomic (write then rename) and best effort."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, Any] | None = None
        self._dirty = False
        self._warned = False

    # --- reading, once, with validation ----------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._read()
        return self._data

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {"engines": {}}
        except (OSError, ValueError, RecursionError) as e:
            log.warning("state file %s is unreadable (%s); starting from an empty one", self.path, e)
            return {"engines": {}}
        if not isinstance(data, dict):
            log.warning("state file %s holds %s, not an object; starting from an empty one", self.path,
                        type(data).__name__)
            return {"engines": {}}
        raw = data.get("engines", {})
        if not isinstance(raw, dict):
            log.warning("state file %s: 'engines' is %s, not an object; its records are dropped", self.path,
                        type(raw).__name__)
            raw = {}
        engines: dict[str, dict[str, Any]] = {}
        for key, rec in raw.items():
            try:
                parsed = EngineRecord.parse(rec)
            except ValueError as e:
                log.warning("state file %s: engine record %r dropped: %s (nothing is killed for it)",
                            self.path, key, e)
                continue
            engines[parsed.engine_id] = asdict(parsed)
        data["engines"] = engines
        return data

    # --- writing, best effort ---------------------------------------------------------------------------

    def _persist(self) -> bool:
        """Write the in-memory state; on failure remember to retry (:meth:`flush`) and say so once."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self._state(), indent=2))
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            self._dirty = True
            if not self._warned:
                self._warned = True
                log.warning("cannot write the state file %s (%s); engines and leases carry on, and the write is "
                            "retried", self.path, e.strerror or e)
            return False
        if self._warned:
            log.info("state file %s is written again", self.path)
        self._dirty = self._warned = False
        return True

    @property
    def dirty(self) -> bool:
        """Whether the file lags behind the records in memory (a write failed)."""
        return self._dirty

    def flush(self) -> bool:
        """Retry a failed write; True when the file is up to date."""
        return self._persist() if self._dirty else True

    # --- the records -------------------------------------------------------------------------------------

    def records(self) -> list[EngineRecord]:
        return [EngineRecord(**rec) for rec in self._state()["engines"].values()]

    def add(self, rec: EngineRecord) -> None:
        self._state()["engines"][rec.engine_id] = asdict(rec)
        self._persist()

    def remove(self, engine_id: str) -> None:
        if self._state()["engines"].pop(engine_id, None) is not None:
            self._persist()

    def get_section(self, key: str) -> Any:
        return self._state().get(key)

    def set_section(self, key: str, value: Any) -> None:
        self._state()[key] = value
        self._persist()

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


class RunLock:
    """One gateway per run folder: an exclusive ``flock`` on ``<run_dir>/gateway.lock``, held while it runs.

    The lock dies with the process (even ``kill -9``), so the next gateway still reaps what a dead one
    left; a live one's engines are never taken for leftovers::

        lock = RunLock(run_dir)
        lock.acquire()     # RunFolderBusy when another gateway holds it
        ...
        lock.release()
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "gateway.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunFolderBusy(f"cannot lock the run folder {self.run_dir} ({e.strerror or e}); give the gateway "
                                "a folder it can write (--run-dir)") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise RunFolderBusy(
                f"another onecard gateway{who} is using the run folder {self.run_dir}; stop it first, or give "
                "this one its own folder with --run-dir"
            ) from e
        with contextlib.suppress(OSError):  # the pid is for the message above; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


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

    if path.name.startswith("onecard-") and path.parent == Path(tempfile.gettempdir()) and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
