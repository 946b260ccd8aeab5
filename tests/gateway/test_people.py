"""The lab's people through ``onecard serve`` (a subprocess) with stand-in engines: keys, classes and the
``priority`` engines receive, fair shares, chat before batch, usage that lasts, and whose process may
hold a lease."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engines.people import UserClass, add_user
from tests.support import ROOT, GatewayProcess, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(180)

ANON_KEY = "anon-key-from-the-environment"


def keyless() -> dict[str, str]:
    return {"ONECARD_API_KEYS": "", "ONECARD_ADMIN_KEYS": "", "ONECARD_USERS": ""}


def make_users(path: Path, spec: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Users added with ``add_user`` (keys returned), then given the extra fields of ``spec``."""
    keys = {
        name: add_user(path, name, klass=UserClass(fields.get("class", "batch")), admin=fields.get("admin", False))
        for name, fields in spec.items()
    }
    data = yaml.safe_load(path.read_text())
    for entry in data["users"]:
        entry.update({k: v for k, v in spec[entry["name"]].items() if k not in ("class", "admin")})
    path.write_text(yaml.safe_dump(data))
    return keys


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(model: str, prompt: str, max_tokens: int = 2, **more: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, **more}


class Lab:
    def __init__(self, gw: GatewayProcess, keys: dict[str, str]) -> None:
        self.gw, self.keys, self.url = gw, keys, gw.url

    def post(
        self,
        user: str,
        payload: dict[str, Any],
        *,
        path: str = "/v1/completions",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return httpx.post(
            self.url + path, json=payload, headers={**auth(self.keys[user]), **(headers or {})}, timeout=60
        )

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=auth(self.keys["ops"]), timeout=60, **kw)

    def engine_stats(self, model: str) -> dict[str, Any]:
        rows = self.admin("GET", "/admin/engines").json()["engines"]
        port = next(r["port"] for r in rows if r["model"] == model)
        data: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/standin/stats", timeout=10).json()
        return data

    def received(self, model: str, marker: str) -> list[dict[str, Any]]:
        return [r for r in self.engine_stats(model)["received"] if marker in r["prompt"]]


def start(tmp: Path, registry: Path, keys: dict[str, str], run: str = "run") -> Lab:
    env = {**keyless(), "ONECARD_API_KEYS": ANON_KEY}
    gw = GatewayProcess(registry, tmp / run, env=env, args=("--users", str(tmp / "users.yaml"))).start()
    return Lab(gw, keys)


