"""The engines' connection pool (``gateway.proxy.EnginePool``) against a bare keep-alive HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app import make_client
from gateway.proxy import EngineTransport
from gateway.settings import Settings


class Server:
    """Answers every request with ``body`` (chunked when ``chunks`` > 1); counts connections."""

    def __init__(self, chunks: int = 1, delay: float = 0.0) -> None:
        self.chunks = chunks
        self.delay = delay
        self.connections = 0
        self.open = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(self.chunks):
                    writer.write(b"2\r\n%02d\r\n" % i)
                    await writer.drain()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/x"
        finally:
            self.server.close()
            for w in self.writers:
                w.close()


def client(max_connections: int = 8) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=EngineTransport(httpx.Limits(max_connections=max_connections,
                                                                    max_keepalive_connections=max_connections)),
                             timeout=httpx.Timeout(5.0, pool=None), trust_env=False)


async def get(c: httpx.AsyncClient, url: str) -> bytes:
    resp = await c.post(url, content=b"{}")
    assert resp.status_code == 200
    return resp.content


async def test_sequential_requests_reuse_one_connection() -> None:
    srv = Server(chunks=3)
    async with srv.running() as url, client() as c:
        for _ in range(5):
            assert await get(c, url) == b"000102"
        assert srv.connections == 1


async def test_concurrent_requests_open_connections_then_reuse_them() -> None:
    srv = Server(chunks=2, delay=0.01)
    async with srv.running() as url, client() as c:
        await asyncio.gather(*(get(c, url) for _ in range(4)))
        assert srv.connections == 4
        await asyncio.gather(*(get(c, url) for _ in range(4)))
        assert srv.connections == 4


async def test_a_response_closed_early_closes_its_connection() -> None:
    srv = Server(chunks=50, delay=0.005)
    async with srv.running() as url, client() as c:
        async with c.stream("POST", url, content=b"{}") as resp:
            async for _ in resp.aiter_raw():
                break
        for _ in range(50):
            if srv.open == 0:
                break
            await asyncio.sleep(0.01)
        assert srv.open == 0  # the server saw the close: an engine would abort the request
        assert await get(c, url) == b"".join(b"%02d" % i for i in range(50))
        assert srv.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    srv = Server()
    async with srv.running() as url, client() as c:
        assert await get(c, url) == b"00"
        for w in srv.writers:
            w.close()
        await asyncio.sleep(0.05)
        assert await get(c, url) == b"00"
        assert srv.connections == 2


async def test_max_connections_bounds_the_connections_in_use() -> None:
    srv = Server(chunks=2, delay=0.02)
    async with srv.running() as url, client(max_connections=2) as c:
        await asyncio.gather(*(get(c, url) for _ in range(6)))
        assert srv.connections == 2


async def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    async with Server().running() as url:
        pass  # closed again: nothing listens there now
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.post(url, content=b"{}")
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.post("https://127.0.0.1:1/x", content=b"{}")


async def test_make_client_uses_the_engine_pool() -> None:
    c = make_client(Settings(registry_path=Path("unused.yaml")))
    try:
        assert isinstance(c._transport, EngineTransport)
    finally:
        await c.aclose()
