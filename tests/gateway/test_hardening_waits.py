"""Deadlines on every wait, and clients that go away: seen by the client that waits and by the engine.

- ``scheduler.max_wait_s`` bounds a queued request even when the resident model is busy with a long stream.
- A stream client that never reads does not hold its engine slot.
- Non-stream clients that hang up while queued leave the queue and are never sent to the engine.
- A non-stream request abandoned mid-generation is cancelled at the engine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    GatewayProcess,
    ServerThread,
    running_gateway,
    standin_executable,
    standin_model,
    wait_for,
    write_registry,
)

pytestmark = pytest.mark.timeout(180)

MAX_WAIT_S = 1.0


def two_that_cannot_share(tmp: Path, *, max_wait_s: float, max_queue: int = 16, token_delay: str = "0.1") -> Path:
    models = [standin_model("alpha", env={"STANDIN_TOKEN_DELAY": token_delay}, max_model_len=200_000),
              standin_model("beta")]
    return write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=1.5,
                          scheduler={"max_wait_s": max_wait_s, "max_queue": max_queue, "keepalive_s": 1})


def engine_row(url: str, model: str) -> dict[str, Any]:
    rows = httpx.get(url + "/admin/engines", timeout=10).json()["engines"]
    row: dict[str, Any] = next(r for r in rows if r["model"] == model)
    return row


def standin_stats(url: str, model: str) -> dict[str, Any]:
    port = engine_row(url, model)["port"]
    stats: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/standin/stats", timeout=10).json()
    return stats


class LongStream:
    """A stream on ``model`` read in a thread until it ends or :meth:`stop` is called."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.text = ""
        self.status = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, model, max_tokens), daemon=True)
        self.thread.start()

    def _run(self, url: str, model: str, max_tokens: int) -> None:
        body = {"model": model, "prompt": "x", "max_tokens": max_tokens, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            self.status = r.status_code
            for chunk in r.iter_text():
                self.text += chunk
                if self._stop.is_set():
                    return

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[ServerThread, LongStream]]:
    """``alpha`` resident and busy with a 30 s stream; ``beta`` cannot share the card with it."""
    with running_gateway(two_that_cannot_share(tmp_path, max_wait_s=MAX_WAIT_S), tmp_path / "run") as server:
        assert httpx.post(f"{server.url}/admin/engines/alpha/load", timeout=60).status_code == 200
        stream = LongStream(server.url, "alpha", 300)
        wait_for(lambda: server.gw.pool.owner.engines["alpha"].in_flight == 1, what="the long stream")
        try:
            yield server, stream
        finally:
            stream.stop()


# --- item 7: max_wait_s is a bound ------------------------------------------------------------------------------


def test_max_wait_bounds_a_queued_request_behind_a_long_stream(busy: tuple[ServerThread, LongStream]) -> None:
    server, _ = busy
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 2}, timeout=60)
    waited = time.monotonic() - t0
    assert waited < 2 * MAX_WAIT_S + 3, f"waited {waited:.1f} s with max_wait_s {MAX_WAIT_S}"
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert "max_wait_s" in err["message"] and "alpha" in err["message"], err
    assert float(r.headers["retry-after"]) >= 1
    assert server.gw.pool.owner.admission.queues["beta"] == type(server.gw.pool.owner.admission.queues["beta"])()


def test_max_wait_bounds_a_queued_stream_too(busy: tuple[ServerThread, LongStream]) -> None:
    server, _ = busy
    t0 = time.monotonic()
    body = {"model": "beta", "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        text = r.read().decode()
    waited = time.monotonic() - t0
    assert waited < 2 * MAX_WAIT_S + 3, f"waited {waited:.1f} s with max_wait_s {MAX_WAIT_S}"
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events, text
    err = json.loads(events[0][6:])["error"]
    assert "max_wait_s" in err["message"], err


def test_a_stream_client_that_never_reads_gives_its_slot_back(tmp_path: Path) -> None:
    reg = two_that_cannot_share(tmp_path, max_wait_s=30, token_delay="0")
    gw = GatewayProcess(reg, tmp_path / "run", env={"ONECARD_CLIENT_TIMEOUT_S": "2"})
    try:
        gw.start()
        assert httpx.post(f"{gw.url}/admin/engines/alpha/load", timeout=60).status_code == 200
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 150_000, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: engine_row(gw.url, "alpha")["in_flight"] == 1, what="the stream to start")
        t0 = time.monotonic()
        wait_for(lambda: engine_row(gw.url, "alpha")["in_flight"] == 0, timeout=30, what="the slot to come back")
        assert time.monotonic() - t0 < 15
        wait_for(lambda: standin_stats(gw.url, "alpha")["cancelled"] == 1, timeout=10, what="the engine's cancel")
        assert standin_stats(gw.url, "alpha")["in_flight"] == 0
        sock.close()
    finally:
        gw.close()


# --- item 8: clients that hang up ---------------------------------------------------------------------------------


def raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_queued_clients_that_hang_up_leave_the_queue_and_are_never_sent(tmp_path: Path) -> None:
    reg = two_that_cannot_share(tmp_path, max_wait_s=60, max_queue=8)
    with running_gateway(reg, tmp_path / "run") as server:
        manager = server.gw.pool.owner
        assert httpx.post(f"{server.url}/admin/engines/alpha/load", timeout=60).status_code == 200
        stream = LongStream(server.url, "alpha", 300)
        try:
            wait_for(lambda: manager.engines["alpha"].in_flight == 1, what="the long stream")
            socks = [raw_request(server.port, {"model": "beta", "prompt": f"gone {i}", "max_tokens": 2})
                     for i in range(8)]
            wait_for(lambda: len(manager.admission.queues["beta"]) == 8, what="8 queued")
            for s in socks:
                s.close()
            wait_for(lambda: len(manager.admission.queues["beta"]) == 0, timeout=5,
                     what="hung-up clients to leave the queue")
            live: list[httpx.Response] = []
            t = threading.Thread(target=lambda: live.append(httpx.post(
                server.url + "/v1/completions", json={"model": "beta", "prompt": "live", "max_tokens": 2},
                timeout=120)))
            t.start()
            wait_for(lambda: len(manager.admission.queues["beta"]) == 1, what="the live request queued")
        finally:
            stream.stop()  # alpha goes idle: beta is swapped in
        t.join(120)
        assert live and live[0].status_code == 200, live[0].text if live else "no answer"
        stats = standin_stats(server.url, "beta")
        # the engine's readiness probe, its start-up fingerprint probe and the live request: no other
        assert stats["requests"] == 3, stats


def test_a_request_abandoned_mid_generation_is_cancelled_at_the_engine(tmp_path: Path) -> None:
    reg = two_that_cannot_share(tmp_path, max_wait_s=60, token_delay="0.05")
    with running_gateway(reg, tmp_path / "run") as server:
        engine = server.gw.pool.owner.engines["alpha"]
        assert httpx.post(f"{server.url}/admin/engines/alpha/load", timeout=60).status_code == 200
        sock = raw_request(server.port, {"model": "alpha", "prompt": "x", "max_tokens": 400})
        wait_for(lambda: engine.in_flight == 1, what="the request in flight")
        time.sleep(0.5)
        sock.close()
        t0 = time.monotonic()
        wait_for(lambda: engine.in_flight == 0, timeout=10, what="the gateway to let the request go")
        wait_for(lambda: standin_stats(server.url, "alpha")["cancelled"] == 1, timeout=5, what="the engine's cancel")
        assert time.monotonic() - t0 < 5
        assert standin_stats(server.url, "alpha")["in_flight"] == 0
