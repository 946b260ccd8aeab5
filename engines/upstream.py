"""What the relay needs of an engine, and nothing more: where to send, its adapters, and why it failed.

The gateway's proxy sees an engine only as an :class:`Upstream`. When a call fails, ``explain`` turns
the failure into the error the client is told, with the root cause from the engine's log: the engine
died (its EngineCore is dead, or its process is gone or goes within :data:`EXIT_GRACE_S` of a dropped
connection), it did not answer in time, or the connection failed::

    upstream = await reservation.ready()
    url = upstream.base_url + "/v1/completions"
    ... on an aiohttp error e:  error = await upstream.explain(e)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from engines.errors import EngineCrashed, EngineError
from engines.rootcause import engine_dead, root_cause

log = logging.getLogger(__name__)

#: How long a dropped connection waits for the engine's exit before it is called a connection failure:
#: the socket closes as the process dies, but its exit is reaped a moment later.
EXIT_GRACE_S = 0.5
#: How long an engine that answered "EngineCore encountered an issue" gets to exit (vLLM's API server shuts
#: down once its EngineCore is dead), so that its log tail holds the traceback the client is told about.
DEAD_GRACE_S = 3.0


class EngineDead(Exception):
    """The engine answered a 5xx saying that its EngineCore is dead (vLLM's ``EngineDeadError``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the engine answered {status}: EngineCore encountered an issue")
        self.status = status


class Upstream(Protocol):
    """One running engine, as the relay sees it."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def engine_id(self) -> str | None: ...
    async def ensure_adapter(self, adapter: str) -> None: ...
    def dead_answer(self, status: int, body: bytes) -> Exception | None: ...
    async def explain(self, error: Exception) -> EngineError: ...


class Process(Protocol):
    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...


class Supervised(Protocol):
    """What :class:`EngineUpstream` reads of an engine (``engines.engine.Engine`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def engine_id(self) -> str | None: ...
    @property
    def process(self) -> Process | None: ...
    def failure_lines(self, n: int = 30) -> Sequence[str]: ...
    async def ensure_adapter(self, name: str, path: str) -> None: ...


async def exits_within(proc: Process, seconds: float) -> bool:
    """Whether ``proc`` has exited, waiting up to ``seconds`` for it.

    ``asyncio.wait`` with a timeout, not ``asyncio.wait_for`` (which on Python 3.11 can swallow a
    cancellation that arrives as it times out), on a shielded ``proc.wait()`` (so that giving up
    leaves the wait of the process, its log drain included, untouched; it ends when the process does).
    """
    if proc.returncode is not None:
        return True
    if proc.pid is None:
        return False  # never started
    waiter = asyncio.shield(proc.wait())
    try:
        await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()
    return proc.returncode is not None


class EngineUpstream:
    """An engine behind the :class:`Upstream` door; one per engine, kept by the pool."""

    __slots__ = ("_adapter_path", "_engine", "_explained")

    def __init__(self, engine: Supervised, adapter_path: Callable[[str, str], str]) -> None:
        self._engine = engine
        self._adapter_path = adapter_path  # (model, adapter) -> path
        self._explained: int | None = -1  # the pid whose death was logged (once per process)

    @property
    def name(self) -> str:
        return self._engine.name

    @property
    def base_url(self) -> str:
        return self._engine.base_url

    @property
    def engine_id(self) -> str | None:
        return self._engine.engine_id

    async def ensure_adapter(self, adapter: str) -> None:
        await self._engine.ensure_adapter(adapter, self._adapter_path(self._engine.name, adapter))

    def dead_answer(self, status: int, body: bytes) -> Exception | None:
        """:class:`EngineDead` when the answer says the engine's core is dead, else None."""
        return EngineDead(status) if engine_dead(status, body) else None

    async def explain(self, error: Exception) -> EngineError:
        """What the client is told about ``error``; a death is logged once per process."""
        engine = self._engine
        proc = engine.process
        timed_out = isinstance(error, TimeoutError)
        if proc is not None and not timed_out:
            await exits_within(proc, DEAD_GRACE_S if isinstance(error, EngineDead) else EXIT_GRACE_S)
        tail = tuple(engine.failure_lines(30))
        cause = f"; cause: {root_cause(tail)}" if tail else ""
        if isinstance(error, EngineDead) or proc is None or proc.returncode is not None:
            what = "its EngineCore died" if isinstance(error, EngineDead) else "the engine exited"
            err = EngineCrashed(f"model {engine.name}: {what} while serving this request{cause}",
                                model=engine.name, log_tail=tail)
            pid = proc.pid if proc is not None else None
            if self._explained != pid:
                self._explained = pid
                log.error("%s", err.message)
            return err
        if timed_out:
            return EngineError(f"model {engine.name}: the engine did not answer in time ({type(error).__name__})",
                               model=engine.name)
        return EngineError(f"model {engine.name}: the connection to the engine failed: {type(error).__name__}: "
                           f"{error}", model=engine.name)
