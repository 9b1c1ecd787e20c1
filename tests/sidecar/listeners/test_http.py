"""The HTTP/1.1 proxy listener against real sockets: aiohttp upstreams, raw clients for framing."""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket

import aiohttp
import pytest
import uvloop
from aiohttp import web

from sidecar.accesslog import AccessLog
from sidecar.config.model import (Cluster, Endpoint, Listener, PathMatch, Route, RouteTable,
                                  RuntimeConfig, VirtualHost, WeightedCluster)
from sidecar.dataplane import Dataplane
from sidecar.listeners.http import HttpListener
from sidecar.upstream.http_pool import HttpPool
from tests.waiting import until

WAIT = 10.0  # bound for every wait in this module

# Every test runs on both loops.  pytest-asyncio 1.x prefers a `pytest_asyncio_loop_factories`
# hook in a conftest for this; until the suite has one, the fixture override below does it.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request):
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


BLOCK = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
BIG = 20 * 1024 * 1024


# ---- helpers ---------------------------------------------------------------------------------
class RecordingDataplane(Dataplane):
    """A real Dataplane that also remembers each `finish` so tests can wait for outcomes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.finished: list[tuple[int, str]] = []
        self.changed = asyncio.Event()

    def finish(self, call, target, status, reason="", **kw):
        super().finish(call, target, status, reason, **kw)
        self.finished.append((status, reason))
        self.changed.set()

    async def wait_finished(self, n: int) -> list[tuple[int, str]]:
        async with asyncio.timeout(WAIT):
            while len(self.finished) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.finished


def make_config(upstream_port: int, timeout_s: float | None = 2.0, prefix: str = "/") -> RuntimeConfig:
    route = Route(name="r", path=PathMatch("prefix", prefix), clusters=(WeightedCluster("c", 1),),
                  timeout_s=timeout_s)
    table = RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))
    return RuntimeConfig(
        listeners={"out": Listener(name="out", host="127.0.0.1", port=0, protocol="http",
                                   direction="outbound", route_table="rt")},
        route_tables={"rt": table},
        clusters={"c": Cluster("c", "round_robin", False, 1.0, False,
                               (Endpoint("127.0.0.1", upstream_port),))})


class Proxy:
    def __init__(self, dp, pool, listener, log_path):
        self.dp, self.pool, self.listener, self.log_path = dp, pool, listener, log_path

    @property
    def port(self):
        return self.listener.port

    def log_records(self):
        self.dp.access_log.flush()
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
async def make_proxy(tmp_path):
    made = []

    async def make(upstream_port, timeout_s=2.0, prefix="/", **listener_kw):
        log_path = tmp_path / f"access{len(made)}.log"
        dp = RecordingDataplane("test", access_log=AccessLog(str(log_path)))
        dp.swap(make_config(upstream_port, timeout_s, prefix))
        pool = HttpPool()
        listener = HttpListener("out", dp, pool, **listener_kw)
        await listener.start("127.0.0.1", 0)
        proxy = Proxy(dp, pool, listener, log_path)
        made.append(proxy)
        return proxy

    yield make
    for p in made:
        p.listener.close()
        p.pool.close()
        p.dp.access_log.close()


class Upstream:
    """An aiohttp app with the handlers the tests need; records what it saw."""

    def __init__(self):
        self.peers: list[int] = []
        self.gate = asyncio.Event()
        self.gated_entered = asyncio.Event()
        self.stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/hello", self.hello)
        app.router.add_get("/path/{tail:.*}", self.path)
        app.router.add_route("*", "/headers", self.headers)
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/sha", self.sha)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/gated", self.gated)
        app.router.add_get("/nocontent", self.nocontent)
        app.router.add_get("/big", self.big)
        app.router.add_post("/gated-sha", self.gated_sha)
        self.app = app
        self.runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def start(self):
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def hello(self, request):
        self.peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(text="hello")

    async def path(self, request):
        return web.Response(text=request.path_qs)

    async def headers(self, request):
        body = await request.read()
        return web.json_response({"headers": {k.lower(): v for k, v in request.headers.items()},
                                  "body": body.decode("latin-1"), "target": request.path_qs})

    async def echo(self, request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def sha(self, request):
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"sha": h.hexdigest(), "n": n,
                                  "cl": request.headers.get("content-length"),
                                  "te": request.headers.get("transfer-encoding")})

    async def stream(self, request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first;")
        await asyncio.wait_for(self.gate.wait(), WAIT)
        await resp.write(b"second")
        await resp.write_eof()
        return resp

    async def slow(self, request):
        await asyncio.wait_for(self.stopping.wait(), WAIT)
        return web.Response(text="late")

    async def gated(self, request):
        self.gated_entered.set()
        await asyncio.wait_for(self.gate.wait(), WAIT)
        return web.Response(text="opened")

    async def big(self, request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(BIG // len(BLOCK)):
            await resp.write(BLOCK)
        await resp.write_eof()
        return resp

    async def gated_sha(self, request):
        self.gated_entered.set()
        await asyncio.wait_for(self.gate.wait(), WAIT)
        return await self.sha(request)

    async def nocontent(self, request):
        return web.Response(status=204)

    async def stop(self):
        self.stopping.set()
        self.gate.set()
        await self.runner.cleanup()


@pytest.fixture
async def upstream():
    u = await Upstream().start()
    yield u
    await u.stop()


async def read_response(reader, head=False):
    async with asyncio.timeout(WAIT):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                headers[k] = headers[k] + ", " + v.strip() if k in headers else v.strip()
        if head or status in (204, 304) or status < 200:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += data[:-2]
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
    return status, headers, body


async def open_client(port):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)


async def closed(reader) -> bool:
    async with asyncio.timeout(WAIT):
        return await reader.read() == b""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- keep-alive, bodies, framing ----------------------------------------------------------------
async def test_keepalive_one_upstream_connection_for_50_requests(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    for _ in range(50):
        writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"hello")
        assert "connection" not in headers
    assert len(upstream.peers) == 50 and len(set(upstream.peers)) == 1
    assert proxy.pool.stats() == {f"127.0.0.1:{upstream.port}": {"open": 1, "idle": 1}}
    writer.close()


async def test_post_with_content_length_keeps_content_length(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    body = b"x" * 100_000
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{proxy.port}/sha", data=body) as r:
            got = await r.json()
    assert got == {"sha": hashlib.sha256(body).hexdigest(), "n": len(body),
                   "cl": str(len(body)), "te": None}


async def test_chunked_request_body_is_streamed(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"6\r\nfirst;\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    # The upstream echoes the first chunk while the client has not sent the rest.
    first = await asyncio.wait_for(reader.readuntil(b"first;\r\n"), WAIT)
    assert first.endswith(b"6\r\nfirst;\r\n")
    writer.write(b"5\r\nlast!\r\n0\r\n\r\n")
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
    assert b"last!" in rest
    # the connection is still usable
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello"
    writer.close()


async def test_chunked_request_upstream_sees_chunked(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST /sha HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    got = json.loads(body)
    assert status == 200
    assert got["sha"] == hashlib.sha256(b"abcde").hexdigest() and got["te"] == "chunked"
    writer.close()


async def test_streamed_chunked_response(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: svc\r\n\r\n")
    got = await asyncio.wait_for(reader.readuntil(b"first;\r\n"), WAIT)
    assert b"transfer-encoding: chunked" in got.lower()
    upstream.gate.set()  # the second part exists only after the client saw the first
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
    assert b"second" in rest
    writer.close()


async def test_20_megabytes_both_ways(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, timeout_s=None)
    blob = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    h = hashlib.sha256()
    n = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(f"http://127.0.0.1:{proxy.port}/echo", data=blob) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                h.update(chunk)
                n += len(chunk)
    assert n == len(blob) and h.hexdigest() == hashlib.sha256(blob).hexdigest()


async def test_head_and_204_keep_framing(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"HEAD /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await read_response(reader, head=True)
    assert status == 200 and headers["content-length"] == "5"
    writer.write(b"GET /nocontent HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 204 and "transfer-encoding" not in headers
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"hello")
    writer.close()


async def test_head_then_get_on_same_connection(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    for _ in range(3):
        writer.write(b"HEAD /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, _, _ = await read_response(reader, head=True)
        assert status == 200
        writer.write(b"GET /nocontent HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert (await read_response(reader))[0] == 204
        writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"hello")
    assert len(set(upstream.peers)) == 1  # the upstream connection survived HEAD and 204
    writer.close()


async def test_pipelined_requests_answered_in_order(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"".join(b"GET /path/%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(5)) +
                 b"POST /sha HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc" +
                 b"GET /path/last HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    for i in range(5):
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"/path/%d" % i)
    status, _, body = await read_response(reader)
    assert json.loads(body)["sha"] == hashlib.sha256(b"abc").hexdigest()
    status, headers, body = await read_response(reader)
    assert (body, headers["connection"]) == (b"/path/last", "close")
    assert await closed(reader)


async def test_http10_client_gets_body_until_close(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /stream HTTP/1.0\r\nHost: svc\r\n\r\n")
    upstream.gate.set()
    status, headers, body = await read_response(reader)
    assert status == 200 and "transfer-encoding" not in headers
    assert body == b"first;second"


async def test_hop_by_hop_stripped_and_forwarding_headers_added(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /headers?q=1 HTTP/1.1\r\nHost: svc.local\r\nConnection: keep-alive, X-Secret\r\n"
                 b"Keep-Alive: timeout=5\r\nX-Secret: no\r\nTE: trailers\r\nX-Kept: yes\r\n"
                 b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n\r\n")
    status, _, body = await read_response(reader)
    got = json.loads(body)
    h = got["headers"]
    assert status == 200 and got["target"] == "/headers?q=1"
    for name in ("keep-alive", "x-secret", "te"):
        assert name not in h
    assert h["host"] == "svc.local" and h["x-kept"] == "yes"
    assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert len(h["x-request-id"]) >= 16
    writer.close()


async def test_expect_100_continue_answered_locally(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST /headers HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"body")
    status, _, body = await read_response(reader)
    got = json.loads(body)
    assert status == 200 and got["body"] == "body" and "expect" not in got["headers"]
    writer.close()


async def test_slow_client_pauses_upstream_reading(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, timeout_s=None)
    reader, writer = await open_client(proxy.port)
    writer.transport.pause_reading()  # a client that does not read
    writer.write(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
    (down,) = proxy.listener._conns
    await until(lambda: down.write_paused and down.queue and down.queue[0].up is not None
                     and down.queue[0].up._read_paused)
    # Bounded by about one upstream read (uvloop reads 256 KiB), not by what the sockets hold.
    assert down.transport.get_write_buffer_size() < 1024 * 1024
    writer.transport.resume_reading()
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) == BIG
    assert hashlib.sha256(body).digest() == hashlib.sha256(BLOCK * (BIG // len(BLOCK))).digest()
    writer.close()


async def test_slow_upstream_reader_pauses_client_reading(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, timeout_s=None)
    reader, writer = await open_client(proxy.port)
    blob = BLOCK * (BIG // len(BLOCK))
    writer.write(b"POST /gated-sha HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(blob))
    sender = asyncio.create_task(_send(writer, blob))
    await asyncio.wait_for(upstream.gated_entered.wait(), WAIT)  # upstream reads no body yet
    (down,) = proxy.listener._conns
    await until(lambda: down.paused)
    ex = down.queue[0]
    assert ex.up.transport.get_write_buffer_size() < 4 * 1024 * 1024
    assert not sender.done()  # the client is held back, not buffered
    upstream.gate.set()
    await asyncio.wait_for(sender, WAIT)
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["sha"] == hashlib.sha256(blob).hexdigest()
    writer.close()


async def _send(writer, blob):
    writer.write(blob)
    await writer.drain()


# ---- local replies and upstream failures ----------------------------------------------------------
async def test_no_route_is_404_with_reason(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, prefix="/api")
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /other HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 404 and headers["x-protomesh-reason"] == "no_route"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "no_route"
    # keep-alive survives a local reply
    writer.write(b"GET /other HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(reader))[0] == 404
    assert await proxy.dp.wait_finished(2) == [(404, "no_route")] * 2
    writer.close()


async def test_upstream_down_is_503_unavailable(make_proxy):
    proxy = await make_proxy(free_port())
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 503 and headers["x-protomesh-reason"] == "upstream_unavailable route=r"
    assert "cluster c" in json.loads(body)["message"]
    writer.close()


async def test_slow_upstream_is_504_timeout(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, timeout_s=0.2)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 504 and headers["x-protomesh-reason"] == "upstream_timeout route=r"
    assert json.loads(body)["error"] == "upstream_timeout"
    # the timed-out upstream connection is not reused: the next request still works
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello"
    writer.close()


class RawUpstream:
    """A hand-written upstream: `script(n_conn, n_req)` says what to do with each request."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def handle(self, reader, writer):
        self.connections += 1
        conn_no = self.connections
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                n += 1
                self.requests.append(head + body)
                action = self.script(conn_no, n)
                if action == "close":
                    writer.close()
                    return
                writer.write(action)
                await writer.drain()
                if action.endswith(b"#close"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self):
        self.server.close()


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


