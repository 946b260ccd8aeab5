"""The console's server side: the page and its assets, the snapshot and its access rules, and the card's
split (a pure function). The page itself is driven in a real browser in ``test_console_browser.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engines.engine_args import plan_report
from engines.gpu import GpuReading
from engines.planner import ModelPlan, Plan, Verdict
from engines.registry import Platform
from engines.state import EngineState
from gateway.app import create_app
from gateway.console import ASSETS, GpuCache, GpuNow, asset, card_view, is_public
from gateway.settings import Settings
from tests.support import ServerThread, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)

GIB = 1024**3
API_KEY = "sk-api-console-1b2c3d4e"
ADMIN_KEY = "sk-admin-console-5f6a7b8c"


def registry(tmp: Path) -> Path:
    models = [standin_model("alpha", aliases=["candidate"]), standin_model("beta")]
    return write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=1.5)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("console")
    with running_gateway(
        registry(tmp), tmp / "run", api_keys=frozenset({API_KEY}), admin_keys=frozenset({ADMIN_KEY})
    ) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the page and its assets ---------------------------------------------------------------------------


def test_page_and_assets_need_no_key_and_carry_a_strict_policy(keyed: ServerThread) -> None:
    for path in ("/", "/console"):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (path, r.status_code)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert 'src="console/assets/console.js"' in r.text
    for name, media in ASSETS.items():
        r = httpx.get(f"{keyed.url}/console/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media and r.content == asset(name)
    r = httpx.get(keyed.url + "/console/assets/../settings.py")  # the client resolves it to /console/settings.py
    assert r.status_code == 401 and "Settings" not in r.text
    assert httpx.get(keyed.url + "/console/assets/nope.js").status_code == 401  # not an asset: the usual rules
    r = httpx.get(keyed.url + "/console/assets/nope.js", headers=bearer(API_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "console.js" in r.json()["error"]["message"]


def test_public_paths_are_only_the_page_and_its_assets() -> None:
    assert is_public("/") and is_public("/console") and is_public("/console/assets/console.js")
    for path in ("/console/snapshot", "/console/assets/x.js", "/console/", "/admin/engines", "/v1/models", "//"):
        assert not is_public(path), path


def test_the_snapshot_keeps_the_gateway_rules(keyed: ServerThread) -> None:
    url = keyed.url + "/console/snapshot"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers=bearer("sk-wrong")).status_code == 401
    assert httpx.get(url, headers=bearer(API_KEY)).status_code == 200  # read-only needs no admin key
    assert httpx.get(url, headers=bearer(ADMIN_KEY)).status_code == 200
    # The page's actions are the admin routes: an API key is not enough.
    r = httpx.post(keyed.url + "/admin/engines/alpha/unload", headers=bearer(API_KEY))
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    r = httpx.get(keyed.url + "/admin/engines/alpha/log", headers=bearer(API_KEY))
    assert r.status_code == 403


def test_nothing_is_fetched_from_elsewhere_and_the_page_is_small() -> None:
    total = 0
    for name in ASSETS:
        text = asset(name).decode()
        total += len(asset(name))
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name  # no host named anywhere
        assert "innerHTML" not in text and "eval(" not in text, name
    assert total < 200 * 1024, total


def test_assets_ship_as_package_data() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for name in ASSETS:
        suffix = name.rsplit(".", 1)[1]
        assert f'"static/*.{suffix}"' in pyproject, name


# --- the snapshot is the admin routes' data -----------------------------------------------------------------


def test_snapshot_is_what_the_admin_routes_say(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run") as server:
        r = httpx.post(
            server.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200
        snap = httpx.get(server.url + "/console/snapshot").json()
        admin = httpx.get(server.url + "/admin/engines").json()
        volatile = ("uptime_s", "oldest_wait_s")
        for row, admin_row in zip(snap["engines"], admin["engines"], strict=True):
            assert {k: v for k, v in row.items() if k in admin_row and k not in volatile} == {
                k: v for k, v in admin_row.items() if k not in volatile
            }
        assert snap["swaps"] == httpx.get(server.url + "/admin/swaps").json()["swaps"]
        assert snap["leases"] == httpx.get(server.url + "/admin/leases").json()["leases"]
        assert snap["adapters"] == httpx.get(server.url + "/admin/adapters").json()
        assert snap["scheduler"] == admin["scheduler"]
        rows = {row["model"]: row for row in snap["engines"]}
        alpha, beta = rows["alpha"], rows["beta"]
        assert alpha["state"] == "ready" and alpha["aliases"] == ["candidate"]
        # A running engine shows the flags it runs with; a stopped one what `onecard plan --json` gives it.
        engine = server.gw.pool.owner.engines["alpha"]
        assert engine.process is not None
        argv = list(engine.process.argv)
        assert alpha["engine_args_source"] == "running" and alpha["engine_args"][0] == argv[2]
        assert "--port" not in alpha["engine_args"] and "--host" not in alpha["engine_args"]
        assert set(alpha["engine_args"]) <= set(argv)
        report = plan_report(server.gw.registry, server.gw.pool.owner.plan)
        planned = next(m["engine_args"] for m in report["models"] if m["name"] == "beta")
        assert beta["engine_args_source"] == "planned" and beta["engine_args"] == planned
        # The card: alpha resident at its planned footprint, no GPU on this machine.
        card = snap["card"]
        assert card["budget_gib"] == 1.5 and card["measured"] is None and snap["gpus"] == []
        resident = [s for s in card["segments"] if s["kind"] == "resident"]
        assert resident == [{"kind": "resident", "model": "alpha", "state": "ready", "gib": alpha["footprint_gib"]}]
        assert snap["gateway"]["keys"] is False and snap["gateway"]["usage_route"] is False
        assert snap["thermal"]["limit_c"] == 83.0


class CountingProbe:
    def __init__(self, reading: GpuReading) -> None:
        self.reading = reading
        self.reads = 0

    def read(self) -> list[GpuReading]:
        self.reads += 1
        return [self.reading]


CARD = GpuReading(
    index=0,
    name="NVIDIA GeForce RTX 4090",
    temperature_c=71.0,
    memory_used_bytes=9 * GIB,
    memory_total_bytes=24 * GIB,
    power_w=301.24,
    sm_clock_mhz=2520,
    utilization_ratio=0.5,
    clock_event_reasons=frozenset({"sw_power_cap"}),
    process_memory_bytes={4242: 8 * GIB},
)


def test_snapshot_shows_the_gpu_readings(tmp_path: Path) -> None:
    probe = CountingProbe(CARD)
    settings = Settings(registry_path=registry(tmp_path), run_dir=tmp_path / "run")
    server = ServerThread(create_app(settings, gpu_probe=probe))
    server.start()
    try:
        snap = httpx.get(server.url + "/console/snapshot").json()
    finally:
        server.stop()
    assert snap["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 4090",
            "temperature_c": 71.0,
            "power_w": 301.2,
            "memory_used_gib": 9.0,
            "memory_total_gib": 24.0,
            "sm_clock_mhz": 2520,
            "utilization_ratio": 0.5,
            "clock_event_reasons": ["sw_power_cap"],
        }
    ]
    assert snap["card"]["measured"] == {"used_gib": 9.0, "total_gib": 24.0, "engines_gib": {}}


async def test_gpu_readings_are_shared_between_polls() -> None:
    now = [100.0]
    me = os.getpid()  # stands for an engine process: NVML reports 8 GiB for it
    probe = CountingProbe(dataclasses.replace(CARD, process_memory_bytes={me: 8 * GIB}))
    cache = GpuCache(every_s=1.0, clock=lambda: now[0])
    first = await cache.read(probe, {"alpha": me})
    assert probe.reads == 2  # the card, then the engine's process tree (engines.gpu.engine_gpu_bytes)
    assert first.engine_bytes == {"alpha": 8 * GIB}
    assert await cache.read(probe, {"alpha": me}) is first
    now[0] += 1.0
    again = await asyncio.gather(cache.read(probe, {}), cache.read(probe, {}))
    assert probe.reads == 3 and again[0] is again[1]
    assert await GpuCache().read(None, {"alpha": 1}) == GpuNow()


# --- the card's split --------------------------------------------------------------------------------------


def model_plan(name: str, gib: float, measured: float | None = None) -> ModelPlan:
    return ModelPlan(
        name=name,
        weights_gib=gib / 2,
        kv_gib=gib / 4,
        overhead_gib=gib / 4,
        offload_gib=0.0,
        total_gib=gib,
        verdict=Verdict.FITS,
        kv_cache_bytes=0,
        measured_gib=measured,
    )


def plan(platform: Platform = Platform.CUDA) -> Plan:
    models = (model_plan("llama-8b", 14.0, measured=13.5), model_plan("phi-3", 8.0), model_plan("qwen-14b", 16.0))
    return Plan(budget_gib=24.0, headroom_gib=1.0, platform=platform, models=models, co_resident_sets=())


def split(view: dict[str, object]) -> dict[tuple[str, str | None], float]:
    segments = view["segments"]
    assert isinstance(segments, list)
    return {(s["kind"], s["model"]): s["gib"] for s in segments}


def test_card_counts_resident_engines_lease_headroom_and_free() -> None:
    states = {"llama-8b": EngineState.READY, "phi-3": EngineState.STOPPED, "qwen-14b": EngineState.STOPPED}
    view = card_view(plan(), states=states, reserved_gib=4.0, sleep_frees=True, gpu=GpuNow())
    assert split(view) == {
        ("resident", "llama-8b"): 13.5,
        ("lease", None): 4.0,
        ("headroom", None): 1.0,
        ("free", None): 5.5,
    }
    assert view["planned_used_gib"] == 17.5 and view["over_budget_gib"] == 0.0 and view["measured"] is None


def test_a_sleeping_engine_holds_what_nvml_sees_where_sleep_frees_memory() -> None:
    states = {"llama-8b": EngineState.SLEEPING, "phi-3": EngineState.STARTING, "qwen-14b": EngineState.STOPPED}
    gpu = GpuNow((CARD,), {"llama-8b": GIB // 2, "phi-3": 0})
    view = card_view(plan(), states=states, reserved_gib=0.0, sleep_frees=True, gpu=gpu)
    assert split(view) == {
        ("sleeping", "llama-8b"): 0.5,
        ("resident", "phi-3"): 8.0,
        ("headroom", None): 1.0,
        ("free", None): 14.5,
    }
    assert view["measured"] == {"used_gib": 9.0, "total_gib": 24.0, "engines_gib": {"llama-8b": 0.5}}


def test_a_sleeping_engine_holds_its_footprint_where_sleep_frees_nothing() -> None:
    states = {"llama-8b": EngineState.SLEEPING, "phi-3": EngineState.STOPPED, "qwen-14b": EngineState.READY}
    view = card_view(plan(Platform.CPU), states=states, reserved_gib=0.0, sleep_frees=False, gpu=GpuNow())
    assert split(view)[("sleeping", "llama-8b")] == 13.5
    assert split(view)[("free", None)] == 0.0 and view["over_budget_gib"] == 6.5  # 13.5 + 16 + 1 > 24
