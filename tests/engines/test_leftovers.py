"""The state file, the run-folder lock, the best-effort engine log and saved leases, on a real filesystem.

A write is made to fail for real by putting a regular file where the folder should be (ENOTDIR), which
fails for root too; putting the folder back lets it succeed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from engines.errors import RunFolderBusy
from engines.leases import Lease, restorable
from engines.leftovers import EngineRecord, RunLock, StateFile
from engines.process import RotatingLog


def record(engine_id: str = "0123456789ab", **fields: object) -> EngineRecord:
    base: dict[str, object] = {"engine_id": engine_id, "model": "m", "pid": 4242, "pgid": 4242, "port": 8001,
                               "started_at": 1.0, "tmpdir": "/tmp/onecard-x"}
    base.update(fields)
    return EngineRecord(**base)  # type: ignore[arg-type]


def block(folder: Path) -> Path:
    """Make every write into ``folder`` fail: move it aside and put a regular file in its place."""
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    folder.write_text("not a folder")
    return aside


def unblock(folder: Path, aside: Path) -> None:
    folder.unlink()
    aside.rename(folder)


def test_state_file_write_failure_is_remembered_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "state"
    state = StateFile(state_dir / "engines.json")
    state.add(record("aaaa0001"))
    aside = block(state_dir)
    state.add(record("aaaa0002"))  # never raises
    state.remove("aaaa0001")
    assert state.dirty and [r.engine_id for r in state.records()] == ["aaaa0002"]
    assert not state.flush()
    assert caplog.text.count("cannot write the state file") == 1  # said once, however often it fails
    unblock(state_dir, aside)
    assert state.flush() and not state.dirty
    saved = json.loads((state_dir / "engines.json").read_text())
    assert list(saved["engines"]) == ["aaaa0002"]
    assert [p.name for p in state_dir.iterdir()] == ["engines.json"]  # no temporary file left behind


def test_state_file_records_are_validated_one_by_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    good = record("bbbb0001").__dict__
    path = tmp_path / "engines.json"
    path.write_text(json.dumps({"engines": {
        "good": good,
        "no-tmpdir": {**good, "engine_id": "bbbb0002", "tmpdir": None},
        "pid-text": {**good, "engine_id": "bbbb0003", "pid": "4242"},
        "pid-one": {**good, "engine_id": "bbbb0004", "pid": 1, "pgid": 1},
        "bool-port": {**good, "engine_id": "bbbb0005", "port": True},
        "empty-id": {**good, "engine_id": ""},
        "list": [1, 2],
    }, "lease": {"id": "x"}}))
    state = StateFile(path)
    assert [r.engine_id for r in state.records()] == ["bbbb0001"]
    for key in ("no-tmpdir", "pid-text", "pid-one", "bool-port", "empty-id", "list"):
        assert f"engine record '{key}' dropped" in caplog.text, key
    assert state.get_section("lease") == {"id": "x"}  # other sections are the manager's to judge


def test_run_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunFolderBusy) as err:
        second.acquire()
    assert f"(pid {os.getpid()})" in err.value.message and str(tmp_path / "run") in err.value.message
    first.release()
    second.acquire()  # free again once released (and when its holder dies: the kernel drops the lock)
    second.release()


def test_engine_log_write_failures_never_raise_and_writing_resumes(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    logs = tmp_path / "logs"
    log_file = RotatingLog(logs / "m.log", max_bytes=64, name="m")
    log_file.write(b"first\n")
    log_file.close()
    aside = block(logs)
    blocked = RotatingLog(logs / "m.log", max_bytes=64, name="m")  # cannot even open: no error
    for _ in range(3):
        blocked.write(b"lost\n")
    assert blocked.dropped_bytes == 15 and blocked.failures == 4  # the open, then three writes
    assert caplog.text.count("cannot write the log of engine m") == 1
    unblock(logs, aside)
    blocked.write(b"back\n")
    blocked.write(b"x" * 70)  # past max_bytes: rotates
    blocked.close()
    assert (logs / "m.log.1").read_bytes() == b"first\nback\n"
    assert (logs / "m.log").read_bytes() == b"x" * 70


def test_saved_lease_is_validated_and_kept_only_while_held() -> None:
    now = time.time()
    lease = Lease.new(gib=2.0, holder_pid=os.getpid(), label="t", ttl_s=30, now=now)
    saved = lease.as_dict(now)
    kept, why = restorable(saved, now=now + 10)
    assert kept is not None and kept.lease_id == lease.lease_id and "keeping it" in why
    assert kept.expires_at == pytest.approx(now + 40)  # a fresh TTL to reach the new gateway
    gone, why = restorable(saved, now=now + 31)
    assert gone is None and "no heartbeat" in why
    dead, why = restorable({**saved, "holder_started": 0.0}, now=now)  # not the holder's process
    assert dead is None and "is gone" in why
    for broken, field in (({k: v for k, v in saved.items() if k != "gib"}, "gib"),
                          ({**saved, "gib": "12"}, "gib"), ({**saved, "holder_pid": True}, "holder_pid"),
                          ({**saved, "ttl_s": 0}, "ttl_s"), ("lease", "object")):
        with pytest.raises(ValueError, match=field):
            restorable(broken, now=now)
    assert restorable(None, now=now) == (None, "")
