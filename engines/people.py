"""The lab's people: the users file, each person's class and limits, and keys kept only as hashes.

A users file (``users.yaml`` in the run folder unless ``--users`` or ``ONECARD_USERS`` says otherwise)::

    users:
      - name: alice
        class: interactive          # interactive (a person waiting) or batch (harnesses, judge loops)
        key_sha256: 3f1c...         # sha256 of the key; the key itself is printed once by `onecard user add`
        admin: false                # may use /admin routes
        max_in_flight: 64           # requests on engines at once; more wait in alice's own queue
        max_queued: 256             # requests waiting at once; more get 429
        models: [llama-3.1-8b-fp8]  # models (or aliases, adapters) allowed; omitted: every model
        set_priority: false         # may send her own vLLM `priority` instead of her class's

::

    users = load_users(Path(".onecard/users.yaml"))     # UsersError lists every problem, file and field
    key = add_user(path, "bob", klass=UserClass.BATCH)  # the new key; only its hash is stored
    users.by_key(key).name == "bob"

Keys are random (32 bytes from :mod:`secrets`), so an unsalted sha256 is enough to keep them: nothing
shorter than the key itself can be guessed from its hash.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class UserClass(enum.StrEnum):
    """What kind of waiting a user does. Order matters: a request may only ask for a lower class."""

    INTERACTIVE = "interactive"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return 0 if self is UserClass.INTERACTIVE else 1


#: vLLM's ``priority`` per class: lower is earlier (vllm/config/scheduler.py, ``SchedulerConfig.policy``:
#: "priority" handles requests by given priority, lower value first, arrival time breaking ties; the
#: request field is ``priority`` in vllm/entrypoints/openai/chat_completion/protocol.py and
#: completion/protocol.py; a request without it has ``priority: int = 0``). Batch is that default, so a
#: batch request without the field reaches the engine unchanged; interactive requests go first.
CLASS_PRIORITY: Mapping[UserClass, int] = {UserClass.INTERACTIVE: -10, UserClass.BATCH: 0}
#: What vLLM takes a request without ``priority`` to mean (the protocol's field default).
VLLM_DEFAULT_PRIORITY = 0

#: Names the gateway gives to requests no users-file entry answers for.
ANONYMOUS = "anonymous"  # an ONECARD_API_KEYS key, or no key where none is needed
ADMIN = "admin"  # an ONECARD_ADMIN_KEYS key
RESERVED_NAMES = frozenset({ANONYMOUS, ADMIN})
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "oc-"


class UsersError(Exception):
    """A users file that cannot be used; ``problems`` has one line per problem, naming file and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class User:
    name: str
    klass: UserClass = UserClass.BATCH
    admin: bool = False
    key_sha256: str = ""
    max_in_flight: int | None = None
    max_queued: int | None = None
    models: frozenset[str] | None = None  # None: every model
    set_priority: bool = False

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "class": self.klass.value, "key_sha256": self.key_sha256}
        if self.admin:
            d["admin"] = True
        if self.max_in_flight is not None:
            d["max_in_flight"] = self.max_in_flight
        if self.max_queued is not None:
            d["max_queued"] = self.max_queued
        if self.models is not None:
            d["models"] = sorted(self.models)
        if self.set_priority:
            d["set_priority"] = True
        return d


#: Who a request is when no users-file entry names it.
ANONYMOUS_USER = User(ANONYMOUS, UserClass.BATCH)
ADMIN_USER = User(ADMIN, UserClass.INTERACTIVE, admin=True, set_priority=True)


@dataclass(frozen=True)
class Users:
    path: Path | None
    users: tuple[User, ...] = ()

    @property
    def named(self) -> bool:
        """Whether the file names anyone: then every route but ``/health`` needs a key."""
        return bool(self.users)

    def by_key(self, key: str) -> User | None:
        digest = hash_key(key)
        for u in self.users:
            if secrets.compare_digest(u.key_sha256, digest):
                return u
        return None

    def by_name(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)

    def names(self) -> list[str]:
        return [u.name for u in self.users]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