LAB_USERS: dict[str, dict[str, Any]] = {
    "ops": {"admin": True, "class": "interactive"},
    "alice": {"max_in_flight": 1},
    "bob": {},
    "chat": {"class": "interactive"},
    "ev": {},
    "tuner": {"set_priority": True},
    "counter": {},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One gateway for the single-model tests; every model fits beside the others."""
    tmp = tmp_path_factory.mktemp("people")
    keys = make_users(tmp / "users.yaml", LAB_USERS)
    models = [
        standin_model("m"),
        standin_model("slow", env={"STANDIN_TOKEN_DELAY": "0.05"}),
        standin_model("late", env={"STANDIN_START_DELAY": "2"}),
    ]
    reg = write_registry(
        tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=8, scheduler={"max_wait_s": 1}
    )
    lab = start(tmp, reg, keys)
    try:
        for m in ("m", "slow"):
            assert lab.admin("POST", f"/admin/engines/{m}/load").status_code == 200
        yield lab
    finally:
        lab.gw.close()


# --- keys ------------------------------------------------------------------------------------------------


def test_once_the_file_names_anyone_every_route_but_health_needs_a_key(lab: Lab) -> None:
    assert httpx.get(lab.url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/admin/usage"):
        assert httpx.get(lab.url + path).status_code == 401, path
    assert httpx.get(lab.url + "/v1/models", headers=auth("oc-not-a-key")).status_code == 401
    assert httpx.get(lab.url + "/v1/models", headers=auth(lab.keys["bob"])).status_code == 200
    refused = httpx.get(lab.url + "/admin/usage", headers=auth(lab.keys["bob"]))
    assert refused.status_code == 403 and "not an admin key" in refused.json()["error"]["message"]
    # ONECARD_API_KEYS keep working, as the anonymous user
    r = httpx.post(lab.url + "/v1/completions", json=body("m", "from the environment"), headers=auth(ANON_KEY))
    assert r.status_code == 200
    users = {row["user"] for row in lab.admin("GET", "/admin/usage").json()["usage"]}
    assert "anonymous" in users


# --- classes and vLLM's priority -------------------------------------------------------------------------


def test_the_priority_a_request_reaches_the_engine_with(lab: Lab) -> None:
    sent = [
        ("chat", body("m", "prio-chat"), {}, -10),  # interactive goes first
        ("chat", body("m", "prio-chat-as-batch"), {"x-onecard-class": "batch"}, 0),  # asked to be batch
        ("ev", body("m", "prio-ev"), {}, 0),  # batch: vLLM's default
        ("ev", body("m", "prio-ev-own", priority=-100), {}, 0),  # its own value replaced
        ("tuner", body("m", "prio-tuner-own", priority=-5), {}, -5),  # may set its own
        ("tuner", body("m", "prio-tuner-none"), {}, 0),
    ]
    for user, payload, headers, _ in sent:
        r = lab.post(user, payload, headers=headers)
        assert r.status_code == 200, r.text
    chat = {"model": "m", "messages": [{"role": "user", "content": "prio-chat-messages"}], "max_tokens": 2}
    assert lab.post("chat", chat, path="/v1/chat/completions").status_code == 200
    for _, payload, _, want in sent:
        got = [r["priority"] for r in lab.received("m", payload["prompt"]) if r["prompt"] == payload["prompt"]]
        assert got == [want], payload["prompt"]
    assert [r["priority"] for r in lab.received("m", "prio-chat-messages")] == [-10]


def test_a_batch_key_cannot_raise_its_class(lab: Lab) -> None:
    r = lab.post("ev", body("m", "raise-attempt"), headers={"x-onecard-class": "interactive"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "not_permitted" and err["param"] == "x-onecard-class"
    assert "'ev' is of class 'batch' and cannot ask for 'interactive'" in err["message"]
    assert lab.received("m", "raise-attempt") == []  # nothing reached the engine
    bad = lab.post("ev", body("m", "bad-class"), headers={"x-onecard-class": "vip"})
    assert bad.status_code == 400 and "unknown class 'vip'" in bad.json()["error"]["message"]


# --- fair shares -----------------------------------------------------------------------------------------


def test_a_user_at_their_limit_queues_then_gets_429_while_another_is_served(lab: Lab) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response, float, bool]:
        async with httpx.AsyncClient(timeout=60) as c:

            def send(user: str, prompt: str, n: int) -> Any:
                return c.post(lab.url + "/v1/completions", json=body("slow", prompt, n), headers=auth(lab.keys[user]))

            first = asyncio.ensure_future(send("alice", "alice-long", 100))  # ~5 s on the engine
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            second = asyncio.ensure_future(send("alice", "alice-over-limit", 2))
            await asyncio.sleep(0.3)
            bob = await send("bob", "bob-meanwhile", 2)
            bob_s = time.monotonic() - t0
            still_queued = not second.done()
            return await first, await second, bob, bob_s, still_queued

    first, second, bob, bob_s, still_queued = asyncio.run(scenario())
    assert bob.status_code == 200 and still_queued and bob_s < 2.0  # served while alice's second waited
    assert second.status_code == 429
    err = second.json()["error"]
    assert err["code"] == "user_limit" and "their limit" in err["message"]
    assert float(second.headers["retry-after"]) >= 1
    assert first.status_code == 200
    assert lab.received("slow", "alice-over-limit") == []


def test_two_users_queued_for_one_model_are_admitted_in_turn(lab: Lab) -> None:
    """``late`` takes 2 s to start: alice queues 8 requests, then bob 2; bob's do not wait behind all of
    alice's (first come, first served would send them 9th and 10th)."""

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:

            def send(user: str, prompt: str) -> Any:
                return c.post(lab.url + "/v1/completions", json=body("late", prompt), headers=auth(lab.keys[user]))

            tasks = [asyncio.ensure_future(send("ev", f"turn-ev-{i}")) for i in range(8)]
            await asyncio.sleep(0.5)
            tasks += [asyncio.ensure_future(send("bob", f"turn-bob-{i}")) for i in range(2)]
            return [r.status_code for r in await asyncio.gather(*tasks)]

    assert asyncio.run(scenario()) == [200] * 10
    order = [r["prompt"] for r in lab.received("late", "turn-")]
    assert len(order) == 10
    bob_at = [i + 1 for i, p in enumerate(order) if "bob" in p]
    assert max(bob_at) <= 5, order  # round robin admits them 2nd and 4th


# --- usage -----------------------------------------------------------------------------------------------


def user_counters(text: str, user: str, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name.startswith("onecard_user_")
                and s.name.endswith("_total")
                and s.labels == {"user": user, "model": model}
            ):
                out[s.name] = s.value
    return out


def test_per_user_token_counters_equal_the_usage_returned(lab: Lab) -> None:
    prompt = completion = 0
    for i in range(3):
        r = lab.post("counter", body("m", f"count words {i} " * (i + 1), 3 + i))
        assert r.status_code == 200
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
    stream = body("m", "count a stream", 5, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", lab.url + "/v1/completions", json=stream, headers=auth(lab.keys["counter"])) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    last = httpx.Response(200, content=events[-1]).json()
    prompt += last["usage"]["prompt_tokens"]
    completion += last["usage"]["completion_tokens"]
    row = next(
        x for x in lab.admin("GET", "/admin/usage").json()["usage"] if x["user"] == "counter" and x["model"] == "m"
    )
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (4, prompt, completion)
    assert row["engine_seconds"] > 0
    metrics = user_counters(httpx.get(lab.url + "/metrics", headers=auth(lab.keys["ops"])).text, "counter", "m")
    assert metrics["onecard_user_prompt_tokens_total"] == prompt
    assert metrics["onecard_user_completion_tokens_total"] == completion
    assert metrics["onecard_user_requests_total"] == 4
    assert metrics["onecard_user_engine_seconds_total"] == pytest.approx(row["engine_seconds"], abs=0.002)


# --- leases ----------------------------------------------------------------------------------------------


def test_a_lease_naming_pid_1_or_another_users_process_is_refused(lab: Lab) -> None:
    r = lab.admin("POST", "/admin/leases", json={"gib": 0.5, "pid": 1})
    assert r.status_code == 403
    assert r.json()["error"]["param"] == "pid" and "pid 1 (init) never exits" in r.json()["error"]["message"]
    if os.geteuid() == 0:
        other = subprocess.Popen(["sleep", "60"], user=65534)
        try:
            r = lab.admin("POST", "/admin/leases", json={"gib": 0.5, "pid": other.pid})
            assert r.status_code == 403
            assert "belongs to uid 65534, not to the caller's uid 0" in r.json()["error"]["message"]
        finally:
            other.kill()
            other.wait()
    assert lab.admin("GET", "/admin/leases").json()["leases"] == []
    own = lab.admin("POST", "/admin/leases", json={"gib": 0.5, "pid": os.getpid()})
    assert own.status_code == 201 and own.json()["user"] == "ops"
    assert lab.admin("DELETE", f"/admin/leases/{own.json()['id']}").status_code == 200


# --- chat before batch across models ---------------------------------------------------------------------


def test_chat_gets_a_non_resident_model_within_its_bound_while_a_batch_run_is_busy(tmp_path: Path) -> None:
    """``a`` and ``b`` cannot share the card; a batch harness keeps ``a`` busy. With max_wait_s 30 a chat
    request for ``b`` would wait 30 s; its class bound is 2 s, so it gets ``b`` within 2 s plus the drain
    and the swap, and the batch requests wait for ``a`` to come back: none is lost."""
    keys = make_users(tmp_path / "users.yaml", {"ops": {"admin": True}, "ev": {}, "chat": {"class": "interactive"}})
    models = [standin_model("a", env={"STANDIN_TOKEN_DELAY": "0.02"}), standin_model("b")]
    reg = write_registry(
        tmp_path / "reg.yaml",
        models,
        executable=standin_executable(tmp_path),
        budget_gib=1.5,
        scheduler={"max_wait_s": 30, "interactive_max_wait_s": 2},
    )
    lab = start(tmp_path, reg, keys)
    try:
        assert lab.admin("POST", "/admin/engines/a/load").status_code == 200

        async def scenario() -> tuple[float, int, list[int], int]:
            stop = asyncio.Event()
            statuses: list[int] = []
            async with httpx.AsyncClient(timeout=120) as c:

                async def harness(n: int) -> None:
                    i = 0
                    while not stop.is_set():
                        r = await c.post(
                            lab.url + "/v1/completions", json=body("a", f"batch-{n}-{i}", 20), headers=auth(keys["ev"])
                        )
                        statuses.append(r.status_code)
                        i += 1

                workers = [asyncio.ensure_future(harness(n)) for n in range(4)]
                await asyncio.sleep(1.5)
                t0 = time.monotonic()
                r = await c.post(
                    lab.url + "/v1/completions", json=body("b", "a person asks"), headers=auth(keys["chat"])
                )
                chat_s = time.monotonic() - t0
                before = len(statuses)
                await asyncio.sleep(3)
                stop.set()
                await asyncio.gather(*workers)
                return chat_s, r.status_code, statuses, before

        chat_s, chat_status, statuses, before = asyncio.run(scenario())
        assert chat_status == 200
        assert chat_s < 15, f"the chat request waited {chat_s:.1f} s"  # 2 s bound + drain + start, not 30 s
        assert statuses and set(statuses) == {200}  # no batch request lost
        assert len(statuses) > before  # the batch run continued after the chat request
        swaps = {(s["model"], s["kind"]) for s in lab.admin("GET", "/admin/swaps").json()["swaps"]}
        assert ("b", "cold") in swaps and ("a", "cold") in swaps
        caused = {(row["user"], row["model"]): row["swaps"] for row in lab.admin("GET", "/admin/usage").json()["usage"]}
        assert caused[("chat", "b")] == 1
    finally:
        lab.gw.close()


# --- usage that lasts ------------------------------------------------------------------------------------


def test_usage_survives_a_gateway_restart(tmp_path: Path) -> None:
    keys = make_users(tmp_path / "users.yaml", {"ops": {"admin": True}, "alice": {}})
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    lab = start(tmp_path, reg, keys)
    try:
        for i in range(3):
            assert lab.post("alice", body("m", f"remember me {i}", 4)).status_code == 200
        before = lab.admin("GET", "/admin/usage").json()["usage"]
        lab.gw.signal(signal.SIGTERM)
        assert lab.gw.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    finally:
        lab.gw.close()
    assert (tmp_path / "run" / "usage.sqlite3").is_file()
    lab = start(tmp_path, reg, keys)
    try:
        after = lab.admin("GET", "/admin/usage", params={"since": "24h"}).json()["usage"]
        assert after == before
        row = next(r for r in after if r["user"] == "alice")
        assert row["requests"] == 3 and row["completion_tokens"] == 12
        cli = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "usage", "--json", "--url", lab.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ONECARD_ADMIN_KEYS": keys["ops"]},
        )
        assert cli.returncode == 0, cli.stderr
        import json

        assert json.loads(cli.stdout) == after
        far = lab.admin("GET", "/admin/usage", params={"since": "2999-01-01"}).json()["usage"]
        assert far == []
        bad = lab.admin("GET", "/admin/usage", params={"since": "yesterday-ish"})
        assert bad.status_code == 400 and "give an ISO date" in bad.json()["error"]["message"]
    finally:
        lab.gw.close()


# --- the users file, re-read while serving ----------------------------------------------------------------


def test_a_changed_users_file_is_taken_up_while_the_loop_serves(tmp_path: Path) -> None:
    """On the event loop the file's modification time is read in a worker thread: the users asked for
    meanwhile are the last ones read, and the change is taken up once the answer is in (within a
    second or so of the change), and the change hooks run."""
    from gateway.users import RELOAD_CHECK_S, People

    path = tmp_path / "users.yaml"
    add_user(path, "alice", klass=UserClass.BATCH, admin=False)
    people = People(path)
    seen: list[int] = []
    people.on_change.append(lambda users: seen.append(len(users.users)))

    async def scenario() -> tuple[list[str], float]:
        assert [u.name for u in people.current().users] == ["alice"]
        add_user(path, "bob", klass=UserClass.BATCH, admin=False)
        later = time.time() + 5  # a modification time that differs whatever the file system's granularity
        os.utime(path, (later, later))
        t0 = time.monotonic()
        for _ in range(500):  # up to 5 s; every request asks, so each look is one current() call
            if len(people.current().users) == 2:
                break
            await asyncio.sleep(0.01)
        return [u.name for u in people.current().users], time.monotonic() - t0

    names, waited = asyncio.run(scenario())
    assert names == ["alice", "bob"] and seen == [2]
    assert waited < RELOAD_CHECK_S + 1.0, waited
