"""The proxy's data path (``gateway.proxy.Proxy`` on ``gateway.app.make_session``, a
``gateway.engine_http.EngineClient``) against a bare HTTP/1.1 server that records what it receives:
what goes out, what comes back, the connection pool, timeouts and failures, and the client's place in
the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.responses import Response, StreamingResponse

from engines.upstream import EngineUpstream
from gateway.app import create_app, make_session
from gateway.metrics import Metrics
from gateway.proxy import Call, Proxy
from gateway.settings import Settings
from tests.support import standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(60)

Respond = Callable[["Request", asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    head: list[bytes]  # request line, then the header lines as sent
    body: bytes

    def header(self, name: str) -> list[bytes]:
        return [line.split(b":", 1)[1].strip() for line in self.head[1:]
                if line.split(b":", 1)[0].lower() == name.encode()]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer_json(req: Request, writer: asyncio.StreamWriter) -> None:
    body = b'{"ok":true}'
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))


@dataclass
class Server:
    """Answers each request with ``respond``; records requests and counts connections."""

    respond: Respond = answer_json
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
                req = Request(head, b"")
                length = req.header("content-length")
                req.body = await reader.readexactly(int(length[0])) if length else b""
                self.requests.append(req)
                await self.respond(req, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            for w in self.writers:
                w.close()

    async def wait_closed(self) -> None:
        """Until every connection to the server has been closed (by the gateway)."""
        for _ in range(200):
            if self.open == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.open} connection(s) still open")


@dataclass
class FakeProcess:
    """An engine process that exits after ``exits_after`` seconds (never when None)."""

    exits_after: float | None = None
    returncode: int | None = None
    pid: int | None = 4242

    async def wait(self) -> int:
        if self.exits_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.exits_after or 0.0)
        self.returncode = -9
        return self.returncode


@dataclass
class FakeEngine:
    """What ``engines.upstream.EngineUpstream`` reads of an engine (its ``Supervised`` protocol)."""

    base_url: str
    name: str = "m"
    process: FakeProcess | None = field(default_factory=FakeProcess)
    engine_id: str | None = "e1"

    def failure_lines(self, n: int = 30) -> tuple[str, ...]:
        return ("INFO starting", "ERROR boom")

    async def ensure_adapter(self, name: str, path: str) -> None:
        raise AssertionError("no adapters here")


@dataclass
class Slot:
    """Counts ``release`` calls, as the handler's engine slot does."""

    released: int = 0

    def __call__(self) -> None:
        self.released += 1


def as_bytes(chunk: str | bytes | memoryview) -> bytes:
    """A chunk of a relayed body: the proxy relays bytes, never text."""
    assert not isinstance(chunk, str), chunk
    return bytes(chunk)


async def read_all(body: AsyncIterable[str | bytes | memoryview]) -> bytes:
    return b"".join([as_bytes(c) async for c in body])


@contextlib.asynccontextmanager
async def proxy(**settings: Any) -> AsyncIterator[Proxy]:
    async with make_session(Settings(registry_path=Path("unused.yaml"), **settings)) as session:
        yield Proxy(session, Metrics(process_metrics=False))


async def forward(p: Proxy, url: str, body: bytes = b'{"model":"m"}', *, stream: bool = False,
                  strip_usage: bool = False, engine: FakeEngine | None = None,
                  slot: Slot | None = None) -> Response:
    call = Call(path="/v1/completions", body=body, model="m", stream=stream, strip_usage=strip_usage,
                extra_headers={"x-onecard-model": "m"})
    upstream = EngineUpstream(engine or FakeEngine(url), adapter_path=lambda model, adapter: "")
    return await p.forward(call, upstream, slot or Slot())


def headers(resp: Response) -> list[tuple[bytes, bytes]]:
    return list(resp.raw_headers)


def error_of(resp: Response) -> dict[str, Any]:
    assert resp.status_code == 502
    err: dict[str, Any] = orjson.loads(bytes(resp.body))["error"]
    return err


# --- what goes out, what comes back ------------------------------------------------------------------------