_FIELDS = ("name", "class", "key_sha256", "admin", "max_in_flight", "max_queued", "models", "set_priority")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_users(data: object, *, where: str) -> Users:
    """Validate a parsed users file; every problem is one line naming ``where``, the user and the field."""
    problems: list[str] = []
    if data is None:
        return Users(Path(where), ())
    if not isinstance(data, dict):
        raise UsersError([f"{where}: the file must be a mapping with a 'users' list, e.g. 'users: []'"])
    for key in data:
        if key != "users":
            raise UsersError([f"{where}: unknown top-level key {key!r}; the only key is 'users'"])
    entries = data.get("users") or []
    if not isinstance(entries, list):
        raise UsersError([f"{where}: 'users' must be a list of users, each with name, class and key_sha256"])
    users: list[User] = []
    seen_names: set[str] = set()
    seen_keys: set[str] = set()
    for i, entry in enumerate(entries):
        label = f"{where}: user #{i + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{label}: must be a mapping with name, class and key_sha256")
            continue
        name = entry.get("name")
        if isinstance(name, str):
            label = f"{where}: user {name!r}"
        for key in entry:
            if key not in _FIELDS:
                near = difflib.get_close_matches(str(key), _FIELDS, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(_FIELDS)}"
                problems.append(f"{label}: unknown key {key!r}{hint}")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                f"{label}: field 'name' must be 1-63 lower-case letters, digits, '.', '_' or '-' (got {name!r})"
            )
            continue
        if name in RESERVED_NAMES:
            problems.append(
                f"{label}: field 'name': {name!r} is reserved for requests no user answers for; choose another name"
            )
        if name in seen_names:
            problems.append(f"{label}: field 'name': {name!r} appears twice; names must be unique")
        seen_names.add(name)
        klass_text = entry.get("class", UserClass.BATCH.value)
        try:
            klass = UserClass(klass_text)
        except ValueError:
            problems.append(f"{label}: field 'class' is {klass_text!r}; use 'interactive' or 'batch'")
            klass = UserClass.BATCH
        digest = entry.get("key_sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            problems.append(
                f"{label}: field 'key_sha256' must be 64 lower-case hex digits (the sha256 of the "
                "key); create users with `onecard user add NAME`"
            )
            digest = ""
        elif digest in seen_keys:
            problems.append(f"{label}: field 'key_sha256' is the same as another user's; give each user a key")
        seen_keys.add(digest)
        for flag in ("admin", "set_priority"):
            if flag in entry and not isinstance(entry[flag], bool):
                problems.append(f"{label}: field {flag!r} must be true or false (got {entry[flag]!r})")
        for limit in ("max_in_flight", "max_queued"):
            if entry.get(limit) is not None and not _positive_int(entry[limit]):
                problems.append(
                    f"{label}: field {limit!r} must be a whole number above 0 (got {entry[limit]!r}); "
                    "omit it for no limit"
                )
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            problems.append(f"{label}: field 'models' must be a list of model names; omit it for every model")
            models = None
        users.append(
            User(
                name=name,
                klass=klass,
                admin=entry.get("admin") is True,
                key_sha256=digest,
                max_in_flight=entry.get("max_in_flight") if _positive_int(entry.get("max_in_flight")) else None,
                max_queued=entry.get("max_queued") if _positive_int(entry.get("max_queued")) else None,
                models=frozenset(models) if models is not None else None,
                set_priority=entry.get("set_priority") is True,
            )
        )
    if problems:
        raise UsersError(problems)
    return Users(Path(where), tuple(users))


def load_users(path: Path) -> Users:
    """The users file at ``path``; a missing file names nobody. :class:`UsersError` lists every problem."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Users(path, ())
    except OSError as e:
        raise UsersError([f"{path}: cannot be read: {e.strerror}; check its permissions"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsersError([f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}"]) from None
    users = parse_users(data, where=str(path))
    return Users(path, users.users)


def check_models(users: Users, known: Iterable[str]) -> list[str]:
    """Problems with ``models`` entries that name nothing in the registry."""
    names = set(known)
    out = []
    for u in users.users:
        for m in sorted(u.models or ()):
            if m not in names:
                out.append(
                    f"{users.path}: user {u.name!r}: field 'models' names {m!r}, which the registry does not "
                    f"have; use one of {', '.join(sorted(names)[:20])}"
                )
    return out


def save_users(path: Path, users: Iterable[User]) -> None:
    """Write the file atomically, readable by its owner only (the hashes are not secret, the names may be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (
        "# onecard users: keys are stored as sha256 hashes only. Add users with `onecard user add NAME`.\n"
        + yaml.safe_dump({"users": [u.as_dict() for u in users]}, sort_keys=False)
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_user(path: Path, name: str, *, klass: UserClass = UserClass.BATCH, admin: bool = False) -> str:
    """Add ``name`` to the users file (created if missing) and return its new key; only the hash is kept."""
    users = load_users(path)
    if users.by_name(name) is not None:
        raise UsersError([f"{path}: user {name!r} already exists; remove the entry first to give a new key"])
    key = new_key()
    user = User(name=name, klass=klass, admin=admin, key_sha256=hash_key(key))
    parse_users({"users": [u.as_dict() for u in (*users.users, user)]}, where=str(path))  # same rules as loading
    save_users(path, (*users.users, user))
    return key


def request_class(user: User, asked: str | None) -> UserClass:
    """The class of one request: the user's own, or a lower one the request asks for (a header).
    ValueError says why an asked class is refused."""
    if asked is None or not asked.strip():
        return user.klass
    try:
        wanted = UserClass(asked.strip().lower())
    except ValueError:
        raise ValueError(f"unknown class {asked[:40]!r}: use 'interactive' or 'batch'") from None
    if wanted.rank < user.klass.rank:
        raise PermissionError(
            f"user {user.name!r} is of class {user.klass.value!r} and cannot ask for "
            f"{wanted.value!r}: a request may only lower its class"
        )
    return wanted
