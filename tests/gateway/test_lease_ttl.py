"""Leases end without a live, heartbeating holder: a TTL renewed by heartbeats (``onecard lease`` sends
them), and no lease is kept across a restart once its TTL has run out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, running_gateway, standin_executable, standin_model, until, write_registry

pytestmark = pytest.mark.timeout(120)


def registry(tmp_path: Path) -> Path:
    models = [standin_model("a"), standin_model("b")]
    return write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=2.5)


def lease_ids(url: str) -> list[str]:
    return [x["id"] for x in httpx.get(url + "/admin/leases", timeout=10).json()["leases"]]


def test_lease_without_heartbeats_ends_after_its_ttl(tmp_path: Path) -> None:
    """A lease held by a live process that never heartbeats (here: this test's own pid) does not hold
    the card for ever: it ends after its TTL, and what it kept out can load again."""
    with running_gateway(registry(tmp_path), tmp_path / "run") as gw:
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 2.0, "pid": os.getpid(), "ttl_s": 2}, timeout=30)
        assert r.status_code == 201, r.text
        held = httpx.post(gw.url + "/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2},
                          timeout=30)
        assert held.status_code == 503  # the lease leaves no room for b
        assert until(lambda: lease_ids(gw.url) == [], timeout=10)
        ok = httpx.post(gw.url + "/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_heartbeats_keep_a_lease_past_its_ttl(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run") as gw:
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 1.0, "pid": os.getpid(), "ttl_s": 2}, timeout=30)
        assert r.status_code == 201, r.text
        lease = r.json()
        assert lease["ttl_s"] == 2 and lease["expires_in_s"] <= 2
        for _ in range(6):
            time.sleep(0.5)
            hb = httpx.post(f"{gw.url}/admin/leases/{lease['id']}/heartbeat", timeout=10)
            assert hb.status_code == 200, hb.text
            assert hb.json()["id"] == lease["id"]
        assert lease_ids(gw.url) == [lease["id"]]
        assert until(lambda: lease_ids(gw.url) == [], timeout=10)
        gone = httpx.post(f"{gw.url}/admin/leases/{lease['id']}/heartbeat", timeout=10)
        assert gone.status_code == 409 and "no active lease" in gone.json()["error"]["message"]


def test_onecard_lease_heartbeats_while_its_command_runs(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run") as gw:
        gw.gw.pool.owner.leases.ttl_s = 1.5
        marker = tmp_path / "during.json"
        code = (
            "import json, time, urllib.request\n"
            "time.sleep(4)\n"  # well past the TTL
            f"d = json.load(urllib.request.urlopen('{gw.url}/admin/leases'))\n"
            f"open({str(marker)!r}, 'w').write(json.dumps(d))\n"
        )
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "lease", "--gib", "1", "--url", gw.url, "--",
                               sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr
        assert len(json.loads(marker.read_text())["leases"]) == 1  # still held after 4 s
        assert lease_ids(gw.url) == []


def test_lease_past_its_ttl_is_not_kept_across_a_restart(tmp_path: Path) -> None:
    """The holder is alive but stopped heartbeating while the gateway was down: the restart drops it."""
    reg = registry(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with running_gateway(reg, tmp_path / "run") as gw:
            r = httpx.post(gw.url + "/admin/leases", json={"gib": 1, "pid": holder.pid, "ttl_s": 1}, timeout=30)
            assert r.status_code == 201, r.text
        time.sleep(2.5)
        with running_gateway(reg, tmp_path / "run") as gw:
            assert lease_ids(gw.url) == []
    finally:
        holder.kill()
        holder.wait()
