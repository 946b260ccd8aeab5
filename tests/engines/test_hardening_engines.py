"""Engine supervision under attack or failure: a full disk under the engine log and the state file, a
squatter on the engine's port, a second gateway on the same run folder.

Real processes throughout: ``onecard serve`` subprocesses with a real file-size limit
(``RLIMIT_FSIZE``), stand-in engines, a squatter that binds the port it reads from ``ps``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fakes.standin_engine import expected_text
from tests.support import (
    ROOT,
    GatewayProcess,
    alive,
    free_port,
    gone,
    running_gateway,
    standin_executable,
    standin_model,
    wait_for,
    write_registry,
)

pytestmark = pytest.mark.timeout(240)


def complete(url: str, model: str, prompt: str = "x", max_tokens: int = 3, timeout: float = 30) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def states(url: str) -> dict[str, str]:
    return {e["model"]: e["state"] for e in httpx.get(url + "/admin/engines", timeout=10).json()["engines"]}


#: Runs ``onecard`` under a file-size limit: ``python -c WRAP LIMIT serve ...``.
_FSIZE_WRAP = (
    "import resource, runpy, sys\n"
    "limit = int(sys.argv.pop(1))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))\n"
    "sys.argv[0] = 'onecard'\n"
    "runpy.run_module('gateway.cli', run_name='__main__', alter_sys=True)\n"
)


def limited_gateway(registry: Path, run_dir: Path, *, fsize: int) -> GatewayProcess:
    """``onecard serve`` whose writes to regular files fail (EFBIG) past ``fsize`` bytes, as on a full disk."""
    gw = GatewayProcess(registry, run_dir, log_level="warning")
    assert gw.argv[1:3] == ["-m", "gateway.cli"]
    gw.argv[1:3] = ["-c", _FSIZE_WRAP, str(fsize)]
    return gw


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for g in started:
            g.close()


# --- 2: a failed engine-log write never stops the drain ----------------------------------------------------


def test_engine_log_write_failure_never_hangs_the_engine(tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    """The engine log cannot grow (a file-size limit, as on a full disk): the engine's output is still
    drained, so an engine that logs every request keeps answering; the failure is logged once."""
    chatty = standin_model("chatty", extra_args=["--enable-log-requests"], env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    reg = write_registry(tmp_path / "reg.yaml", [chatty], executable=standin_executable(tmp_path))
    limit = 48 * 1024
    gw = limited_gateway(reg, tmp_path / "run", fsize=limit)
    gateways.append(gw)
    gw.start()
    prompt = "confidential eval item " * 80  # about 1.8 kB: each request logs about 2 kB
    # 48 kB of log file, then 128 kB of read buffer and a 64 kB pipe: an undrained engine blocks within
    # about 110 requests.
    for i in range(250):
        r = complete(gw.url, "chatty", f"{i} {prompt}", 2, timeout=15)
        assert r.status_code == 200, (i, r.text)
    log_file = tmp_path / "run" / "logs" / "chatty.log"
    assert log_file.stat().st_size <= limit
    tail = httpx.get(gw.url + "/admin/engines/chatty/log?lines=5", timeout=10).text
    assert "Received request" in tail  # the in-memory tail still follows the engine
    assert gw.log().count("cannot write the log of engine chatty") == 1, gw.log()


# --- 3: a failed state-file write during a stop leaves nothing half-changed ---------------------------------


def state_records(run_dir: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((run_dir / "state" / "engines.json").read_text())
    except (OSError, ValueError):
        return {}
    engines = data.get("engines", {})
    return engines if isinstance(engines, dict) else {}


def test_state_file_write_failure_during_unload_leaves_nothing_stuck(
        tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    """While no file can be written, an unload still stops the engine and answers 200; requests, swaps and
    leases go on; once writing works again the state file catches up with the live engines."""
    models = [standin_model("a"), standin_model("b")]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=2.5)
    run = tmp_path / "run"
    gw = GatewayProcess(reg, run, log_level="warning")
    gateways.append(gw)
    gw.start()
    assert httpx.post(gw.url + "/admin/engines/a/load", timeout=60).status_code == 200
    old_pid = next(e["pid"] for e in httpx.get(gw.url + "/admin/engines").json()["engines"] if e["model"] == "a")
    resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # every file write fails
    try:
        r = httpx.post(gw.url + "/admin/engines/a/unload", timeout=60)
        assert r.status_code == 200, r.text
        assert states(gw.url)["a"] == "stopped"
        wait_for(lambda: gone(old_pid), timeout=10, what="the unloaded engine to exit")
        assert complete(gw.url, "b").status_code == 200  # another model starts
        assert complete(gw.url, "a").status_code == 200  # and the unloaded one starts again
        lease = httpx.post(gw.url + "/admin/leases", json={"gib": 0.1, "pid": os.getpid()}, timeout=30)
        assert lease.status_code == 201, lease.text
        assert httpx.delete(f"{gw.url}/admin/leases/{lease.json()['id']}", timeout=30).status_code == 200
    finally:
        resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    live = {e["model"]: e["pid"] for e in httpx.get(gw.url + "/admin/engines").json()["engines"]
            if e["state"] == "ready"}
    assert set(live) == {"a", "b"}

    def caught_up() -> bool:
        return sorted((r["model"], r["pid"]) for r in state_records(run).values()) == sorted(live.items())

    wait_for(caught_up, timeout=15, what="the state file to list exactly the live engines")


# --- 4: a squatter on the engine's port never sees a prompt -------------------------------------------------

_SQUATTER = r'''
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import psutil

record, mode, name = sys.argv[1], sys.argv[2], sys.argv[3]

class Handler(BaseHTTPRequestHandler):
    def _answer(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with open(record, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body.decode(errors="replace")}) + "\n")
        if self.path == "/health":
            out = b""
        else:
            out = json.dumps({"id": "cmpl-forged", "object": "text_completion", "created": 0, "model": "m",
                              "choices": [{"index": 0, "text": "FORGED", "logprobs": None,
                                           "finish_reason": "length"}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = _answer
    def log_message(self, *args):
        pass

seen = set()
print("ready", flush=True)
while True:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "--port" not in cmd or "--served-model-name" not in cmd:
            continue
        if cmd[cmd.index("--served-model-name") + 1] != name:  # only this test's engine
            continue
        port = int(cmd[cmd.index("--port") + 1])
        if port in seen or (mode == "once" and seen):
            continue
        seen.add(port)
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError:
            continue
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print("squatting", port, flush=True)
    time.sleep(0.01)
'''


@contextmanager
def squatter(tmp_path: Path, mode: str, model: str) -> Iterator[tuple[Path, Path]]:
    """Another local process that watches ``ps`` for ``model``'s engine's ``--port`` and binds it first
    (``once``: the first port only; ``every``: each one)."""
    record, out = tmp_path / f"squatter-{mode}.jsonl", tmp_path / f"squatter-{mode}.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _SQUATTER, str(record), mode, model], stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: out.read_text().startswith("ready"), timeout=20, what="the squatter")
        yield record, out
    finally:
        proc.kill()
        proc.wait(10)


def slow_model(name: str) -> dict[str, object]:
    # vLLM binds its port seconds after its command line (and port) show in `ps`: the squatter's window.
    return standin_model(name, env={"STANDIN_START_DELAY": "2"})


def test_squatter_on_the_engine_port_never_sees_a_prompt(tmp_path: Path) -> None:
    """A process that binds the engine's port first is not taken for the engine: nothing is sent to it,
    the start moves to another port, and the client gets the engine's real answer."""
    name = f"sq-{os.getpid()}-once"
    reg = write_registry(tmp_path / "reg.yaml", [slow_model(name)], executable=standin_executable(tmp_path))
    with squatter(tmp_path, "once", name) as (record, out), running_gateway(reg, tmp_path / "run") as server:
        prompt = "confidential eval item #42"
        r = complete(server.url, name, prompt, 4, timeout=60)
        assert "squatting" in out.read_text()  # it did bind the first port
        assert not record.exists(), record.read_text()  # and never received a request
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected_text(name, prompt, 4)


