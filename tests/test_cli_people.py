"""``onecard user add`` and ``onecard user list``, run as the command the lab types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engines.people import hash_key, load_users
from tests.support import ROOT


def onecard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_user_add_prints_the_key_once_alone_on_its_last_line(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    r = onecard("user", "add", "alice", "--class", "interactive", "--admin", "--users", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.rstrip("\n").split("\n")
    key = lines[-1]
    assert key.startswith("oc-") and " " not in key and len(key) > 40
    assert key not in path.read_text() and hash_key(key) in path.read_text()
    alice = load_users(path).by_key(key)
    assert alice is not None and alice.admin and alice.klass.value == "interactive"
    again = onecard("user", "add", "alice", "--users", str(path))
    assert again.returncode == 1 and "user 'alice' already exists" in again.stderr


def test_user_files_default_to_the_environment_then_the_run_folder(tmp_path: Path) -> None:
    r = onecard("user", "add", "bob", env={"ONECARD_USERS": "", "ONECARD_RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 0, r.stderr
    assert load_users(tmp_path / "run" / "users.yaml").by_name("bob") is not None
    other = tmp_path / "elsewhere.yaml"
    r = onecard("user", "add", "carol", env={"ONECARD_USERS": str(other)})
    assert r.returncode == 0 and load_users(other).by_name("carol") is not None


def test_user_list_shows_people_never_keys(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    key = onecard("user", "add", "alice", "--users", str(path)).stdout.split()[-1]
    onecard("user", "add", "bob", "--class", "interactive", "--users", str(path))
    r = onecard("user", "list", "--users", str(path))
    assert r.returncode == 0
    assert r.stdout.split("\n")[0].split() == ["name", "class", "admin", "max_in_flight", "max_queued", "models"]
    assert r.stdout.split("\n")[1].split()[:2] == ["alice", "batch"]
    assert r.stdout.split("\n")[2].split()[:2] == ["bob", "interactive"]
    assert key not in r.stdout and hash_key(key) not in r.stdout


def test_a_bad_users_file_stops_serve_naming_file_user_and_field(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users:\n  - name: alice\n    class: vip\n    key_sha256: " + "a" * 64 + "\n")
    r = onecard("user", "list", "--users", str(path))
    assert r.returncode == 1
    assert f"error: {path}: user 'alice': field 'class' is 'vip'; use 'interactive' or 'batch'" in r.stderr
    r = onecard("serve", "--registry", str(ROOT / "model_registry.yaml"), "--users", str(path), "--port", "1")
    assert r.returncode == 1 and "field 'class' is 'vip'" in r.stderr
