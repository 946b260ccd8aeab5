"""The data path's HTTP/1.1 client (``gateway.engine_http``) against bare servers: framing, timeouts,
flow control, cancellation and the pool's bookkeeping (the proxy's own tests cover what it relays)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.engine_http import EngineClient, EngineConnectError, EngineDisconnected, target

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await handler(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in writers:
            w.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def client(*, limit: int = 8, read_timeout: float = 5.0) -> EngineClient:
    return EngineClient(limit=limit, connect_timeout=5.0, read_timeout=read_timeout, keepalive_s=4.0)


def test_the_request_target_is_sent_as_given_unless_it_must_be_encoded() -> None:
    assert target("/v1/responses/resp_1", "a=1&b=%20") == b"/v1/responses/resp_1?a=1&b=%20"
    assert target("/v1/responses/an id#2") == b"/v1/responses/an%20id%232"


async def test_a_stream_that_keeps_sending_outlives_the_read_timeout() -> None:
    """The read timeout is per wait: 12 pieces 0.1 s apart pass a 0.3 s timeout; a 0.6 s silence fails it."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(12):
            writer.write(b"2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)
        writer.write(b"0\r\n\r\n")

    async with serving(trickle) as url, client(read_timeout=0.3) as c:
        resp = await c.request("POST", url, "/x", body=b"{}")
        got = b""
        with pytest.raises(TimeoutError, match=r"sent nothing for 0\.3 s"):
            async for data in resp:
                got += data
        assert got == b"ab" * 12
        resp.release()
        assert c.in_use == 0


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    """Reading pauses past the high-water mark and resumes as the reader catches up; nothing is lost."""
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 65536):
            writer.write(payload[i:i + 65536])
            await writer.drain()

    async with serving(big) as url, client() as c:
        resp = await c.request("GET", url, "/big")
        parts = []
        async for data in resp:
            parts.append(data)
            await asyncio.sleep(0.001)
        assert b"".join(parts) == payload and resp.at_eof
        resp.release()


async def test_a_body_ended_by_the_connection_closing_is_read_whole() -> None:
    async def no_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with serving(no_length) as url, client() as c:
        resp = await c.request("POST", url, "/x", body=b"{}")
        assert resp.status == 200 and resp.header(b"content-type") == b"text/plain"
        assert await resp.read() == b"all of it"
        resp.release()
        assert c.in_use == 0


async def test_what_is_not_http_is_a_disconnect_and_a_refused_port_a_connect_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with serving(garbage) as url, client() as c:
        with pytest.raises(EngineDisconnected, match="not valid HTTP"):
            await c.request("POST", url, "/x", body=b"{}")
        assert c.in_use == 0
    async with client() as c:
        with pytest.raises(EngineConnectError, match=r"cannot connect to 127\.0\.0\.1"):
            await c.request("POST", url, "/x", body=b"{}")
        assert c.in_use == 0


async def test_cancelled_requests_close_their_connection_and_give_back_their_slot() -> None:
    closed = asyncio.Event()
    served = 0

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        await read_request(reader)
        await reader.read()  # until the client closes
        closed.set()

    async with serving(hang) as url, client(limit=1) as c:
        first = asyncio.ensure_future(c.request("POST", url, "/x", body=b"{}"))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(c.request("POST", url, "/x", body=b"{}"))  # waits for the one slot
        await asyncio.sleep(0.05)
        queued.cancel()
        first.cancel()
        for task in (first, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(closed.wait(), 5)  # the engine sees the request abandoned
        assert c.in_use == 0 and served == 1


async def test_connection_close_answers_are_not_reused_and_keep_alive_ones_are() -> None:
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await read_request(reader)
            close = b"/close" in head.split(b"\r\n")[0]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n%s\r\nok" % (b"connection: close\r\n" if close
                                                                                 else b""))
            await writer.drain()
            if close:
                writer.close()
                return

    async with serving(answer) as url, client() as c:
        for path in ("/a", "/b", "/close", "/c"):
            resp = await c.request("GET", url, path)
            assert await resp.read() == b"ok"
            resp.release()
        assert connections == 2 and c.in_use == 0


async def test_a_reused_connection_dropped_unanswered_is_tried_once_more_on_a_new_one() -> None:
    """The keep-alive race: the engine closes an idle connection as the gateway takes it. The request
    never reached the engine, so it goes again on a new connection; on a new connection, never."""
    conns = 0
    asked = 0

    async def drops_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns, asked
        conns += 1
        first_conn = conns == 1
        while True:
            await read_request(reader)
            asked += 1
            if first_conn and asked == 2:
                writer.transport.abort()  # the second request, on the reused connection: dropped unanswered
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async with serving(drops_second) as url, client() as c:
        for _ in range(3):
            resp = await c.request("POST", url, "/x", body=b"{}")
            assert await resp.read() == b"ok"
            resp.release()
        assert conns == 2 and asked == 4 and c.in_use == 0

    async def drops_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal asked
        await read_request(reader)
        asked += 1
        writer.transport.abort()

    asked = 0
    async with serving(drops_all) as url, client() as c:
        with pytest.raises(EngineDisconnected, match="closed the connection before its answer"):
            await c.request("POST", url, "/x", body=b"{}")
        assert asked == 1 and c.in_use == 0
