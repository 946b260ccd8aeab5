"""GPU leases and adapter discovery, with stand-in engines behind a real gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, running_gateway, standin_executable, standin_model, until, write_registry

pytestmark = pytest.mark.timeout(120)


def states(url: str) -> dict[str, str]:
    return {e["model"]: e["state"] for e in httpx.get(url + "/admin/engines").json()["engines"]}


def three_models(tmp_path: Path, **pins: bool) -> Path:
    models = [standin_model(n, pinned=pins.get(n, False)) for n in ("a", "b", "c")]
    return write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=3.2)


def load_all(url: str) -> None:
    for m in ("a", "b", "c"):
        assert httpx.post(f"{url}/admin/engines/{m}/load", timeout=60).status_code == 200
    assert set(states(url).values()) == {"ready"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=60)


def test_lease_evicts_exactly_what_it_must(tmp_path: Path) -> None:
    # a and b plan at ~1 GiB, c at ~2 GiB: all three share a 4.2 GiB card.
    models = [standin_model("a"), standin_model("b"), standin_model("c", gib=2.0)]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=4.2)
    with running_gateway(reg, tmp_path / "run") as gw:
        load_all(gw.url)
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 1.0, "pid": os.getpid(), "label": "t"}, timeout=60)
        assert r.status_code == 201, r.text
        lease = r.json()
        # 4.0 GiB resident in 3.2 left: one engine must go, and only one.
        assert len(lease["evicted"]) == 1
        after = states(gw.url)
        assert after[lease["evicted"][0]] == "stopped"
        assert sorted(after.values()) == ["ready", "ready", "stopped"]
        metrics = httpx.get(gw.url + "/metrics").text
        assert "onecard_lease_active 1.0" in metrics and "onecard_lease_granted_gib 1.0" in metrics
        # The evicted model still fits in what the lease left: it is served (by a swap within 3.2 GiB).
        assert complete(gw.url, lease["evicted"][0]).status_code == 200
        assert httpx.delete(f"{gw.url}/admin/leases/{lease['id']}").status_code == 200
        assert "onecard_lease_active 0.0" in httpx.get(gw.url + "/metrics").text

        # A larger lease leaves 1.7 GiB: c can no longer fit at all and gets 503 with Retry-After.
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 2.5, "pid": os.getpid()}, timeout=60)
        assert r.status_code == 201
        assert states(gw.url)["c"] == "stopped"  # evicted now, or already stopped by the swap above
        big = r.json()["id"]
        r = complete(gw.url, "c")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "leased" in r.json()["error"]["message"]
        kept = next(m for m, s in states(gw.url).items() if s == "ready")
        assert complete(gw.url, kept).status_code == 200  # what still fits is served
        assert httpx.delete(f"{gw.url}/admin/leases/{big}").status_code == 200
        assert complete(gw.url, "c").status_code == 200  # after the lease, c is made resident again


def test_lease_that_can_never_be_granted_is_refused(tmp_path: Path) -> None:
    with running_gateway(three_models(tmp_path, a=True), tmp_path / "run") as gw:
        load_all(gw.url)
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 2.5, "pid": os.getpid()}, timeout=30)
        assert r.status_code == 409
        assert "pinned models ['a']" in r.json()["error"]["message"]
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 50, "pid": os.getpid()}, timeout=30)
        assert r.status_code == 409 and "more than the card's usable" in r.json()["error"]["message"]
        assert set(states(gw.url).values()) == {"ready"}  # nothing was evicted for a refused lease
        # The whole card but the pinned model: both others go, the pinned one stays.
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 2.1, "pid": os.getpid()}, timeout=30)
        assert r.status_code == 201 and sorted(r.json()["evicted"]) == ["b", "c"]
        assert states(gw.url)["a"] == "ready"


def test_lease_ends_with_the_command_and_on_release(tmp_path: Path) -> None:
    with running_gateway(three_models(tmp_path), tmp_path / "run") as gw:
        marker = tmp_path / "during.json"
        code = (
            f"import json,urllib.request,os; d=json.load(urllib.request.urlopen('{gw.url}/admin/leases'));"
            f"open({str(marker)!r},'w').write(json.dumps([d, os.environ['ONECARD_LEASE_ID']]))"
        )
        done = cli("lease", "--gib", "1", "--url", gw.url, "--", sys.executable, "-c", code)
        assert done.returncode == 0, done.stderr
        during, lease_id = json.loads(marker.read_text())
        assert [lease["id"] for lease in during["leases"]] == [lease_id]
        assert httpx.get(gw.url + "/admin/leases").json()["leases"] == []
        # A failing command's exit code comes back, and the lease still ends.
        assert cli("lease", "--url", gw.url, "--", sys.executable, "-c", "raise SystemExit(3)").returncode == 3
        assert httpx.get(gw.url + "/admin/leases").json()["leases"] == []
        # onecard lease release ID
        r = httpx.post(gw.url + "/admin/leases", json={"gib": 1, "pid": os.getpid()}, timeout=30)
        out = cli("lease", "--url", gw.url, "release", r.json()["id"])
        assert out.returncode == 0 and "released" in out.stdout
        assert httpx.get(gw.url + "/admin/leases").json()["leases"] == []


def test_lease_ends_when_its_holder_dies_and_survives_a_restart(tmp_path: Path) -> None:
    reg = three_models(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with running_gateway(reg, tmp_path / "run") as gw:
            r = httpx.post(gw.url + "/admin/leases", json={"gib": 1, "pid": holder.pid}, timeout=30)
            assert r.status_code == 201
            lease_id = r.json()["id"]
        with running_gateway(reg, tmp_path / "run") as gw:  # a restart: the lease is still held
            leases = httpx.get(gw.url + "/admin/leases").json()["leases"]
            assert [x["id"] for x in leases] == [lease_id]
            ps = cli("ps", "--url", gw.url)
            assert f"lease {lease_id}" in ps.stdout
            holder.kill()
            holder.wait()
            assert until(lambda: httpx.get(gw.url + "/admin/leases").json()["leases"] == [], timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()


def write_adapter(folder: Path, *, base: str, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": base,
                "r": rank,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_adapter_folder_appears_and_bad_ones_are_reported(tmp_path: Path) -> None:
    watch = tmp_path / "adapters"
    watch.mkdir()
    models = [standin_model("alpha", lora={"enabled": True, "max_rank": 16, "watch_dirs": [str(watch)]})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path))
    with running_gateway(reg, tmp_path / "run") as gw:
        gw.gw.pool.owner.catalogue.scan_s = 0.2
        write_adapter(watch / "tuesday-r8", base="standin/alpha")
        write_adapter(watch / "too-big", base="standin/alpha", rank=64)
        write_adapter(watch / "other-base", base="meta-llama/Other")
        (watch / "not-json").mkdir()
        (watch / "not-json" / "adapter_config.json").write_text("{oops")

        def ids() -> set[str]:
            return {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}

        assert until(lambda: "tuesday-r8" in ids(), timeout=10)
        assert not {"too-big", "other-base", "not-json"} & ids()
        problems = {Path(p["path"]).name: p["reason"] for p in httpx.get(gw.url + "/admin/adapters").json()["problems"]}
        assert "above alpha's lora.max_rank (16)" in problems["too-big"]
        assert "is not alpha" in problems["other-base"]
        assert "not valid JSON" in problems["not-json"]
        base = httpx.post(
            gw.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 4}, timeout=60
        ).json()
        tuned = httpx.post(
            gw.url + "/v1/completions", json={"model": "tuesday-r8", "prompt": "x", "max_tokens": 4}, timeout=60
        ).json()
        assert tuned["model"] == "tuesday-r8" and tuned["choices"][0]["text"] != base["choices"][0]["text"]