async def test_pooled_connection_closed_by_upstream_is_retried(make_proxy):
    # The second request on a connection finds it closed before any response byte:
    # the request must be re-sent on a fresh connection, invisibly to the client.
    up = await RawUpstream(lambda conn, n: OK5 if n == 1 else "close").start()
    proxy = await make_proxy(up.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello"
    writer.write(b"POST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\ndata")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"hello")
    assert up.connections == 2
    assert up.requests[-1].startswith(b"POST /b ") and up.requests[-1].endswith(b"data")
    assert proxy.dp.finished == [(200, ""), (200, "")]
    writer.close()
    await up.stop()


async def test_fresh_connection_reset_is_503_upstream_reset(make_proxy):
    up = await RawUpstream(lambda conn, n: "close").start()
    proxy = await make_proxy(up.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 503 and headers["x-protomesh-reason"] == "upstream_reset route=r"
    assert up.connections == 1
    writer.close()
    await up.stop()


async def test_upstream_reset_after_response_started_aborts_client(make_proxy):
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part#close"
    up = await RawUpstream(lambda conn, n: partial).start()
    proxy = await make_proxy(up.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await read_response(reader)
    assert await proxy.dp.wait_finished(1) == [(200, "upstream_reset_after_response_started")]
    await up.stop()


async def test_http10_upstream_body_until_close_is_rechunked(make_proxy):
    up = await RawUpstream(lambda conn, n: b"HTTP/1.0 200 OK\r\n\r\nold-style body#close").start()
    proxy = await make_proxy(up.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert headers["transfer-encoding"] == "chunked" and body == b"old-style body#close"
    writer.write(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")  # downstream keep-alive still works
    assert (await read_response(reader))[2] == b"old-style body#close"
    assert up.connections == 2
    writer.close()
    await up.stop()


# ---- bad clients -----------------------------------------------------------------------------------
async def test_malformed_request_is_400_and_listener_keeps_serving(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 400 and headers["x-protomesh-reason"] == "bad_request"
    assert headers["connection"] == "close" and json.loads(body)["message"]
    assert await closed(reader)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello"
    assert (await proxy.dp.wait_finished(2))[0] == (400, "bad_request")
    writer.close()


async def test_headers_too_large_is_431(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, max_header_bytes=1024)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 431 and headers["x-protomesh-reason"] == "headers_too_large"
    assert await closed(reader)


async def test_header_timeout_is_408(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, header_timeout_s=0.2)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: sv")  # and never the rest
    status, headers, _ = await read_response(reader)
    assert status == 408 and headers["x-protomesh-reason"] == "header_timeout"
    assert await closed(reader)
    assert await proxy.dp.wait_finished(1) == [(408, "header_timeout")]


async def test_client_going_away_cancels_upstream_and_logs_499(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, timeout_s=None)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    async with asyncio.timeout(WAIT):
        while not proxy.pool.stats():
            await asyncio.sleep(0.01)
    writer.close()
    assert await proxy.dp.wait_finished(1) == [(499, "downstream_reset")]
    async with asyncio.timeout(WAIT):  # the upstream connection was closed, not pooled
        while proxy.pool.stats()[f"127.0.0.1:{upstream.port}"]["open"]:
            await asyncio.sleep(0.01)


# ---- drain and access log --------------------------------------------------------------------------
async def test_drain_lets_inflight_request_finish_with_connection_close(upstream, make_proxy):
    proxy = await make_proxy(upstream.port)
    busy_r, busy_w = await open_client(proxy.port)
    idle_r, idle_w = await open_client(proxy.port)
    idle_w.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await read_response(idle_r))[0] == 200
    busy_w.write(b"GET /gated HTTP/1.1\r\nHost: svc\r\n\r\n")
    await asyncio.wait_for(upstream.gated_entered.wait(), WAIT)
    drain = asyncio.create_task(proxy.listener.drain(WAIT))
    assert await closed(idle_r)  # an idle keep-alive connection is closed at once
    with pytest.raises(OSError):
        await open_client(proxy.port)  # no longer accepting
    upstream.gate.set()
    status, headers, body = await read_response(busy_r)
    assert (status, body, headers["connection"]) == (200, b"opened", "close")
    assert await closed(busy_r)
    await asyncio.wait_for(drain, WAIT)
    assert proxy.listener.connections == 0


async def test_access_log_records_status_and_reason(upstream, make_proxy):
    proxy = await make_proxy(upstream.port, prefix="/hello")
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: svc\r\n\r\nGET /nope HTTP/1.1\r\nHost: svc\r\n\r\n")
    await read_response(reader)
    await read_response(reader)
    await proxy.dp.wait_finished(2)
    records = proxy.log_records()
    assert [(r["path"], r["status"], r["reason"]) for r in records] == [
        ("/hello", 200, ""), ("/nope", 404, "no_route")]
    assert records[0]["upstream"] == f"127.0.0.1:{upstream.port}" and records[0]["bytes_out"] == 5
    writer.close()
