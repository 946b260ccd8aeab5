"""One engine process: spawn in its own session, drain its output, terminate its whole group.

::

    proc = EngineProcess("tiny", ["vllm", "serve", ...], env=env, log_path=Path("logs/tiny.log"))
    await proc.spawn()
    ...
    await proc.terminate(grace_s=10)   # SIGTERM the group, wait, SIGKILL the group

The child's stdout and stderr are always drained (a full pipe blocks the child) into a rotating log
file, and the last lines are kept in memory for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from engines.aio import logged
from engines.rootcause import may_be_cause

log = logging.getLogger(__name__)

TAIL_LINES = 200
CAUSE_LINES = 20
LOG_MAX_BYTES = 20 * 1024 * 1024


class RotatingLog:
    """Append-only log file that keeps one rotated predecessor (``.1``) past ``max_bytes``.

    Best effort: a write that fails (disk full, quota, a file-size limit, the folder gone) never
    raises. The data is dropped and counted, the first failure is logged (once per file, however
    often it recurs), and each later write tries again, so the log resumes by itself once the disk
    has room::

        log = RotatingLog(Path("logs/tiny.log"))
        log.write(b"line\n")      # never raises
        log.dropped_bytes         # what could not be written
    """

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, *, name: str = "") -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.name = name or path.stem
        self.dropped_bytes = 0
        self.failures = 0
        self._fh: BinaryIO | None = None
        self._size = 0
        self._warned = False
        self._attempt(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("ab", buffering=0)
        self._size = self._fh.tell()

    def _attempt(self, action: Callable[[], None], size: int = 0) -> bool:
        try:
            action()
        except OSError as e:
            self.dropped_bytes += size
            self.failures += 1
            if not self._warned:
                self._warned = True
                log.warning("cannot write the log of engine %s (%s: %s); its output is still read and its last "
                            "lines kept in memory; writing resumes when it can", self.name, self.path,
                            e.strerror or e)
            return False
        return True

    def write(self, data: bytes) -> None:
        self._attempt(lambda: self._write(data), len(data))

    def _write(self, data: bytes) -> None:
        if self._fh is None:
            self._open()
        assert self._fh is not None
        if self._size + len(data) > self.max_bytes:
            self._fh.close()
            self._fh = None
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._open()
            assert self._fh is not None
        view = memoryview(data)
        while view:  # unbuffered: a short write past a size limit is finished here or fails here
            written = self._fh.write(view)
            if not written:
                raise OSError(errno.EIO, "short write")
            self._size += written
            view = view[written:]

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                logged(e, f"closing log {self.path}", logger=log)
            self._fh = None


class EngineProcess:
    """A child process in a new session (its pid is its process group id)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        # Exception lines, kept apart: a crash's cause can be followed by more than TAIL_LINES of noise.
        self.causes: deque[str] = deque(maxlen=CAUSE_LINES)
        self.started_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._log: RotatingLog | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def spawn(self) -> None:
        log_file = self._log = RotatingLog(self.log_path, name=self.name)
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
        self.started_at = time.monotonic()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            log_file.write(f"cannot start: {e}\n".encode())
            log_file.close()
            self.tail.append(f"cannot start {self.argv[0]!r}: {e}")
            raise
        self._drain = asyncio.create_task(self._drain_output(log_file), name=f"drain-{self.name}")

    def note(self, line: str) -> None:
        """Add the supervisor's own line to the engine's log and tail (e.g. why a start was abandoned)."""
        self.tail.append(line)
        if self._log is not None:
            self._log.write(f"onecard: {line}\n".encode())

    async def _drain_output(self, log_file: RotatingLog) -> None:
        """Read the child's output until it closes, whatever happens to the log file: an undrained pipe
        blocks the engine. Only reading ends this loop; the log file is best effort."""
        assert self._proc is not None and self._proc.stdout is not None
        pending = b""
        try:
            while True:
                try:
                    chunk = await self._proc.stdout.read(65536)
                except (OSError, ValueError) as e:
                    self.tail.append(f"onecard: reading the engine's output failed: {e}")
                    return
                if not chunk:
                    break
                log_file.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for text in (line.decode(errors="replace").rstrip("\r") for line in lines):
                    self.tail.append(text)
                    if may_be_cause(text):
                        self.causes.append(text)
                if len(pending) > 65536:
                    self.tail.append(pending.decode(errors="replace"))
                    pending = b""
            if pending:
                text = pending.decode(errors="replace")
                self.tail.append(text)
                if may_be_cause(text):
                    self.causes.append(text)
        finally:
            log_file.close()

    def last_lines(self, n: int = 20) -> tuple[str, ...]:
        return tuple(list(self.tail)[-n:])

    def failure_lines(self, n: int = 30) -> tuple[str, ...]:
        """What explains a failure: the exception lines seen so far, then the last ``n`` lines."""
        return (*self.causes, *self.last_lines(n))

    async def wait(self) -> int:
        """Wait for exit and for the output to be fully drained."""
        assert self._proc is not None
        rc = await self._proc.wait()
        if self._drain is not None:
            drain = self._drain
            await asyncio.wait({drain}, timeout=5)  # never cancels the drain, never swallows our cancel
            if drain.done() and not drain.cancelled() and (exc := drain.exception()) is not None:
                self._drain = None  # logged once
                logged(exc, f"engine {self.name}: reading its output", logger=log)
        return rc

    def signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def terminate(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to ``grace_s``, then SIGKILL the group. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=grace_s)
            except TimeoutError:
                log.warning("engine %s: no exit %.0f s after SIGTERM; sending SIGKILL", self.name, grace_s)
                self.signal_group(signal.SIGKILL)
        # The leader may be gone while its children (vLLM's EngineCore) live on: kill what remains.
        self.signal_group(signal.SIGKILL)
        return await self.wait()
