"""Who sent a request: the users file's people, keys from the environment, and each request's class.

:class:`People` wraps the users file (re-read when it changes, so ``onecard user add`` takes effect
without a restart; a file broken meanwhile is logged and the last good one kept). The auth middleware
asks :meth:`People.who` for the user of a key and puts it in the request's scope; handlers read it
back with :func:`user_of`::

    people = People(Path(".onecard/users.yaml"), api_keys=..., admin_keys=...)
    people.who("oc-...")      # the User, an anonymous or admin User, or None for a key nobody has
    user_of(request.scope)    # the request's User (anonymous where nothing was set)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from starlette.types import Scope

from engines.pool import ADMIN_USER, ANONYMOUS_USER, User, UserClass, Users, UsersError, load_users, request_class
from gateway.errors import BadRequest, Forbidden

log = logging.getLogger(__name__)

#: The request header by which a key asks for a lower class for one request.
CLASS_HEADER = "x-onecard-class"
SCOPE_KEY = "onecard_user"
#: How often the users file's modification time is looked at, at most.
RELOAD_CHECK_S = 1.0


class People:
    def __init__(
        self, path: Path | None, *, api_keys: frozenset[str] = frozenset(), admin_keys: frozenset[str] = frozenset()
    ) -> None:
        self.path = path
        self.api_keys = api_keys
        self.admin_keys = admin_keys
        self.users = load_users(path) if path is not None else Users(None, ())  # UsersError: refuse to start
        self.on_change: list[Callable[[Users], None]] = []
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self._looking = False  # a look at the file's modification time is under way in a thread

    def _stat(self) -> float | None:
        if self.path is None:
            return None
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return None

    def current(self) -> Users:
        """The users, re-read if the file changed (looked at once a second at most).

        On an event loop (every request asks) the file's modification time is read in a worker thread
        and a change is taken up when the answer comes: a ``stat`` that waits on a busy disk must not
        hold up every request. Elsewhere it is read at once."""
        now = time.monotonic()
        if self.path is not None and now - self._checked >= RELOAD_CHECK_S and not self._looking:
            self._checked = now
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._take(self._stat())
            else:
                self._looking = True
                loop.run_in_executor(None, self._stat).add_done_callback(self._looked)
        return self.users

    def _looked(self, done: asyncio.Future[float | None] | Future[float | None]) -> None:
        self._looking = False
        if not done.cancelled() and done.exception() is None:
            self._take(done.result())

    def _take(self, mtime: float | None) -> None:
        """Re-read the file if its modification time is not the one last read."""
        if mtime == self._mtime or self.path is None:
            return
        self._mtime = mtime
        try:
            self.users = load_users(self.path)
            for hook in self.on_change:
                hook(self.users)
            log.info("users file %s re-read: %d user(s)", self.path, len(self.users.users))
        except UsersError as e:
            log.error("users file changed but cannot be used; keeping the previous one:\n%s", e)

    @property
    def named(self) -> bool:
        return self.current().named

    @property
    def keys_required(self) -> bool:
        """Whether every route but ``/health`` needs a key."""
        return bool(self.api_keys or self.admin_keys) or self.named

    def who(self, key: str | None) -> User | None:
        """The user a key belongs to; with no keys anywhere, everyone is anonymous. None: not a valid key."""
        if key is not None:
            found = self.current().by_key(key)
            if found is not None:
                return found
            if _matches(key, self.admin_keys):
                return ADMIN_USER
            if _matches(key, self.api_keys):
                return ANONYMOUS_USER
            return None
        return None if self.keys_required else ANONYMOUS_USER

    def label_names(self) -> list[str]:
        """Every value the ``user`` metric label can take: bounded by the users file."""
        return [*self.current().names(), ANONYMOUS_USER.name, ADMIN_USER.name]


def _matches(key: str, keys: frozenset[str]) -> bool:
    import hmac

    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), k.encode())
    return found


def share_limits(users: Users) -> tuple[dict[str, int], dict[str, int]]:
    """Each user's in-flight and queue limits, for :class:`engines.shares.Shares`."""
    return (
        {u.name: u.max_in_flight for u in users.users if u.max_in_flight is not None},
        {u.name: u.max_queued for u in users.users if u.max_queued is not None},
    )


def set_user(scope: Scope, user: User | None) -> None:
    if user is not None:
        scope.setdefault("state", {})[SCOPE_KEY] = user


def user_of(scope: Scope) -> User:
    state = scope.get("state") or {}
    user = state.get(SCOPE_KEY)
    return user if isinstance(user, User) else ANONYMOUS_USER


def users_path(run_dir: Path, given: str | Path | None = None) -> Path:
    """``--users``, else ``$ONECARD_USERS``, else ``users.yaml`` in the run folder."""
    chosen = given or os.environ.get("ONECARD_USERS")
    return Path(chosen).expanduser() if chosen else run_dir / "users.yaml"


class NotPermitted(Forbidden):
    """What the user's own entry does not allow (a higher class, a model not in their list, a lease)."""

    code = "not_permitted"


def class_of(user: User, asked: str | None) -> UserClass:
    """The request's class (``x-onecard-class`` may only lower the user's own); 400 or 403 otherwise."""
    try:
        return request_class(user, asked)
    except PermissionError as e:
        raise NotPermitted(str(e), param=CLASS_HEADER) from None
    except ValueError as e:
        raise BadRequest(f"{CLASS_HEADER}: {e}", param=CLASS_HEADER) from None


def check_model_allowed(user: User, names: set[str]) -> None:
    """403 unless the user's ``models`` list (if any) has one of the names the request's model goes by."""
    if user.models is not None and not names & user.models:
        shown = ", ".join(sorted(user.models)[:20]) or "none"
        raise NotPermitted(
            f"user {user.name!r} may not use model {sorted(names)[0]!r}; their models: {shown}", param="model"
        )
