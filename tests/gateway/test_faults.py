"""Faults, end to end: stand-in engines that crash, hang, cannot bind, run out of memory; a gateway
that is stopped with SIGTERM under traffic or killed with SIGKILL.

In-process gateways (:func:`tests.support.running_gateway`) where the test needs to reach inside;
``onecard serve`` subprocesses (:class:`GatewayProcess`) where the gateway process itself is the subject.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from engines.engine import RestartPolicy
from engines.state import EngineState
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

pytestmark = pytest.mark.timeout(180)


# --- helpers -----------------------------------------------------------------------------------------------


def sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def stream_parts(text: str) -> tuple[str, dict[str, Any] | None, bool]:
    """(generated text, the error event if any, whether it ended with [DONE]); every event must be JSON."""
    events = sse_events(text)
    done = bool(events) and events[-1] == "data: [DONE]"
    out, error = [], None
    for ev in events[:-1] if done else events:
        if ev.startswith(":"):
            continue  # keep-alive comment
        assert ev.startswith("data: "), ev
        chunk = json.loads(ev[6:])
        if "error" in chunk:
            assert error is None, "two error events"
            error = chunk["error"]
        else:
            assert error is None, "data after the error event"
            out.append(chunk["choices"][0]["text"])
    return "".join(out), error, done


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                            max_tokens: int) -> tuple[int, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        return r.status_code, (await r.aread()).decode()


def complete(url: str, model: str, prompt: str = "x", max_tokens: int = 3, **kw: Any) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens},
                      timeout=kw.pop("timeout", 60), **kw)


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for g in started:
            g.close()


# --- an engine killed mid-stream -------------------------------------------------------------------------


def test_engine_killed_mid_stream(tmp_path: Path) -> None:
    """The streams on the dying engine end with one clean error event and [DONE]; another model's stream
    and requests carry on untouched; the model restarts on the next request after its backoff.

    (Every stream on the killed engine ends: they share its process. Clients of that model that were not
    in flight are unaffected: they get the restarted engine.)
    """
    crash_at = 10
    models = [standin_model("alpha", env={"STANDIN_CRASH_AFTER_TOKENS": str(crash_at), "STANDIN_TOKEN_DELAY": "0.02"}),
              standin_model("beta", env={"STANDIN_TOKEN_DELAY": "0.02"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=2.5)
    with running_gateway(reg, tmp_path / "run") as server:
        url = server.url
        for m in ("alpha", "beta"):
            assert httpx.post(f"{url}/admin/engines/{m}/load", timeout=60).status_code == 200
        old_pid = server.gw.pool.owner.engines["alpha"].pid
        assert old_pid is not None

        async def traffic() -> tuple[list[tuple[int, str]], tuple[int, str], list[int]]:
            async with httpx.AsyncClient(timeout=60) as c:
                doomed = [stream_completion(c, url, "alpha", f"doomed {i}", 200) for i in range(3)]
                other = stream_completion(c, url, "beta", "bystander", 60)

                async def plain_beta() -> list[int]:
                    codes = []
                    for i in range(10):
                        r = await c.post(url + "/v1/completions", json={"model": "beta", "prompt": f"p{i}",
                                                                        "max_tokens": 4})
                        codes.append(r.status_code)
                        await asyncio.sleep(0.05)
                    return codes

                results = await asyncio.gather(asyncio.gather(*doomed), other, plain_beta())
                return list(results[0]), results[1], results[2]

        t0 = time.monotonic()
        doomed, other, plain = asyncio.run(traffic())
        assert time.monotonic() - t0 < 30
        for i, (status, text) in enumerate(doomed):
            assert status == 200  # the stream had begun: the error comes as an event
            got, error, done = stream_parts(text)
            assert done, text[-300:]
            assert error is not None and error["code"] == "engine_failed" and error["status"] == 502, error
            assert "alpha" in error["message"], error
            assert expected_text("alpha", f"doomed {i}", 200).startswith(got)  # intact up to the crash
            assert len(got) <= 4 * crash_at
        status, text = other
        got, error, done = stream_parts(text)
        assert status == 200 and done and error is None
        assert got == expected_text("beta", "bystander", 60)
        assert plain == [200] * 10

        engine = server.gw.pool.owner.engines["alpha"]
        wait_for(lambda: engine.state is EngineState.FAILED or engine.state is EngineState.STOPPED, what="failed")
        assert gone(old_pid)
        # Within the backoff: 503 with Retry-After and the cause; after it, the engine restarts on demand.
        r = complete(url, "alpha")
        if r.status_code == 503:
            assert "exited" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
            time.sleep(int(r.headers["retry-after"]))
            r = complete(url, "alpha")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected_text("alpha", "x", 3)
        assert engine.pid not in (None, old_pid) and engine.state is EngineState.READY


def test_every_stream_on_a_killed_engine_hears_that_it_exited(tmp_path: Path) -> None:
    models = [standin_model("alpha", env={"STANDIN_CRASH_AFTER_TOKENS": "10", "STANDIN_TOKEN_DELAY": "0.02"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path))
    with running_gateway(reg, tmp_path / "run") as server:
        assert httpx.post(f"{server.url}/admin/engines/alpha/load", timeout=60).status_code == 200

        async def streams() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=60) as c:
                return list(await asyncio.gather(*(stream_completion(c, server.url, "alpha", f"d{i}", 100)
                                                   for i in range(3))))

        for _, text in asyncio.run(streams()):
            _, error, _ = stream_parts(text)
            assert error is not None and "the engine exited while serving this request" in error["message"], error


# --- a hung engine ---------------------------------------------------------------------------------------


def test_hung_engine_times_out_and_stops_by_sigkill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = [standin_model("stuck", env={"STANDIN_HANG": "1.5"}), standin_model("fine")]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=2.5)
    with running_gateway(reg, tmp_path / "run", upstream_read_timeout_s=1.0) as server:
        url = server.url
        assert httpx.post(f"{url}/admin/engines/stuck/load", timeout=60).status_code == 200
        engine = server.gw.pool.owner.engines["stuck"]
        pid = engine.pid
        assert pid is not None
        engine.policy = RestartPolicy(stop_grace_s=1.0, drain_timeout_s=1.0)  # 15 s grace by default
        time.sleep(2.0)  # the stand-in is hung now: no answer to anything, SIGTERM ignored

        async def both() -> tuple[httpx.Response, tuple[int, str], httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                plain = c.post(url + "/v1/completions", json={"model": "stuck", "prompt": "x", "max_tokens": 2})
                stream = stream_completion(c, url, "stuck", "x", 2)
                good = c.post(url + "/v1/completions", json={"model": "fine", "prompt": "x", "max_tokens": 2})
                return await asyncio.gather(plain, stream, good)

        t0 = time.monotonic()
        plain, (s_status, s_text), good = asyncio.run(both())
        assert time.monotonic() - t0 < 10  # the read timeout fired; nothing waited for ever
        assert plain.status_code == 502
        err = plain.json()["error"]
        assert err["code"] == "engine_failed" and "did not answer in time" in err["message"], err
        if s_status == 200:  # (headers never came, so this is a 502 before the stream; accept either form)
            _, error, done = stream_parts(s_text)
            assert done and error is not None and "did not answer in time" in error["message"]
        else:
            assert s_status == 502 and "did not answer in time" in json.loads(s_text)["error"]["message"]
        assert good.status_code == 200
        assert engine.in_flight == 0  # the timed-out requests gave their slots back

        caplog.set_level(logging.WARNING, logger="engines.process")
        t0 = time.monotonic()
        r = httpx.post(f"{url}/admin/engines/stuck/unload", timeout=60)
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        assert time.monotonic() - t0 < 10
        assert gone(pid)
        assert any("sending SIGKILL" in rec.getMessage() for rec in caplog.records), caplog.text
        assert [rec.model for rec in server.gw.pool.owner.state_file.records()] == ["fine"]


# --- the engine's port is taken --------------------------------------------------------------------------


@contextmanager
def squatter(kind: str) -> Iterator[int]:
    """A port held by another process: a bare TCP listener that never answers, or another stand-in engine."""
    if kind == "tcp-listener":
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            yield listener.getsockname()[1]
        return
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.standin_engine", "serve", "stranger", "--port",
                             str(port)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _connectable(port), what="the squatter")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("kind", ["tcp-listener", "another-engine"])
def test_engine_port_taken_retries_on_another_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """The port chosen for the engine is taken before the engine binds it: the start is retried on a
    new port, and the gateway never mistakes the squatter for its engine."""
    import engines.engine
    import engines.listener

    caplog.set_level(logging.WARNING, logger="engines.engine")
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    with squatter(kind) as taken:
        ports = iter([taken])
        real = engines.listener.free_port
        monkeypatch.setattr(engines.engine, "free_port", lambda: next(ports, None) or real())
        with running_gateway(reg, tmp_path / "run") as server:
            r = complete(server.url, "m", "hello", 4)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "m" and r.json()["choices"][0]["text"] == expected_text("m", "hello", 4)
            engine = server.gw.pool.owner.engines["m"]
            assert engine.port != taken and engine.state is EngineState.READY
            assert f"port {taken} was taken; retrying on another port" in caplog.text


def test_engine_port_always_taken_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.engine

    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    with squatter("another-engine") as taken:
        monkeypatch.setattr(engines.engine, "free_port", lambda: taken)
        with running_gateway(reg, tmp_path / "run") as server:
            r = complete(server.url, "m")
            assert r.status_code == 502, r.text
            message = r.json()["error"]["message"]
            assert "model m failed to start" in message, message
            assert server.gw.pool.owner.state_file.records() == []
            log_tail = httpx.get(server.url + "/admin/engines/m/log?lines=200").text
            assert "address already in use" in log_tail
            assert "address already in use" in message.lower(), message  # the cause, not a wrapper line


# --- out of memory at start ------------------------------------------------------------------------------


def test_out_of_memory_at_start_names_the_oom_and_the_plan(tmp_path: Path) -> None:
    models = [standin_model("big", gib=2.0, env={"STANDIN_OOM": "1"}), standin_model("small")]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=3.5)
    with running_gateway(reg, tmp_path / "run") as server:
        url = server.url
        plan = server.gw.pool.owner.plan
        mp = plan.model("big")
        figures = [f"{mp.total_gib:.2f} GiB", f"weights {mp.weights_gib:.2f}", f"KV cache {mp.kv_gib:.2f}",
                   f"{plan.usable_gib:.2f} GiB usable"]
        r = complete(url, "big")
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["code"] == "engine_failed" and err["type"] == "engine_error"
        assert "CUDA out of memory" in err["message"], err
        for f in figures:
            assert f in err["message"], (f, err["message"])
        # During the backoff the refusal (503) repeats the cause with the plan; the other model serves.
        r = complete(url, "big")
        assert r.status_code == 503 and "out of memory" in r.json()["error"]["message"]
        assert all(f in r.json()["error"]["message"] for f in figures)
        assert complete(url, "small").status_code == 200
        # The admin route explains it the same way.
        server.gw.pool.owner.engines["big"].failures.clear()
        r = httpx.post(f"{url}/admin/engines/big/load", timeout=60)
        assert r.status_code == 502 and all(f in r.json()["error"]["message"] for f in figures)


def test_out_of_memory_for_a_waiting_stream_is_an_error_event_with_the_plan(tmp_path: Path) -> None:
    models = [standin_model("big", env={"STANDIN_OOM": "1", "STANDIN_START_DELAY": "1"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path),
                         scheduler={"keepalive_s": 0.2})
    with running_gateway(reg, tmp_path / "run") as server:
        mp = server.gw.pool.owner.plan.model("big")
        status, text = asyncio.run(_one_stream(server.url, "big"))
        assert status == 200 and text.startswith(": waiting for model big")
        _, error, done = stream_parts(text)
        assert done and error is not None and error["status"] == 502
        assert "CUDA out of memory" in error["message"] and f"{mp.total_gib:.2f} GiB" in error["message"]


async def _one_stream(url: str, model: str) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=60) as c:
        return await stream_completion(c, url, model, "x", 3)


# --- the gateway itself: SIGTERM under traffic, SIGKILL --------------------------------------------------


def test_gateway_sigterm_under_traffic_finishes_streams_and_stops_engines(
        tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    models = [standin_model("alpha", env={"STANDIN_TOKEN_DELAY": "0.05"}),
              standin_model("beta", env={"STANDIN_TOKEN_DELAY": "0.05"})]
    reg = write_registry(tmp_path / "reg.yaml", models, executable=standin_executable(tmp_path), budget_gib=2.5)
    gw = GatewayProcess(reg, tmp_path / "run")
    gateways.append(gw)
    gw.start()
    for m in ("alpha", "beta"):
        assert httpx.post(f"{gw.url}/admin/engines/{m}/load", timeout=60).status_code == 200
    engine_pids = {row["pid"] for row in httpx.get(gw.url + "/admin/engines").json()["engines"]}
    tokens = 40  # 2 s a stream

    async def traffic() -> tuple[list[tuple[int, str]], int | None]:
        started = asyncio.Event()
        opened = 0

        async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
            nonlocal opened
            model = ("alpha", "beta")[i % 2]
            body = {"model": model, "prompt": f"s{i}", "max_tokens": tokens, "stream": True}
            async with c.stream("POST", gw.url + "/v1/completions", json=body) as r:
                parts: list[str] = []
                async for part in r.aiter_text():
                    if not parts:
                        opened += 1
                        if opened == 12:
                            started.set()
                    parts.append(part)
                return r.status_code, "".join(parts)

        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            tasks = [asyncio.create_task(one(c, i)) for i in range(12)]
            await asyncio.wait_for(started.wait(), 30)
            gw.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # a new request once the gateway is stopping is refused, not left hanging
                late = (await c.post(gw.url + "/v1/completions", json={"model": "alpha", "prompt": "late",
                                                                        "max_tokens": 1}, timeout=5)).status_code
            except httpx.HTTPError:
                late = None
            return list(await asyncio.gather(*tasks)), late

    t0 = time.monotonic()
    results, late = asyncio.run(traffic())
    for i, (status, text) in enumerate(results):
        got, error, done = stream_parts(text)
        assert status == 200 and error is None and done, text[-300:]
        assert got == expected_text(("alpha", "beta")[i % 2], f"s{i}", tokens)
    assert late in (None, 503), late
    # uvicorn re-raises the signal once it has shut down cleanly, as a service manager expects.
    assert gw.wait(40) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gw.log(), gw.log()[-2000:]
    assert time.monotonic() - t0 < 40
    survivors = [pid for pid in gw.seen | engine_pids if not gone(pid)]
    assert survivors == [], [psutil.Process(p).cmdline() for p in survivors]
    state = json.loads((tmp_path / "run" / "state" / "engines.json").read_text())
    assert state["engines"] == {}


def test_gateway_sigkill_leftovers_are_reaped_at_next_start(tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    run_dir = tmp_path / "run"
    first = GatewayProcess(reg, run_dir)
    gateways.append(first)
    first.start()
    assert complete(first.url, "m").status_code == 200
    state_path = run_dir / "state" / "engines.json"
    records = list(json.loads(state_path.read_text())["engines"].values())
    assert len(records) == 1
    engine_pid, tmpdir = records[0]["pid"], Path(records[0]["tmpdir"])
    assert engine_pid in first.descendants() and tmpdir.is_dir()

    first.signal(signal.SIGKILL)
    first.wait(10)
    time.sleep(0.5)
    assert alive(engine_pid) and not gone(engine_pid)  # its own session: SIGKILL of the gateway misses it
    assert json.loads(state_path.read_text())["engines"] != {}

    second = GatewayProcess(reg, run_dir)
    gateways.append(second)
    second.start()  # /health answers only after the clean-up
    assert gone(engine_pid)
    assert not tmpdir.exists()
    assert json.loads(state_path.read_text())["engines"] == {}
    assert "cleaned up 1 leftover engine process(es)" in second.log()
    r = complete(second.url, "m")
    assert r.status_code == 200
    new_pid = next(row["pid"] for row in httpx.get(second.url + "/admin/engines").json()["engines"])
    assert new_pid != engine_pid and not gone(new_pid)
