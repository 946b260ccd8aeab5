"""The console in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python client),
in front of ``onecard serve`` subprocesses with stand-in engines.

Skips, saying why, only where the ``chromium`` executable is missing. Saves the page at a desktop and a
laptop width under ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.test_simcard import L8B, PHI3, QWEN14, Lab
from tests.support import ROOT, GatewayProcess, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("the chromium executable is not installed (Debian: apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, sync_playwright  # noqa: E402

ADMIN_KEY = "sk-admin-console-8c41e07d93b2"
API_KEY = "sk-api-console-2d7e19f0a4c6"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
RESULTS = ROOT / "benchmarks" / "results"
SIZES = {"desktop": (1440, 900), "laptop": (1280, 800)}


def write_adapter(folder: Path, *, base: str, rank: int = 8) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "target_modules": ["q_proj", "v_proj"]}
        )
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")


def console_registry(tmp: Path) -> Path:
    """alpha and beta cannot share the 1.5 GiB budget, so asking for one evicts the other."""
    watch = tmp / "adapters"
    write_adapter(watch / "alpha-tuesday-r8", base="standin/alpha")
    write_adapter(watch / "alpha-r64", base="standin/alpha", rank=64)
    write_adapter(watch / HOSTILE_NAME, base="standin/alpha")  # refused (not a model name), shown as text
    models = [
        standin_model(
            "alpha", aliases=["candidate"], lora={"enabled": True, "max_rank": 16, "watch_dirs": [str(watch)]}
        ),
        standin_model("beta", aliases=["judge"], env={"STANDIN_START_DELAY": "1.5"}),  # a start the page can see
    ]
    return write_registry(
        tmp / "reg.yaml",
        models,
        executable=standin_executable(tmp),
        budget_gib=1.5,
        scheduler={"max_wait_s": 30, "max_queue": 64, "keepalive_s": 0.5},
    )


class Gateway(GatewayProcess):
    """``onecard serve`` with the admin key set, restartable on the same port."""

    def __init__(self, tmp: Path, *, port: int | None = None) -> None:
        super().__init__(
            console_registry(tmp) if not (tmp / "reg.yaml").exists() else tmp / "reg.yaml",
            tmp / "run",
            port,
            env={"ONECARD_ADMIN_KEYS": ADMIN_KEY},
        )

    def admin(self, method: str, path: str, json: Any = None) -> httpx.Response:
        return httpx.request(
            method, self.url + path, json=json, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def state(self, model: str) -> str:
        rows = self.admin("GET", "/admin/engines").json()["engines"]
        return str(next(r["state"] for r in rows if r["model"] == model))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.close()


class Tab:
    """One page, with every console message and page error it produced."""

    def __init__(
        self, browser: Browser, url: str, size: tuple[int, int] = SIZES["desktop"], *, ready: bool = True
    ) -> None:
        self.page: Page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.goto(url + "/")
        if ready:
            self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)

    def _dialog(self, dialog: Dialog) -> None:
        self.errors.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            self.errors.append(f"{msg.type}: {msg.text}")

    def engine_state(self, model: str) -> str | None:
        loc = self.page.locator(f"tbody.engine[data-model='{model}']")
        return loc.get_attribute("data-state") if loc.count() else None

    def close(self) -> None:
        self.page.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=60)


def test_loads_clean_and_shows_a_swap_within_two_seconds(browser: Browser, gateway: Gateway) -> None:
    assert complete(gateway.url, "alpha").status_code == 200
    tab = Tab(browser, gateway.url)
    assert tab.errors == [], tab.errors  # nothing on load: no failed fetch, no script error, no CSP refusal
    assert tab.engine_state("alpha") == "ready" and tab.engine_state("beta") == "stopped"
    assert tab.page.locator("#timeline li[data-model='alpha']").count() == 1
    # The card, the adapters and the usage section read what the gateway reports.
    assert tab.page.locator("#bar .seg.resident[data-model='alpha']").count() == 1
    assert "alpha-tuesday-r8" in tab.page.inner_text("#adapters")
    assert "above alpha's lora.max_rank (16)" in tab.page.inner_text("#adapters")
    assert HOSTILE_NAME in tab.page.inner_text("#adapters") and tab.page.locator("img").count() == 0
    assert "no users file" in tab.page.inner_text("#usage")
    flags = tab.page.text_content("tbody.engine[data-model='alpha'] pre.flags") or ""
    assert "--served-model-name alpha" in flags and "--port" not in flags

    seen: list[str | None] = []
    done: dict[str, float] = {}

    def ask_beta() -> None:
        try:
            done["status"] = complete(gateway.url, "judge").status_code
        finally:
            done["at"] = time.monotonic()

    asker = threading.Thread(target=ask_beta)
    asker.start()
    while "at" not in done:  # the page while the swap happens
        seen.append(tab.engine_state("beta"))
        time.sleep(0.05)
    asker.join()
    assert done.get("status") == 200, done
    # Within 2 s of the swap being done (the request answered), the page shows it: state and timeline.
    shown = wait_until(
        lambda: (
            tab.engine_state("beta") == "ready"
            and tab.page.locator("#timeline li[data-model='beta']").count() == 1
            and tab.engine_state("alpha") == "stopped"
        ),
        2.0,
        "the swap on the page",
    )
    assert "starting" in seen, seen  # the state change itself was on the page, not only its outcome
    entry = tab.page.inner_text("#timeline li[data-model='beta']")
    assert "evicted alpha" in entry and "cold" in entry, entry
    swap = gateway.admin("GET", "/admin/swaps").json()["swaps"][-1]
    assert swap["model"] == "beta" and swap["reason"] in entry
    print(f"swap shown {shown:.2f} s after the request that caused it was answered")

    # A lease beside beta shows on the bar and in the leases section.
    lease = gateway.admin("POST", "/admin/leases", json={"gib": 0.4, "pid": os.getpid(), "label": "train.py"})
    assert lease.status_code == 201, lease.text
    wait_until(
        lambda: tab.page.locator(f"#leases tr[data-lease='{lease.json()['id']}']").count() == 1,
        2.0,
        "the lease on the page",
    )
    assert tab.page.locator("#bar .seg.lease").count() == 1

    tab.close()


def test_unload_from_the_page_needs_the_admin_key(browser: Browser, gateway: Gateway) -> None:
    assert complete(gateway.url, "alpha").status_code == 200
    tab = Tab(browser, gateway.url)
    assert tab.errors == [], tab.errors
    unload = tab.page.locator("tbody.engine[data-model='alpha'] button[data-action='unload']")
    assert tab.page.inner_text("#mode") == "read-only"

    unload.click()  # no key: the gateway refuses, the engine stays
    tab.page.wait_for_selector("#toast.error:not([hidden])", timeout=5_000)
    toast = tab.page.inner_text("#toast")
    assert "refused (401)" in toast and "admin key" in toast, toast
    assert gateway.state("alpha") == "ready"

    tab.page.fill("#key", ADMIN_KEY)
    tab.page.click("#key-use")
    assert "key set" in tab.page.inner_text("#mode")
    assert tab.page.evaluate("sessionStorage.getItem('onecard.key')") == ADMIN_KEY
    assert tab.page.evaluate("localStorage.length") == 0 and tab.page.context.cookies() == []
    unload.click()
    wait_until(lambda: gateway.state("alpha") == "stopped", 15, "alpha to stop")
    wait_until(lambda: tab.engine_state("alpha") == "stopped", 2.0, "the page to show alpha stopped")
    tab.page.locator("tbody.engine[data-model='alpha'] button[data-action='load']").click()
    wait_until(lambda: gateway.state("alpha") == "ready", 15, "alpha loaded from the page")
    # Release a lease from the page.
    lease = gateway.admin("POST", "/admin/leases", json={"gib": 0.5, "pid": os.getpid(), "label": "train.py"})
    assert lease.status_code == 201, lease.text
    release = tab.page.locator(f"#leases tr[data-lease='{lease.json()['id']}'] button[data-action='release']")
    release.click()
    wait_until(lambda: gateway.admin("GET", "/admin/leases").json()["leases"] == [], 5.0, "the lease to end")
    wait_until(lambda: tab.page.locator("#leases tr[data-lease]").count() == 0, 2.0, "the page to drop the lease")
    # The log tail is admin-only; with the key the page reads it.
    tab.page.click("tbody.engine[data-model='alpha'] details.log-details summary")
    log_box = "tbody.engine[data-model='alpha'] pre.log"
    wait_until(lambda: "API server version" in (tab.page.text_content(log_box) or ""), 5.0, "the log tail on the page")
    tab.close()
    log = gateway.log()
    assert ADMIN_KEY not in log and "Bearer" not in log


def test_a_gateway_restart_is_survived_without_a_reload(browser: Browser, tmp_path: Path, gateway: Gateway) -> None:
    tab = Tab(browser, gateway.url)
    before = tab.page.get_attribute("#gw-info", "data-started-at")
    tab.page.evaluate("window.__sameDocument = true")
    t0 = time.monotonic()
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway.log()
    assert time.monotonic() - t0 < 10  # an open console holds no connection that delays the shutdown
    tab.page.wait_for_selector("#live[data-live='reconnecting']", timeout=5_000)

    again = Gateway(tmp_path, port=gateway.port).start()
    try:
        tab.page.wait_for_selector("#live[data-live='live']", timeout=5_000)
        wait_until(
            lambda: tab.page.get_attribute("#gw-info", "data-started-at") != before,
            5.0,
            "the restarted gateway on the page",
        )
        assert tab.page.evaluate("window.__sameDocument") is True  # the same page, never reloaded
        assert complete(again.url, "beta").status_code == 200
        wait_until(lambda: tab.engine_state("beta") == "ready", 2.0, "the restarted gateway's swap on the page")
        assert not [e for e in tab.errors if e.startswith("page error")], tab.errors
    finally:
        tab.close()
        again.close()


def test_a_simulated_24_gib_card_with_the_lab_models(browser: Browser, tmp_path: Path) -> None:
    """The shipped 8B, Phi-3 and Qwen 14B on a simulated 24 GiB card that a fake NVML reports."""
    lab = Lab(tmp_path, (L8B, PHI3, QWEN14))
    lab.gateway.start()
    try:
        lab.ask_right(QWEN14)
        tab = Tab(browser, lab.url)
        assert tab.errors == [], tab.errors
        tiles = tab.page.inner_text("#gpus")
        assert "58 °C" in tiles and "180 W" in tiles and "cap 83 °C" in tiles, tiles
        assert tab.page.locator("#bar .marker").count() == 1  # NVML's measured total on the bar
        # No keys on this gateway: the page's actions work from this machine, as the admin routes do.
        assert "admin from this machine" in tab.page.inner_text("#mode")
        tab.page.locator(f"tbody.engine[data-model='{QWEN14}'] button[data-action='sleep']").click()
        wait_until(lambda: lab.engines()[QWEN14]["state"] == "sleeping", 15, "the 14B asleep")
        wait_until(lambda: tab.engine_state(QWEN14) == "sleeping", 2.0, "the page to show the 14B asleep")
        assert "level 1" in tab.page.inner_text(f"tbody.engine[data-model='{QWEN14}'] .pill")
        lab.ask_right(L8B)
        lab.ask_right(PHI3)
        wait_until(lambda: tab.engine_state(L8B) == tab.engine_state(PHI3) == "ready", 2.0, "both resident")
        wait_until(lambda: tab.page.locator("#bar .seg.resident").count() == 2, 2.0, "two engines on the bar")
        # NVML's reading (read at most once a second for every open page) catches up with the card.
        used = f"measured (NVML) {lab.card().used / 1024**3:.2f} of 24.00 GiB"
        wait_until(lambda: used in tab.page.inner_text("#card-summary"), 3.0, used)
        assert "Budget 24.00 GiB (cuda)" in tab.page.inner_text("#card-summary")
        assert tab.page.locator("#timeline li").count() == 3
        assert tab.errors == [], tab.errors
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name, (w, h) in SIZES.items():
            tab.page.set_viewport_size({"width": w, "height": h})
            tab.page.wait_for_timeout(300)
            tab.page.screenshot(path=str(RESULTS / f"console-{name}.png"))
        # Waking the 14B from the page makes room for it: a wake on the timeline, with what it evicted.
        tab.page.locator(f"tbody.engine[data-model='{QWEN14}'] button[data-action='wake']").click()
        wait_until(lambda: lab.engines()[QWEN14]["state"] == "ready", 20, "the 14B awake")
        wait_until(
            lambda: tab.page.locator(f"#timeline li[data-model='{QWEN14}'][data-kind='wake']").count() == 1,
            2.0,
            "the wake on the timeline",
        )
        wake = httpx.get(lab.url + "/admin/swaps", timeout=10).json()["swaps"][-1]
        assert wake["model"] == QWEN14 and wake["kind"] == "wake" and wake["evicted"], wake
        entry = tab.page.inner_text(f"#timeline li[data-model='{QWEN14}'][data-kind='wake']")
        assert "evicted " + ", ".join(wake["evicted"]) in entry and wake["reason"] in entry, entry
        assert tab.errors == [], tab.errors
        tab.close()
    finally:
        lab.gateway.close()


def test_with_api_keys_the_page_asks_for_a_key_and_an_api_key_reads_but_cannot_act(
    browser: Browser, tmp_path: Path
) -> None:
    keys = {"api_keys": frozenset({API_KEY}), "admin_keys": frozenset({ADMIN_KEY})}
    with running_gateway(console_registry(tmp_path), tmp_path / "run", **keys) as server:
        assert complete_with(server.url, "alpha", API_KEY).status_code == 200
        tab = Tab(browser, server.url, ready=False)  # the page loads; its data needs a key
        tab.page.wait_for_selector("#live[data-live='refused']", timeout=5_000)
        assert "needs a key" in tab.page.inner_text("#live")
        assert tab.engine_state("alpha") is None
        tab.page.fill("#key", API_KEY)
        tab.page.click("#key-use")
        tab.page.wait_for_selector("#live[data-live='live']", timeout=5_000)
        wait_until(lambda: tab.engine_state("alpha") == "ready", 2.0, "the engines with the API key")
        assert "no users file" in tab.page.inner_text("#usage")
        tab.page.locator("tbody.engine[data-model='alpha'] button[data-action='unload']").click()
        tab.page.wait_for_selector("#toast.error:not([hidden])", timeout=5_000)
        toast = tab.page.inner_text("#toast")
        assert "refused (403)" in toast and "not an admin key" in toast, toast
        assert server.gw.pool.owner.engines["alpha"].state.value == "ready"
        assert not [e for e in tab.errors if not e.startswith("error: Failed to load resource")], tab.errors
        tab.close()


def complete_with(url: str, model: str, key: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        json={"model": model, "prompt": "x", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
