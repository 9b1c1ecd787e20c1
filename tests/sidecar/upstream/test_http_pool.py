"""The upstream keep-alive pool against a real loopback server."""
from __future__ import annotations

import asyncio
import socket

import pytest

from sidecar.config.model import Endpoint
from sidecar.upstream.http_pool import CHUNKED, CONTENT_LENGTH, NO_BODY, HttpPool

WAIT = 10.0


class Handler:
    """A ResponseHandler that records what the connection reported."""

    def __init__(self):
        self.head = None
        self.body = b""
        self.done = asyncio.get_running_loop().create_future()

    def on_response_head(self, status, reason, headers, framing):
        self.head = (status, reason, framing)

    def on_response_body(self, data):
        self.body += data

    def on_response_complete(self, keep_alive):
        self.done.set_result(("complete", keep_alive))

    def on_upstream_lost(self, why, got_bytes):
        self.done.set_result(("lost", got_bytes))

    def on_upstream_pause(self):
        pass

    def on_upstream_resume(self):
        pass

    def flush(self):
        pass


@pytest.fixture
async def server():
    """Answers each request with the bytes queued in `server.replies` (default: 200 'hi')."""
    state = {"conns": [], "replies": []}

    async def handle(reader, writer):
        state["conns"].append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                reply = state["replies"].pop(0) if state["replies"] else \
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    state["endpoint"] = Endpoint("127.0.0.1", srv.sockets[0].getsockname()[1])
    yield state
    srv.close()


async def exchange(conn, request=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head=False):
    h = Handler()
    conn.start(h, head)
    conn.write(request)
    result = await asyncio.wait_for(h.done, WAIT)
    return h, result


async def test_release_reuse_and_stats(server):
    pool = HttpPool()
    ep = server["endpoint"]
    conn = await pool.acquire(ep)
    h, result = await exchange(conn)
    assert h.head == (200, b"OK", CONTENT_LENGTH) and h.body == b"hi" and result == ("complete", True)
    pool.release(conn, True)
    key = f"{ep.host}:{ep.port}"
    assert pool.stats() == {key: {"open": 1, "idle": 1}}
    assert pool.take_idle(ep) is conn and conn.reused
    other = await pool.acquire(ep)
    assert other is not conn
    assert pool.stats() == {key: {"open": 2, "idle": 0}}
    pool.release(other, False)  # not reusable: closed
    pool.release(conn, True)
    await asyncio.wait_for(_until(lambda: pool.stats()[key] == {"open": 1, "idle": 1}), WAIT)
    pool.close()
    await asyncio.wait_for(_until(lambda: pool.stats()[key] == {"open": 0, "idle": 0}), WAIT)


async def test_idle_connection_closed_by_server_is_forgotten(server):
    pool = HttpPool()
    ep = server["endpoint"]
    conn = await pool.acquire(ep)
    await exchange(conn)
    pool.release(conn, True)
    server["conns"][0].close()
    await asyncio.wait_for(_until(lambda: conn.closed), WAIT)
    assert pool.take_idle(ep) is None
    assert pool.stats()[f"{ep.host}:{ep.port}"] == {"open": 0, "idle": 0}
    pool.close()


async def test_head_response_then_next_response_on_same_connection(server):
    server["replies"] += [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                          b"HTTP/1.1 204 No Content\r\n\r\n",
                          b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]
    pool = HttpPool()
    conn = await pool.acquire(server["endpoint"])
    h, result = await exchange(conn, head=True)
    assert h.head[2] == NO_BODY and result == ("complete", True)
    h, result = await exchange(conn)
    assert h.head[:1] == (204,) and h.head[2] == NO_BODY and result == ("complete", True)
    h, result = await exchange(conn)
    assert h.head[2] == CHUNKED and h.body == b"abc" and result == ("complete", True)
    pool.close()
    conn.abort()


async def test_body_until_close_completes_at_eof(server):
    server["replies"].append(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    pool = HttpPool()
    conn = await pool.acquire(server["endpoint"])
    h = Handler()
    conn.start(h, False)
    conn.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(_until(lambda: h.body == b"until the end"), WAIT)
    server["conns"][0].close()
    assert await asyncio.wait_for(h.done, WAIT) == ("complete", False)
    pool.close()


async def test_server_closing_before_response_reports_lost(server):
    pool = HttpPool()
    conn = await pool.acquire(server["endpoint"])
    h = Handler()
    conn.start(h, False)
    server["conns"][0].close()
    assert await asyncio.wait_for(h.done, WAIT) == ("lost", False)
    pool.close()


async def test_connect_refused_raises_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = HttpPool(connect_timeout_default=2.0)
    with pytest.raises(OSError):
        await pool.acquire(Endpoint("127.0.0.1", port))
    pool.close()


async def test_idle_connections_expire(server):
    pool = HttpPool(idle_timeout_s=0.05)
    ep = server["endpoint"]
    conn = await pool.acquire(ep)
    await exchange(conn)
    pool.release(conn, True)
    await asyncio.wait_for(_until(lambda: pool.stats()[f"{ep.host}:{ep.port}"]["open"] == 0), WAIT)
    pool.close()


async def test_max_idle_per_endpoint(server):
    pool = HttpPool(max_idle_per_endpoint=1)
    ep = server["endpoint"]
    a, b = await pool.acquire(ep), await pool.acquire(ep)
    pool.release(a, True)
    pool.release(b, True)
    await asyncio.wait_for(_until(lambda: pool.stats()[f"{ep.host}:{ep.port}"] ==
                                  {"open": 1, "idle": 1}), WAIT)
    pool.close()


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)
