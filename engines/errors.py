"""Errors raised on the GPU side. The gateway maps each to one HTTP status in one place.

::

    OnecardError
     ├── EngineError                 an engine could not serve (502)
     │    ├── EngineStartError       it failed to become ready; carries vLLM's last log lines
     │    ├── EngineCrashed          it exited while serving
     │    └── CrashLoop              it failed too often; carries the cause and when to retry (503)
     ├── CapacityError               the plan cannot make it resident now (503, Retry-After)
     │    ├── QueueFull              too many requests are already waiting for it (503, Retry-After)
     │    └── UserLimit              the user's own share is used up: in flight and queue (429, Retry-After)
     ├── LeaseError                  a GPU lease cannot be granted (409)
     └── RunFolderBusy               another gateway holds the run folder (start-up refuses)
"""

from __future__ import annotations


class OnecardError(Exception):
    """Base of every error onecard raises on purpose."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class EngineError(OnecardError):
    """An engine could not serve a request."""

    def __init__(self, message: str, *, model: str | None = None, log_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message, model=model)
        self.log_tail = log_tail


class EngineStartError(EngineError):
    """An engine did not become ready (exited, timed out, or refused its flags)."""


class StartCancelled(EngineStartError):
    """The engine was stopped while it started (an unload, a lease, shutdown): not a start failure."""


class EngineCrashed(EngineError):
    """An engine process exited while it was serving."""


class CrashLoop(EngineError):
    """An engine failed repeatedly; further starts wait ``retry_after`` seconds."""

    def __init__(
        self, message: str, *, model: str | None = None, retry_after: float, log_tail: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, model=model, log_tail=log_tail)
        self.retry_after = retry_after


class CapacityError(OnecardError):
    """The model cannot be made resident now."""

    def __init__(self, message: str, *, model: str | None = None, retry_after: float = 5.0) -> None:
        super().__init__(message, model=model)
        self.retry_after = retry_after


class QueueFull(CapacityError):
    """The model's wait queue is at its limit."""


class UserLimit(CapacityError):
    """A user's requests beyond their in-flight limit waited past their bound, or their queue is full."""


class LeaseError(OnecardError):
    """A GPU lease cannot be granted or found."""


class RunFolderBusy(OnecardError):
    """Another gateway holds the run folder's lock (or it cannot be locked): this one must not start."""
