"""Hardening of the HTTP face, seen from outside: what a client with no key, a web page or a relay can
make the gateway do before any key or route is checked.

- Request heads are bounded in size, count and time (``onecard serve`` as a subprocess; RSS by psutil).
- Large bodies are never parsed on the event loop: a concurrent stream does not stall.
- Admin bodies are capped.
- With no keys, browsers (cross-site pages, DNS rebinding) and same-host relays do not get loopback trust.
- Binding beyond loopback with no keys is warned about.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import (
    GatewayProcess,
    ServerThread,
    running_gateway,
    standin_executable,
    standin_model,
    write_registry,
)

pytestmark = pytest.mark.timeout(180)

MB = 1024 * 1024


def registry(tmp: Path) -> Path:
    models = [standin_model("alpha", env={"STANDIN_TOKEN_DELAY": "0.01"}),
              standin_model("beta", aliases=["judge"])]
    return write_registry(tmp / "reg.yaml", models, executable=standin_executable(tmp), budget_gib=2.5)


def keyless_env() -> dict[str, str]:
    return {"ONECARD_API_KEYS": "", "ONECARD_ADMIN_KEYS": ""}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``onecard serve`` as deployed, with a client timeout short enough to test."""
    tmp = tmp_path_factory.mktemp("hardening-http")
    gw = GatewayProcess(registry(tmp), tmp / "run", env={**keyless_env(), "ONECARD_CLIENT_TIMEOUT_S": "2"})
    gw.start()
    try:
        for m in ("alpha", "beta"):
            assert httpx.post(f"{gw.url}/admin/engines/{m}/load", timeout=60).status_code == 200
        yield gw
    finally:
        gw.close()


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def send_until_refused(sock: socket.socket, head: bytes, filler: bytes, total: int) -> tuple[int, bytes]:
    """Send ``head`` then ``filler`` repeatedly up to ``total`` bytes; stop when the server answers or
    closes. Returns (bytes sent, what the server said)."""
    sock.sendall(head)
    sent = len(head)
    sock.setblocking(False)
    answer = b""
    try:
        while sent < total:
            try:
                answer += sock.recv(65536)
                break  # an answer (or EOF: b"") before the head was finished
            except BlockingIOError:
                pass
            try:
                sent += sock.send(filler)
            except BlockingIOError:
                time.sleep(0.001)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    with contextlib.suppress(OSError, TimeoutError):
        answer += sock.recv(65536)
    return sent, answer


def health_ms(url: str) -> float:
    t0 = time.perf_counter()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    return (time.perf_counter() - t0) * 1000


# --- item: request heads are bounded ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["many-headers", "one-huge-value"])
def test_an_oversized_request_head_is_refused_before_it_costs_memory(served: GatewayProcess, shape: str) -> None:
    before = rss_mb(served.pid)
    sock = connect(served.port)
    if shape == "many-headers":
        head, filler = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Pad: " + b"a" * 1017 + b"\r\n"
    else:
        head, filler = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", b"a" * 65536
    slow: list[float] = []
    sampler = threading.Thread(target=lambda: slow.extend(health_ms(served.url) for _ in range(5)))
    sampler.start()
    sent, answer = send_until_refused(sock, head, filler, 256 * MB)
    sampler.join()
    sock.close()
    grown = rss_mb(served.pid) - before
    assert answer.startswith(b"HTTP/1.1 431"), (sent, answer[:200])
    assert sent < 32 * MB, f"the gateway took {sent / MB:.0f} MB of request head before refusing it"
    assert grown < 40, f"RSS grew by {grown:.0f} MB for one request head"
    assert max(slow) < 1000, f"/health took {max(slow):.0f} ms while the head was sent"
    assert httpx.get(served.url + "/health").status_code == 200


