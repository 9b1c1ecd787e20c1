"""Request mirroring: the shadow gets about the configured share of requests (body intact, Host
suffixed `-shadow`), the caller's answers are the primary's, and a slow or dead shadow never
slows the caller.  Real HTTP and gRPC listeners on loopback."""
from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from control.model import MirrorSpec, Traffic
from control.translate import build
from sidecar.config.errors import ConfigError
from sidecar.config.model import (Cluster, Endpoint, Listener, Mirror, PathMatch, Route, RouteTable,
                                  RuntimeConfig, VirtualHost, WeightedCluster)
from sidecar.config.parse import parse_route
from sidecar.dataplane import Dataplane
from sidecar.filters.mirror import shadow_head, shadow_host
from sidecar.listeners.grpc import GrpcListener
from sidecar.listeners.http import HttpListener
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.http_pool import HttpPool


@pytest.mark.parametrize("host, shadow", [("users", "users-shadow"), ("users:8080", "users-shadow:8080"),
                                          ("[::1]:80", "[::1]-shadow:80"), ("[::1]", "[::1]-shadow")])
def test_shadow_host(host, shadow):
    assert shadow_host(host) == shadow


def test_shadow_head_rewrites_host_and_closes():
    head = b"POST /a HTTP/1.1\r\nHost: api:80\r\nconnection: keep-alive\r\nx-a: 1\r\n\r\n"
    assert shadow_head(head) == b"POST /a HTTP/1.1\r\nhost: api-shadow:80\r\nx-a: 1\r\nconnection: close\r\n\r\n"


def test_mirror_policy_round_trip_and_runtime_key_refused():
    route = build.apply_traffic_route(build.route("r", prefix="/", split=(("c", 1),), timeout_s=5.0),
                                      Traffic(mirrors=(MirrorSpec("shadow", 12.5),)), True)
    assert parse_route(route, "r").mirrors == (Mirror("shadow", 0.125),)
    route.route.request_mirror_policies[0].runtime_fraction.runtime_key = "k"
    with pytest.raises(ConfigError) as info:
        parse_route(route, "r")
    assert info.value.where == "r.route.request_mirror_policies[0].runtime_fraction.runtime_key"


class Server:
    def __init__(self, name: str, delay: float = 0.0):
        self.name, self.delay, self.seen = name, delay, []

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                hdrs = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
                body = await reader.readexactly(int(hdrs.get("content-length", 0)))
                self.seen.append((hdrs.get("host"), body))
                if self.delay:
                    await asyncio.sleep(self.delay)
                out = f"from {self.name}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _config(primary: int, shadow: int, fraction: float, protocol="http") -> RuntimeConfig:
    route = Route("r", PathMatch("prefix", "/"), clusters=(WeightedCluster("c", 1),), timeout_s=5.0,
                  mirrors=(Mirror("shadow", fraction),))
    h2 = protocol == "grpc"
    return RuntimeConfig(
        listeners={"out": Listener("out", "127.0.0.1", 0, protocol, "outbound", "rt",
                                   grpc_kinds={"/t.S/M": "unary"})},
        route_tables={"rt": RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))},
        clusters={"c": Cluster("c", "round_robin", h2, 1.0, False, (Endpoint("127.0.0.1", primary),)),
                  "shadow": Cluster("shadow", "round_robin", h2, 1.0, False, (Endpoint("127.0.0.1", shadow),))})


async def _post(port: int, body: bytes) -> tuple[bytes, float]:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /x HTTP/1.1\r\nhost: api\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(body), body))
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return data.partition(b"\r\n\r\n")[2], time.monotonic() - t0


async def test_http_mirror_share_body_and_no_effect_on_the_caller():
    primary, shadow = await Server("primary").start(), await Server("shadow", delay=1.0).start()
    dp = Dataplane("t")
    dp.swap(_config(primary.port, shadow.port, 0.3))
    lst = HttpListener("out", dp, HttpPool())
    await lst.start("127.0.0.1", 0)
    try:
        n, results = 300, []
        for i in range(n // 30):
            results += await asyncio.gather(*(_post(lst.port, b"body-%d" % (i * 30 + j)) for j in range(30)))
        assert all(body == b"from primary" for body, _ in results)
        assert max(t for _, t in results) < 0.5  # the shadow takes 1 s per request; nobody waited for it
        deadline = time.monotonic() + 5
        while len(shadow.seen) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        got = len(shadow.seen)
        assert abs(got - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7), got
        assert all(host == "api-shadow" for host, _ in shadow.seen)
        assert {b for _, b in shadow.seen} <= {b for _, b in primary.seen}  # copies, bodies intact
        assert len(primary.seen) == n
    finally:
        lst.close()
        primary.server.close()
        shadow.server.close()


async def test_a_dead_shadow_changes_nothing_for_the_caller():
    primary = await Server("primary").start()
    dp = Dataplane("t")
    dp.swap(_config(primary.port, 1, 1.0))  # port 1: connection refused
    lst = HttpListener("out", dp, HttpPool())
    await lst.start("127.0.0.1", 0)
    try:
        results = [await _post(lst.port, b"x") for _ in range(20)]
        assert all(body == b"from primary" for body, _ in results)
        await asyncio.sleep(0.1)
        assert dp.stats.counter("mirror_requests", (("cluster", "shadow"), ("result", "failed"))) == 20
    finally:
        lst.close()
        primary.server.close()


async def test_grpc_unary_mirror():
    seen = {"primary": 0, "shadow": 0}

    async def start(name):
        async def echo(request, context):
            seen[name] += 1
            return request + name.encode()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"M": grpc.unary_unary_rpc_method_handler(echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
    (ps, pport), (ss, sport) = await start("primary"), await start("shadow")
    dp = Dataplane("t")
    dp.swap(_config(pport, sport, 1.0, protocol="grpc"))
    pool = GrpcPool()
    lst = GrpcListener("out", dp, pool)
    await lst.start("127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{lst.port}")
    try:
        replies = [await ch.unary_unary("/t.S/M")(b"hi-", timeout=5) for _ in range(10)]
        assert replies == [b"hi-primary"] * 10
        deadline = time.monotonic() + 5
        while seen["shadow"] < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert seen == {"primary": 10, "shadow": 10}
    finally:
        await ch.close()
        await lst.close()
        await pool.close()
        await ps.stop(None)
        await ss.stop(None)
