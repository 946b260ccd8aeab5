"""Engine lifecycle states and the one table of legal transitions.

::

    stopped -> starting -> ready <-> draining -> sleeping -> ready
                  |          |          |            |
                  v          v          v            v
                failed    stopping <----+---------- stopping -> stopped
                             |
                             v
                           failed

A ``draining`` engine serves what it has in flight and admits nothing new: the scheduler drains it for a
swap, and sleep and stop drain it first. A stop during a start goes ``starting -> stopping -> stopped``,
not through ``failed``. No state is set anywhere but :meth:`StateMachine.swap`, and each swap names the
state it expects, so a caller that lost a race fails loudly instead of overwriting the winner::

    >>> sm = StateMachine("tiny")
    >>> sm.swap(EngineState.STOPPED, EngineState.STARTING)
    >>> sm.state
    <EngineState.STARTING: 'starting'>
    >>> sm.swap(EngineState.STOPPED, EngineState.STARTING)
    Traceback (most recent call last):
    ...
    engines.state.InvalidTransition: engine tiny: cannot go stopped -> starting; it is starting
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STOPPED: frozenset({EngineState.STARTING}),
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.STOPPING}),
    EngineState.READY: frozenset({EngineState.DRAINING, EngineState.STOPPING, EngineState.FAILED}),
    EngineState.DRAINING: frozenset({EngineState.READY, EngineState.SLEEPING, EngineState.STOPPING,
                                     EngineState.FAILED}),
    EngineState.SLEEPING: frozenset({EngineState.READY, EngineState.STOPPING, EngineState.FAILED}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED, EngineState.FAILED}),
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPING, EngineState.STOPPED}),
}


class InvalidTransition(RuntimeError):
    def __init__(self, name: str, current: EngineState, expected: EngineState, new: EngineState) -> None:
        super().__init__(f"engine {name}: cannot go {expected} -> {new}; it is {current}")
        self.current = current


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; True if it is set.

    A timer sets nothing but a flag; unlike ``asyncio.wait_for`` on Python 3.11, a cancellation that
    arrives as the timer fires is never swallowed.
    """
    if event.is_set():
        return True
    expired = asyncio.Event()
    waiter = asyncio.ensure_future(event.wait())
    timer = asyncio.get_running_loop().call_later(seconds, expired.set)
    expiry = asyncio.ensure_future(expired.wait())
    try:
        await asyncio.wait({waiter, expiry}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        waiter.cancel()
        expiry.cancel()
    return event.is_set()


def is_valid_transition(old: EngineState, new: EngineState) -> bool:
    return new in TRANSITIONS[old]


Listener = Callable[[str, EngineState, EngineState], None]


class StateMachine:
    """Holds one engine's state; ``swap(expected, new)`` checks, logs and notifies listeners."""

    def __init__(self, name: str, listeners: list[Listener] | None = None) -> None:
        self.name = name
        self._state = EngineState.STOPPED
        self.since = time.monotonic()
        self._listeners = list(listeners or [])
        self._changed: asyncio.Event | None = None

    @property
    def state(self) -> EngineState:
        return self._state

    async def changed(self, seconds: float) -> bool:
        """Wait (at most ``seconds``) for the next transition; True if one happened."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return await wait_event(self._changed, seconds)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def swap(self, expected: EngineState, new: EngineState) -> None:
        if self._state is not expected or not is_valid_transition(expected, new):
            raise InvalidTransition(self.name, self._state, expected, new)
        self._state = new
        self.since = time.monotonic()
        log.info("engine %s: %s -> %s", self.name, expected, new)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        for listener in self._listeners:  # a listener's bug must not leave a transition half done
            try:
                listener(self.name, expected, new)
            except Exception:
                log.exception("engine %s: a listener of %s -> %s failed", self.name, expected, new)