def test_squatter_on_every_port_is_a_clear_start_failure(tmp_path: Path) -> None:
    name = f"sq-{os.getpid()}-every"
    reg = write_registry(tmp_path / "reg.yaml", [slow_model(name)], executable=standin_executable(tmp_path))
    with squatter(tmp_path, "every", name) as (record, out), running_gateway(reg, tmp_path / "run") as server:
        r = complete(server.url, name, "confidential eval item #42", 4, timeout=60)
        assert out.read_text().count("squatting") >= 2
        assert not record.exists(), record.read_text()
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert f"model {name} failed to start" in message and "held by another process" in message, message


# --- 12: two gateways on one run folder ---------------------------------------------------------------------


def test_second_gateway_on_the_same_run_folder_refuses_and_kills_nothing(tmp_path: Path) -> None:
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    run = tmp_path / "run"
    with running_gateway(reg, run) as first:
        assert complete(first.url, "m").status_code == 200
        engine_pid = first.gw.pool.owner.engines["m"].pid
        assert engine_pid is not None
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--registry", str(reg), "--port", str(free_port()),
                "--run-dir", str(run)]
        second = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while second.poll() is None and alive(engine_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert alive(engine_pid) and psutil.Process(engine_pid).status() != psutil.STATUS_ZOMBIE
            assert second.poll() is not None, "the second gateway is serving the same run folder"
        finally:
            if second.poll() is None:
                second.kill()
            output = second.communicate(timeout=30)[0]
        assert second.returncode != 0
        assert "another onecard gateway" in output and str(run) in output, output
        assert complete(first.url, "m").status_code == 200
        assert first.gw.pool.owner.engines["m"].pid == engine_pid