async def test_the_body_goes_out_as_given_with_no_headers_of_the_clients_own() -> None:
    srv = Server()
    body = b'{"model":"m","prompt":"caf\xc3\xa9 \\ud800","n":1e400}'  # bytes a JSON encoder would not write
    async with srv.running() as url, proxy() as p:
        resp = await forward(p, url, body)
    assert resp.status_code == 200 and resp.body == b'{"ok":true}'
    (req,) = srv.requests
    assert req.head[0] == b"POST /v1/completions HTTP/1.1"
    assert req.body == body
    names = sorted(line.split(b":", 1)[0].lower() for line in req.head[1:])
    assert names == [b"accept", b"content-length", b"content-type", b"host"], req.head
    assert req.header("content-type") == [b"application/json"] and req.header("accept") == [b"*/*"]


async def test_status_headers_and_body_come_back_as_sent_less_hop_by_hop() -> None:
    gz = b"\x1f\x8b\x08\x00 not really gzip, and never decompressed"

    async def respond(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 418 I'm a teapot\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     b"X-Dup: 1\r\nX-Dup: 2\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n"
                     b"x-onecard-model: spoofed\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(gz[:10]) + chunk(gz[10:]) + b"0\r\n\r\n")

    async with Server(respond).running() as url, proxy() as p:
        resp = await forward(p, url)
    assert resp.status_code == 418 and resp.body == gz
    assert headers(resp) == [(b"content-length", str(len(gz)).encode()), (b"content-type", b"application/json"),
                             (b"content-encoding", b"gzip"), (b"x-dup", b"1"), (b"x-dup", b"2"),
                             (b"x-onecard-model", b"m")]


async def test_a_stream_is_relayed_event_by_event_and_the_usage_event_hidden() -> None:
    gate = asyncio.Event()
    events = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"]

    async def respond(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + chunk(events[0]))
        await writer.drain()
        await gate.wait()  # the next event only once the client has seen the first
        for ev in events[1:]:
            writer.write(chunk(ev[:7]) + chunk(ev[7:]))  # split mid-event: the relay must rejoin it
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    srv = Server(respond)
    async with srv.running() as url, proxy() as p:
        for strip in (True, False):
            gate.clear()
            slot = Slot()
            resp = await forward(p, url, stream=True, strip_usage=strip, slot=slot)
            assert isinstance(resp, StreamingResponse)
            assert (b"x-accel-buffering", b"no") in headers(resp)
            assert (b"cache-control", b"no-cache") in headers(resp)
            assert (b"content-type", b"text/event-stream; charset=utf-8") in headers(resp)
            it = aiter(resp.body_iterator)
            first = as_bytes(await asyncio.wait_for(anext(it), 5))
            assert first == events[0]
            gate.set()
            rest = await read_all(it)
            assert first + rest == b"".join(events if not strip else events[:2] + events[3:])
            assert slot.released == 1
        assert srv.connections == 1  # streams read to the end hand their connection back


async def test_an_abandoned_stream_closes_its_upstream_connection() -> None:
    async def respond(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(1000):
            writer.write(chunk(b'data: {"i":%d}\n\n' % i))
            await writer.drain()
            await asyncio.sleep(0.01)

    srv = Server(respond)
    slot = Slot()
    async with srv.running() as url, proxy() as p:
        resp = await forward(p, url, stream=True, slot=slot)
        assert isinstance(resp, StreamingResponse)
        it = resp.body_iterator
        assert isinstance(it, AsyncGenerator)  # the proxy's relay
        async for _ in it:
            break
        await it.aclose()  # what Starlette's cancel amounts to
        assert slot.released == 1
        await srv.wait_closed()  # the engine sees the client go, and aborts the request


# --- the pool ----------------------------------------------------------------------------------------------


async def test_connections_are_reused_and_bounded_by_max_connections() -> None:
    async def slow(req: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)
        await answer_json(req, writer)

    srv = Server(slow)
    async with srv.running() as url, proxy(max_connections=2) as p:
        for _ in range(3):
            assert (await forward(p, url)).status_code == 200
        assert srv.connections == 1
        results = await asyncio.gather(*(forward(p, url) for _ in range(8)))
        assert [r.status_code for r in results] == [200] * 8
        assert srv.connections == 2


async def test_an_idle_connection_the_engine_closed_is_not_reused() -> None:
    srv = Server()
    async with srv.running() as url, proxy() as p:
        assert (await forward(p, url)).status_code == 200
        for w in srv.writers:
            w.close()
        await asyncio.sleep(0.05)
        assert (await forward(p, url)).status_code == 200
        assert srv.connections == 2


# --- failures ----------------------------------------------------------------------------------------------


async def test_an_engine_that_does_not_answer_is_did_not_answer_in_time() -> None:
    async def hang(req: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async def stall_mid_stream(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + chunk(b'data: {"choices":[]}\n\n'))
        await asyncio.Event().wait()

    async with Server(hang).running() as url, proxy(upstream_read_timeout_s=0.3) as p:
        slot = Slot()
        t0 = time.monotonic()
        err = error_of(await forward(p, url, slot=slot))
        assert time.monotonic() - t0 < 2
        assert "model m: the engine did not answer in time" in err["message"] and err["code"] == "engine_failed"
        assert slot.released == 1
    async with Server(stall_mid_stream).running() as url, proxy(upstream_read_timeout_s=0.3) as p:
        resp = await forward(p, url, stream=True)
        assert isinstance(resp, StreamingResponse)
        text = await read_all(resp.body_iterator)
        assert b"did not answer in time" in text and text.endswith(b"data: [DONE]\n\n")


async def test_a_refused_connection_is_a_connection_failure() -> None:
    async with Server().running() as url:
        pass  # closed again: nothing listens there now
    async with proxy() as p:
        slot = Slot()
        err = error_of(await forward(p, url, slot=slot))
    expected = "model m: the connection to the engine failed: EngineConnectError: cannot connect to 127.0.0.1:"
    assert expected in err["message"], err
    assert slot.released == 1


async def test_a_dropped_connection_waits_briefly_for_the_engine_to_exit() -> None:
    """The socket closes as the engine dies, a moment before its exit is reaped: the client hears that
    the engine exited if that happens within 0.5 s, else that the connection failed."""

    async def drop(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + chunk(b'data: {"choices":[{"text":"a"}]}\n\n'))
        await writer.drain()
        writer.transport.abort()

    async def drop_at_once(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    async with Server(drop).running() as url, proxy() as p:
        resp = await forward(p, url, stream=True, engine=FakeEngine(url, process=FakeProcess(exits_after=0.1)))
        assert isinstance(resp, StreamingResponse)
        text = await read_all(resp.body_iterator)
        assert text.startswith(b'data: {"choices":[{"text":"a"}]}\n\n')
        assert b"model m: the engine exited while serving this request; cause: ERROR boom" in text, text
    async with Server(drop_at_once).running() as url, proxy() as p:
        err = error_of(await forward(p, url, engine=FakeEngine(url, process=FakeProcess(exits_after=0.1))))
        assert "the engine exited while serving this request" in err["message"], err
        t0 = time.monotonic()
        err = error_of(await forward(p, url, engine=FakeEngine(url, process=FakeProcess(exits_after=None))))
        assert 0.4 < time.monotonic() - t0 < 2
        expected = "the connection to the engine failed: EngineDisconnected: the engine closed the connection"
        assert expected in err["message"], err
        err = error_of(await forward(p, url, engine=FakeEngine(url, process=FakeProcess(returncode=1))))
        assert "the engine exited while serving this request" in err["message"], err


# --- the session in the app --------------------------------------------------------------------------------


async def test_the_lifespan_opens_one_session_with_the_settings_and_closes_it(tmp_path: Path) -> None:
    reg = write_registry(tmp_path / "reg.yaml", [standin_model("m")], executable=standin_executable(tmp_path))
    settings = Settings(registry_path=reg, run_dir=tmp_path / "run", max_connections=7,
                        upstream_connect_timeout_s=3.0, upstream_read_timeout_s=42.0)
    app = create_app(settings, gpu_probe=None)
    async with app.router.lifespan_context(app):
        gw = app.state.gw
        session = gw.session
        assert gw.proxy.session is session and not session.closed
        assert session.limit == 7 and session.connect_timeout == 3.0 and session.read_timeout == 42.0
        assert not gw.client.is_closed
    assert session.closed and gw.client.is_closed
