"""Untrusted files the gateway reads: adapter folders anyone in the lab can write to, and its own state
file after a crash or a hand edit. A bad one is reported and skipped; it never stops start-up, never
hangs, never eats memory, and never makes the gateway kill a process it cannot prove is its own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, alive, running_gateway, standin_executable, standin_model, until, write_registry

pytestmark = pytest.mark.timeout(180)


def write_adapter(folder: Path, *, base: str, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": 16,
              "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def lora_registry(tmp_path: Path, watch: Path) -> Path:
    models = [standin_model("alpha", lora={"enabled": True, "max_rank": 16, "watch_dirs": [str(watch)]})]
    return write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path))


def model_ids(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


def problems(url: str) -> dict[str, str]:
    data = httpx.get(url + "/admin/adapters", timeout=10).json()["problems"]
    return {Path(p["path"]).name: p["reason"] for p in data}


def unblock_fifo(path: Path) -> None:
    """Open a FIFO for writing and close it, so a reader stuck opening it (today's code) gets EOF."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


# --- 5: one bad adapter folder never stops start-up or discovery -------------------------------------------


def test_bad_adapter_folders_never_stop_start_up_or_discovery(tmp_path: Path) -> None:
    watch = tmp_path / "adapters"
    write_adapter(watch / "good", base="standin/alpha")
    deep = watch / "deep"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)  # RecursionError in json
    fifo = watch / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")  # reading it blocks until a writer comes
    try:
        with running_gateway(lora_registry(tmp_path, watch), tmp_path / "run") as gw:
            assert "good" in model_ids(gw.url)
            found = problems(gw.url)
            assert "nested too deeply" in found["deep"], found
            assert "not a regular file" in found["fifo"], found
            # At run time too: a new bad folder does not stop the discovery of a new good one.
            gw.gw.pool.owner.catalogue.scan_s = 0.2
            deeper = watch / "deeper"
            deeper.mkdir()
            (deeper / "adapter_config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
            write_adapter(watch / "later", base="standin/alpha")
            assert until(lambda: "later" in model_ids(gw.url))
            assert "nested too deeply" in problems(gw.url)["deeper"]
            r = httpx.post(gw.url + "/v1/completions", json={"model": "later", "prompt": "x", "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200 and r.json()["model"] == "later"
    finally:
        unblock_fifo(fifo / "adapter_config.json")


_SCAN_UNDER_MEMORY_LIMIT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, resource.RLIM_INFINITY))
from engines.adapters import scan_adapters
from engines.registry import load_registry
found, problems = scan_adapters(load_registry(sys.argv[1]))
print(json.dumps({"found": sorted(found), "problems": {k.rsplit("/", 1)[-1]: v for k, v in problems.items()}}))
"""


def test_adapter_files_linked_to_devices_are_refused_unread(tmp_path: Path) -> None:
    """``adapter_config.json`` linked to ``/dev/zero`` (endless) or 3 GiB long, weights linked to
    ``/dev/zero``: refused without reading them. The scan runs in a child held to 2 GiB of address
    space, so a regression fails the test, not the host."""
    watch = tmp_path / "adapters"
    write_adapter(watch / "good", base="standin/alpha")
    (watch / "zero").mkdir()
    (watch / "zero" / "adapter_config.json").symlink_to("/dev/zero")
    (watch / "huge").mkdir()
    with (watch / "huge" / "adapter_config.json").open("wb") as f:
        f.truncate(3 * 1024**3)  # sparse: 3 GiB that cost no disk
    weights = write_adapter(watch / "zero-weights", base="standin/alpha") / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-c", _SCAN_UNDER_MEMORY_LIMIT, str(lora_registry(tmp_path, watch))],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["found"] == ["good"]
    assert "not a regular file" in result["problems"]["zero"]
    assert "larger than" in result["problems"]["huge"]
    assert "not a regular file" in result["problems"]["zero-weights"]


# --- 13: adapter names are whole-string matches; folders stay inside the watched folder --------------------


def test_adapter_name_with_a_newline_and_a_folder_linked_outside_are_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engines.catalogue")
    watch = tmp_path / "adapters"
    write_adapter(watch / "good", base="standin/alpha")
    write_adapter(watch / "tuesday\n", base="standin/alpha")
    outside = write_adapter(tmp_path / "elsewhere" / "secret-adapter", base="standin/alpha")
    (watch / "escape").symlink_to(outside, target_is_directory=True)
    with running_gateway(lora_registry(tmp_path, watch), tmp_path / "run") as gw:
        ids = model_ids(gw.url)
        assert "good" in ids
        assert "tuesday\n" not in ids and "escape" not in ids, ids
        found = problems(gw.url)
        assert "not a valid model name" in found["tuesday\n"], found
        assert "outside the watched folder" in found["escape"], found
        r = httpx.post(gw.url + "/v1/completions", json={"model": "escape", "prompt": "x", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 404
    assert "escape" in caplog.text and "outside the watched folder" in caplog.text


# --- 11: a malformed state file never makes start-up exit ---------------------------------------------------


def test_malformed_state_file_is_validated_and_start_up_survives(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    # A process that is not ours, named by a record: it must survive start-up.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"engine_id": "0123456789ab", "model": "m", "pid": bystander.pid, "pgid": bystander.pid,
                  "port": 1234, "started_at": 0.0}
        state = {
            "engines": {
                "a": {**record, "tmpdir": None},
                "b": "garbage",
                "c": {**record, "engine_id": "c", "pid": str(bystander.pid), "tmpdir": "/tmp/onecard-c"},
                "d": {"engine_id": "d"},
            },
            "lease": {"id": "abcd1234", "holder_pid": os.getpid(), "holder_started": 0.0},  # no gib
        }
        (run / "state" / "engines.json").write_text(json.dumps(state))
        with running_gateway(reg, run) as gw:
            r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
            assert httpx.get(gw.url + "/admin/leases", timeout=10).json()["leases"] == []
            assert alive(bystander.pid) and bystander.poll() is None
        assert "dropped" in caplog.text and "tmpdir" in caplog.text and "gib" in caplog.text
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b"[1, 2, 3]", b'{"engines": [1], "lease": "x"}'])
def test_state_file_that_is_not_a_state_file_does_not_stop_start_up(tmp_path: Path, content: bytes) -> None:
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "state" / "engines.json").write_bytes(content)
    with running_gateway(reg, run) as gw:
        r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