def test_slow_request_heads_are_cut_off(served: GatewayProcess) -> None:
    """Slowloris: 30 connections that send one header line a second never finish their heads; each is
    closed once the client timeout (2 s here) has passed, while others are served."""
    socks = [connect(served.port) for _ in range(30)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.setblocking(False)
    closed: dict[int, float] = {}
    t0 = time.monotonic()
    while len(closed) < len(socks) and time.monotonic() - t0 < 12:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                data = s.recv(4096)
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed[i] = time.monotonic() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = time.monotonic() - t0
                continue
            try:
                s.send(b"X-Slow: 1\r\n")
            except OSError:
                closed[i] = time.monotonic() - t0
        assert health_ms(served.url) < 1000
        time.sleep(1.0)
    for s in socks:
        s.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow connections still held after 12 s"
    assert max(closed.values()) < 8, closed


def test_a_later_request_head_gets_its_own_deadline(served: GatewayProcess) -> None:
    """On a keep-alive connection the head deadline runs from the later request's first byte: a head
    begun 1.5 s after the first answer is not cut at the first request's deadline (2 s after the
    connection opened), but is once its own 2 s have passed."""
    sock = connect(served.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):  # the head and the body may come in two reads
        data = sock.recv(4096)
        assert data, first
        first += data
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(1.5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    begun = time.monotonic()
    sock.setblocking(False)
    answer, cut_after = b"", None
    while cut_after is None and time.monotonic() - begun < 10:
        try:
            answer = sock.recv(4096)
            cut_after = time.monotonic() - begun
        except BlockingIOError:
            with contextlib.suppress(OSError):
                sock.send(b"X-Slow: 1\r\n")
            time.sleep(0.1)
        except OSError:
            cut_after = time.monotonic() - begun
    sock.close()
    assert cut_after is not None and 1.5 < cut_after < 8, cut_after
    assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408"), answer[:100]


def test_a_connection_that_sends_nothing_is_closed(served: GatewayProcess) -> None:
    sock = connect(served.port)
    sock.settimeout(10)
    t0 = time.monotonic()
    assert sock.recv(4096) == b""
    assert time.monotonic() - t0 < 8
    sock.close()


def test_a_body_that_stops_arriving_is_cut_off(served: GatewayProcess) -> None:
    sock = connect(served.port)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": \"alpha\", ")
    sock.settimeout(10)
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(4096) == b""
    assert time.monotonic() - t0 < 8
    sock.close()


def test_a_link_followed_from_another_site_still_opens(served: GatewayProcess) -> None:
    """A user who follows a link to the gateway (a navigation) is not a page acting on its own."""
    r = httpx.get(served.url + "/v1/models", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert r.status_code == 200, r.text
    r = httpx.get(served.url + "/v1/models", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert r.status_code == 403, r.text


# --- item: large bodies are not parsed on the event loop -------------------------------------------------------


def test_a_large_lenient_body_does_not_stall_other_streams(served: GatewayProcess) -> None:
    """A 30 MiB body that orjson refuses (a NaN at the end), for an alias (so it must be rewritten), while a
    stream on another engine runs: the stream's events keep coming, and the gateway's RSS stays bounded."""
    numbers = b",".join([b"1"] * (15 * MB))
    body = b'{"model": "judge", "prompt": [' + numbers + b'], "max_tokens": 1, "temperature": NaN}'
    before = rss_mb(served.pid)
    gaps: list[float] = []

    async def stream() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            req = {"model": "alpha", "prompt": "x", "max_tokens": 400, "stream": True}
            async with c.stream("POST", served.url + "/v1/completions", json=req) as r:
                last = time.perf_counter()
                async for _ in r.aiter_raw():
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

    def big() -> httpx.Response:
        time.sleep(0.5)
        return httpx.post(served.url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=120)

    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(big()))
    t.start()
    asyncio.run(stream())
    t.join()
    grown = rss_mb(served.pid) - before
    assert result and result[0].status_code < 500, result[0].text[:300] if result else "no answer"
    assert max(gaps) < 1.0, f"the stream stalled {max(gaps):.2f} s while a large body was handled"
    assert grown < 200, f"RSS grew by {grown:.0f} MB for one 30 MiB body"


# --- item 13: admin bodies are capped --------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_admin_bodies_are_capped(served: GatewayProcess, framing: str) -> None:
    size = 256 * MB
    before = rss_mb(served.pid)
    sock = connect(served.port)
    if framing == "content-length":
        head = (b"POST /admin/leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(size).encode() + b"\r\n\r\n{\"pid\": 1, \"label\": \"")
        filler = b"a" * 65536
    else:
        head = (b"POST /admin/leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        filler = b"10000\r\n" + b"a" * 65536 + b"\r\n"
    sent, answer = send_until_refused(sock, head, filler, size)
    sock.close()
    grown = rss_mb(served.pid) - before
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:300])
    assert b'"request_too_large"' in answer
    assert sent < 64 * MB, f"the gateway read {sent / MB:.0f} MB of an admin body"
    assert grown < 40, f"RSS grew by {grown:.0f} MB for one admin body"


# --- item 13: a warning when binding beyond loopback with no keys ----------------------------------------------


def test_binding_beyond_loopback_with_no_keys_is_warned_about(tmp_path: Path) -> None:
    gw = GatewayProcess(registry(tmp_path), tmp_path / "run", env=keyless_env(), args=("--host", "0.0.0.0"))
    try:
        gw.start()
        log = gw.log()
    finally:
        gw.close()
    lines = [line for line in log.splitlines() if "WARNING" in line and "0.0.0.0" in line]
    assert lines, log
    assert "ONECARD_API_KEYS" in lines[0] and "ONECARD_ADMIN_KEYS" in lines[0], lines[0]


def test_binding_loopback_or_with_keys_is_not_warned_about(tmp_path: Path) -> None:
    for env, args in ((keyless_env(), ()), ({"ONECARD_API_KEYS": "k1", "ONECARD_ADMIN_KEYS": "k2"},
                                            ("--host", "0.0.0.0"))):
        gw = GatewayProcess(registry(tmp_path), tmp_path / f"run{len(args)}", env=env, args=args)
        try:
            gw.start()
            log = gw.log()
        finally:
            gw.close()
        assert "no keys" not in log and "ONECARD_API_KEYS" not in log, log


# --- item 6: browsers and relays do not get loopback trust -----------------------------------------------------


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("hardening-origin")
    with running_gateway(registry(tmp), tmp / "run") as server:
        assert httpx.post(f"{server.url}/admin/engines/alpha/load", timeout=60).status_code == 200
        yield server


def engines_state(server: ServerThread) -> str:
    return server.gw.pool.owner.engines["alpha"].state.value


def test_a_cross_site_page_cannot_post_to_admin_or_the_api(keyless: ServerThread) -> None:
    page = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    r = httpx.post(f"{keyless.url}/admin/engines/alpha/unload", headers=page, timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "permission_error"
    assert engines_state(keyless) == "ready"
    body = '{"model": "alpha", "prompt": "x", "max_tokens": 1}'
    r = httpx.post(f"{keyless.url}/v1/completions", content=body, headers={**page, "Content-Type": "text/plain"})
    assert r.status_code == 403, r.text
    r = httpx.post(f"{keyless.url}/v1/completions", content=body, headers={"Origin": "null"})
    assert r.status_code == 403, r.text


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_simple_request_body_type_is_refused(keyless: ServerThread, content_type: str) -> None:
    """The body types a browser may send cross-site without a preflight are not JSON: 415, as vLLM
    refuses them; nothing reaches the engine."""
    body = '{"model": "beta", "prompt": "x", "max_tokens": 1}'
    assert httpx.post(f"{keyless.url}/admin/engines/beta/load", timeout=60).status_code == 200
    engine = keyless.gw.pool.owner.engines["beta"]
    before = httpx.get(f"{engine.base_url}/standin/stats").json()["requests"]
    r = httpx.post(f"{keyless.url}/v1/completions", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.get(f"{engine.base_url}/standin/stats").json()["requests"] == before


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8000", "10.9.8.7:8000"])
def test_dns_rebinding_gets_no_loopback_trust(keyless: ServerThread, host: str) -> None:
    for method, path in (("GET", "/admin/engines"), ("POST", "/admin/engines/alpha/unload"), ("GET", "/v1/models")):
        r = httpx.request(method, keyless.url + path, headers={"Host": host}, timeout=30)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
        assert '"engines"' not in r.text and '"data"' not in r.text
    assert engines_state(keyless) == "ready"


def test_local_names_keep_loopback_trust(keyless: ServerThread) -> None:
    for host in ("127.0.0.1", f"127.0.0.1:{keyless.port}", f"localhost:{keyless.port}", "[::1]", socket.gethostname()):
        r = httpx.get(keyless.url + "/admin/engines", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    r = httpx.post(f"{keyless.url}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200, r.text


class Relay:
    """A same-host TCP relay (what ``socat`` or a port forward does): it passes bytes both ways and adds no
    header, so the gateway sees a loopback client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_same_host_relay_gets_no_loopback_trust(keyless: ServerThread) -> None:
    """A client elsewhere reaches the relay by the machine's public address (its Host says so); a relay
    that forwards with X-Forwarded-For or Forwarded says so too. Neither opens the keyless admin routes."""
    relay = Relay(keyless.port)
    try:
        url = f"http://127.0.0.1:{relay.port}"
        r = httpx.get(url + "/admin/engines", headers={"Host": f"192.0.2.10:{relay.port}"})
        assert r.status_code == 403, r.text
        for forwarded in ({"X-Forwarded-For": "198.51.100.7"}, {"Forwarded": "for=198.51.100.7"},
                          {"X-Real-IP": "198.51.100.7"}):
            r = httpx.post(url + "/admin/engines/alpha/unload", headers=forwarded)
            assert r.status_code == 403, (forwarded, r.text)
        assert engines_state(keyless) == "ready"
        assert httpx.get(url + "/admin/engines").status_code == 200  # a local client through it is still local
    finally:
        relay.close()


def test_no_origin_check_stops_a_configured_origin(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run", cors_origins=("https://chat.lab.example",)) as server:
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://chat.lab.example",
                                                          "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://chat.lab.example"
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403, r.text


def test_keys_configured_leave_hosts_alone(tmp_path: Path) -> None:
    """With keys, trust comes from the key, not the address: any Host name serves (a proxy in front)."""
    with running_gateway(registry(tmp_path), tmp_path / "run", api_keys=frozenset({"k"}),
                         admin_keys=frozenset({"a"})) as server:
        r = httpx.get(server.url + "/v1/models", headers={"Host": "gpu-box.lab.example",
                                                          "Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
        r = httpx.get(server.url + "/admin/engines", headers={"Host": "gpu-box.lab.example",
                                                             "Authorization": "Bearer a"})
        assert r.status_code == 200, r.text

