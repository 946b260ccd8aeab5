"""The lab's people, unit by unit: the users file, classes, turns, shared engine time, the class bounds in
the swap policy, and who may hold a lease."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from engines.lease_owner import holder_refusal, peer_uid
from engines.people import (
    ADMIN,
    ANONYMOUS,
    UserClass,
    UsersError,
    add_user,
    hash_key,
    load_users,
    parse_users,
    request_class,
)
from engines.scheduler import EngineView, decide
from engines.shares import Shares, round_robin
from engines.state import EngineState
from gateway.usage import ShareClock, parse_since

HASH = "a" * 64


def problems(data: object) -> list[str]:
    with pytest.raises(UsersError) as e:
        parse_users(data, where="users.yaml")
    return e.value.problems


# --- the users file ---------------------------------------------------------------------------------------


def test_users_file_problems_name_file_user_field_and_fix() -> None:
    got = problems(
        {
            "users": [
                {"name": "alice", "clas": "batch", "key_sha256": HASH},
                {"name": "bob", "class": "vip", "key_sha256": "b" * 64},
                {"name": "carol", "key_sha256": "not-a-hash"},
                {"name": "dave", "key_sha256": "d" * 64, "max_in_flight": 0},
                {"name": "anonymous", "key_sha256": "e" * 64},
                {"name": "alice", "key_sha256": "f" * 64},
            ]
        }
    )
    assert "users.yaml: user 'alice': unknown key 'clas'; did you mean 'class'?" in got
    assert "users.yaml: user 'bob': field 'class' is 'vip'; use 'interactive' or 'batch'" in got
    assert any(
        p.startswith("users.yaml: user 'carol': field 'key_sha256' must be 64") and "onecard user add" in p for p in got
    )
    assert any(
        p.startswith("users.yaml: user 'dave': field 'max_in_flight' must be a whole number above 0") for p in got
    )
    assert any("user 'anonymous': field 'name': 'anonymous' is reserved" in p for p in got)
    assert any("user 'alice': field 'name': 'alice' appears twice" in p for p in got)
    assert len(got) == 6


def test_users_file_top_level_must_be_users() -> None:
    assert problems({"user": []}) == ["users.yaml: unknown top-level key 'user'; the only key is 'users'"]
    assert problems(["alice"])[0].startswith("users.yaml: the file must be a mapping")


def test_missing_or_empty_users_file_names_nobody(tmp_path: Path) -> None:
    assert not load_users(tmp_path / "none.yaml").named
    (tmp_path / "empty.yaml").write_text("")
    assert not load_users(tmp_path / "empty.yaml").named
    (tmp_path / "bad.yaml").write_text("users: [\n")
    with pytest.raises(UsersError) as e:
        load_users(tmp_path / "bad.yaml")
    assert e.value.problems[0].startswith(f"{tmp_path / 'bad.yaml'}: not valid YAML at line")


def test_add_user_keeps_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "run" / "users.yaml"
    key = add_user(path, "alice", klass=UserClass.INTERACTIVE, admin=True)
    other = add_user(path, "bob")
    text = path.read_text()
    assert key not in text and other not in text
    assert hash_key(key) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    users = load_users(path)
    alice = users.by_key(key)
    assert alice is not None and alice.name == "alice" and alice.admin and alice.klass is UserClass.INTERACTIVE
    bob = users.by_key(other)
    assert bob is not None and bob.klass is UserClass.BATCH and not bob.admin
    assert users.by_key(key + "x") is None
    with pytest.raises(UsersError, match="user 'alice' already exists"):
        add_user(path, "alice")
    assert yaml.safe_load(path.read_text())["users"][0] == {
        "name": "alice",
        "class": "interactive",
        "key_sha256": hash_key(key),
        "admin": True,
    }


def test_a_request_may_lower_its_class_never_raise_it() -> None:
    users = parse_users(
        {
            "users": [
                {"name": "chat", "class": "interactive", "key_sha256": HASH},
                {"name": "eval", "class": "batch", "key_sha256": "b" * 64},
            ]
        },
        where="u.yaml",
    )
    chat, ev = users.users
    assert request_class(chat, None) is UserClass.INTERACTIVE
    assert request_class(chat, "batch") is UserClass.BATCH
    assert request_class(ev, "batch") is UserClass.BATCH
    with pytest.raises(PermissionError, match="'eval' is of class 'batch' and cannot ask for 'interactive'"):
        request_class(ev, "interactive")
    with pytest.raises(ValueError, match="unknown class 'vip'"):
        request_class(ev, "vip")
    assert ANONYMOUS != ADMIN


# --- turns and limits -------------------------------------------------------------------------------------


@dataclass
class W:
    user: str
    n: int


def test_round_robin_admits_users_in_turn() -> None:
    queue = [W("a", 1), W("a", 2), W("a", 3), W("a", 4), W("b", 1), W("b", 2), W("c", 1)]
    admitted, kept = round_robin(queue, lambda user: True)
    assert [(w.user, w.n) for w in admitted] == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3), ("a", 4)]
    assert kept == []


def test_a_user_at_their_limit_keeps_their_place_while_others_go() -> None:
    shares = Shares()
    shares.set_limits({"a": 2})
    shares.started("a")  # one already in flight
    queue = [W("a", 1), W("a", 2), W("b", 1), W("b", 2)]
    admitted, kept = shares.take_turns(queue)
    assert [(w.user, w.n) for w in admitted] == [("a", 1), ("b", 1), ("b", 2)]
    assert [(w.user, w.n) for w in kept] == [("a", 2)]
    assert not shares.may_start("a") and shares.may_start("b")
    shares.finished("a")
    assert shares.may_start("a")


def test_queue_limit_per_user() -> None:
    shares = Shares()
    shares.set_limits({}, {"a": 2})
    assert shares.queue_full("a", [W("a", 1), W("b", 1)]) is None
    assert shares.queue_full("a", [W("a", 1), W("a", 2)]) == 2
    assert shares.queue_full("b", [W("b", n) for n in range(10)]) is None


# --- engine-seconds ---------------------------------------------------------------------------------------


def test_engine_seconds_are_shared_among_requests_in_flight() -> None:
    now = [0.0]
    clock = ShareClock(lambda: now[0])
    a = clock.begin()  # t=0: a alone
    now[0] = 2.0
    b = clock.begin()  # t=2: a and b together
    now[0] = 4.0
    assert clock.end(a) == pytest.approx(2.0 + 1.0)  # 2 s alone, 2 s shared by two
    now[0] = 5.0
    assert clock.end(b) == pytest.approx(1.0 + 1.0)  # 2 s shared, 1 s alone
    now[0] = 9.0  # idle: nobody is charged
    c = clock.begin()
    now[0] = 10.0
    assert clock.end(c) == pytest.approx(1.0)


def test_since_takes_dates_epochs_and_durations() -> None:
    now = 1_800_000_000.0
    assert parse_since(None, now=now) is None
    assert parse_since("24h", now=now) == now - 86400
    assert parse_since("90m", now=now) == now - 5400
    assert parse_since("1700000000", now=now) == 1_700_000_000
    assert parse_since("2026-12-01", now=now) == 1796083200.0
    with pytest.raises(ValueError, match="give an ISO date"):
        parse_since("last tuesday", now=now)
    for wild in ("3.3e22", "nan", "-inf", "99999999999999999999d"):  # SQLite could not take these: a 400, not a 500
        with pytest.raises(ValueError, match="out of range"):
            parse_since(wild, now=now)


# --- chat before batch: the class bounds in the swap policy ------------------------------------------------


def two_models(waits: tuple[tuple[str, float], ...]) -> list[EngineView]:
    busy = EngineView(
        "batchy",
        EngineState.READY,
        in_flight=8,
        queued=30,
        oldest_wait_s=0.5,
        occupies_memory=True,
        class_waits=(("batch", 0.5),),
    )
    oldest = max(w for _, w in waits)
    return [busy, EngineView("chatty", EngineState.STOPPED, queued=1, oldest_wait_s=oldest, class_waits=waits)]


def alone(names: frozenset[str]) -> bool:
    return len(names) <= 1


BOUNDS = {"interactive": 15.0, "batch": 60.0}


def test_an_interactive_request_forces_the_swap_at_its_own_bound() -> None:
    d = decide(two_models((("interactive", 16.0),)), fits=alone, max_wait_s=60, wait_bounds=BOUNDS)
    assert d.drain == {"batchy"} and "bound 15 s for interactive" in d.reason
    assert "batchy" not in d.admit  # the batch queue waits for the swap and continues after


def test_a_batch_request_waiting_as_long_does_not() -> None:
    d = decide(two_models((("batch", 16.0),)), fits=alone, max_wait_s=60, wait_bounds=BOUNDS)
    assert d.drain == frozenset() and d.admit == {"batchy"} and "still have queued requests" in d.reason
    # without classes the policy is today's: the bound is max_wait_s for every request
    d = decide(two_models((("interactive", 16.0),)), fits=alone, max_wait_s=60)
    assert d.drain == frozenset()


def test_the_most_overdue_class_picks_the_model_to_load() -> None:
    views = [
        EngineView("r", EngineState.READY, occupies_memory=True),
        EngineView("batch-model", EngineState.STOPPED, queued=5, oldest_wait_s=40, class_waits=(("batch", 40),)),
        EngineView("chat-model", EngineState.STOPPED, queued=1, oldest_wait_s=12, class_waits=(("interactive", 12),)),
    ]
    d = decide(views, fits=alone, max_wait_s=60, wait_bounds=BOUNDS)
    assert d.load == "chat-model"  # 12/15 of its bound against 40/60


# --- leases: whose process ------------------------------------------------------------------------------


def test_pid_1_never_holds_a_lease() -> None:
    why = holder_refusal(1, caller_uid=os.getuid())
    assert why is not None and "pid 1" in why


def test_a_lease_holder_must_be_the_callers_own_process() -> None:
    assert holder_refusal(os.getpid(), caller_uid=os.getuid()) is None
    why = holder_refusal(os.getpid(), caller_uid=os.getuid() + 4242)
    assert why is not None and f"belongs to uid {os.getuid()}" in why
    why = holder_refusal(os.getpid(), caller_uid=None)
    assert why is not None and "only to clients on this machine" in why


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_another_users_process_is_refused() -> None:
    proc = subprocess.Popen(["sleep", "30"], user=65534)
    try:
        why = holder_refusal(proc.pid, caller_uid=os.getuid())
        assert why is not None and "uid 65534" in why
    finally:
        proc.kill()
        proc.wait()


def test_peer_uid_reads_the_connection_owner_from_the_socket_table() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, (host, cport) = server.accept()
            with accepted:
                assert peer_uid(host, cport, server_port=port) == os.getuid()
                assert peer_uid(host, cport + 1 if cport < 65535 else cport - 1, server_port=port) is None
