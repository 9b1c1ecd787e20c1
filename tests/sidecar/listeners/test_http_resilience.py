"""Retries, per-try timeouts, circuit breakers and outlier ejection on the HTTP/1.1 listener,
against real loopback sockets (small asyncio upstreams whose misbehaviour is chosen per test)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from sidecar.accesslog import AccessLog
from sidecar.config.model import (CircuitBreaker, Cluster, Endpoint, HeaderMatch, Listener,
                                  OutlierPolicy, PathMatch, RetryPolicy, Route, RouteTable,
                                  RuntimeConfig, StringMatch, VirtualHost, WeightedCluster)
from sidecar.dataplane import Dataplane
from sidecar.listeners.http import HttpListener
from sidecar.upstream.http_pool import HttpPool

WAIT = 10.0


class Upstream:
    """A tiny HTTP/1.1 server: `mode` is ok | 503 | reset | slow.  Answers with its name and the
    sha256 of the request body it received, so a replayed body can be checked."""

    def __init__(self, name: str, mode: str = "ok", delay: float = 2.0):
        self.name, self.mode, self.delay = name, mode, delay
        self.hits = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                body = await reader.readexactly(length) if length else b""
                self.hits += 1
                if self.mode == "reset":
                    writer.transport.abort()
                    return
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                status = b"503 Service Unavailable" if self.mode == "503" else b"200 OK"
                payload = json.dumps({"by": self.name, "sha": hashlib.sha256(body).hexdigest(),
                                      "len": len(body)}).encode()
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self):
        self.server.close()


def config(ports, retry=None, breaker=CircuitBreaker(), outlier=None, timeout_s=5.0) -> RuntimeConfig:
    route = Route(name="r", path=PathMatch("prefix", "/"), clusters=(WeightedCluster("c", 1),),
                  timeout_s=timeout_s, retry=retry)
    return RuntimeConfig(
        listeners={"out": Listener("out", "127.0.0.1", 0, "http", "outbound", "rt")},
        route_tables={"rt": RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))},
        clusters={"c": Cluster("c", "round_robin", False, 1.0, False,
                               tuple(Endpoint("127.0.0.1", p) for p in ports), breaker=breaker,
                               outlier=outlier)})


@pytest.fixture
async def proxy(tmp_path):
    made = []

    async def make(cfg):
        log = tmp_path / f"access{len(made)}.log"
        dp = Dataplane("test", access_log=AccessLog(str(log)))
        dp.swap(cfg)
        pool = HttpPool()
        listener = HttpListener("out", dp, pool)
        await listener.start("127.0.0.1", 0)
        listener.log_path = log
        made.append((listener, pool, dp))
        return listener

    yield make
    for listener, pool, dp in made:
        listener.close()
        pool.close()
        dp.access_log.close()


def records(listener):
    listener.dataplane.access_log.flush()
    return [json.loads(l) for l in listener.log_path.read_text().splitlines() if l.strip()]


async def request(port: int, method: str = "GET", body: bytes = b"", path: str = "/x"):
    """One request on a fresh connection: (status, headers, body)."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"%s %s HTTP/1.1\r\nhost: c\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                         % (method.encode(), path.encode(), len(body)) + body)
            data = await reader.read()
        finally:
            writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:]))
    return int(lines[0].split()[1]), headers, payload


IDEMPOTENT = (HeaderMatch(":method", StringMatch("regex", "GET|HEAD|OPTIONS|PUT|DELETE", False,
                                                  __import__("re").compile("GET|HEAD|OPTIONS|PUT|DELETE"))),)


async def test_5xx_is_retried_on_another_endpoint(proxy):
    bad, good = await Upstream("bad", "503").start(), await Upstream("good").start()
    try:
        p = await proxy(config([bad.port, good.port], RetryPolicy(frozenset({"5xx"}), 2, base_interval_s=0.001)))
        results = [await request(p.port) for _ in range(10)]
        assert [s for s, _, _ in results] == [200] * 10
        assert bad.hits >= 4 and good.hits == 10
        assert any(r["attempts"] == 2 for r in records(p))
    finally:
        bad.close(), good.close()


async def test_without_retry_policy_the_5xx_reaches_the_caller(proxy):
    bad, good = await Upstream("bad", "503").start(), await Upstream("good").start()
    try:
        p = await proxy(config([bad.port, good.port]))
        statuses = [(await request(p.port))[0] for _ in range(4)]
        assert sorted(statuses) == [200, 200, 503, 503]
    finally:
        bad.close(), good.close()


async def test_reset_retry_replays_the_body_intact(proxy):
    bad, good = await Upstream("bad", "reset").start(), await Upstream("good").start()
    body = bytes(range(256)) * 200  # 51 200 bytes: under the 64 KiB replay buffer
    try:
        p = await proxy(config([bad.port, good.port], RetryPolicy(frozenset({"reset"}), 1, base_interval_s=0.001)))
        for _ in range(4):
            status, _, payload = await request(p.port, "PUT", body)
            answer = json.loads(payload)
            assert status == 200 and answer["by"] == "good"
            assert answer["sha"] == hashlib.sha256(body).hexdigest() and answer["len"] == len(body)
        assert bad.hits >= 2
    finally:
        bad.close(), good.close()


async def test_body_too_large_to_replay_is_not_retried_and_the_log_says_so(proxy):
    bad = await Upstream("bad", "reset").start()
    good = await Upstream("good").start()
    try:
        p = await proxy(config([bad.port, good.port], RetryPolicy(frozenset({"reset"}), 1, base_interval_s=0.001)))
        outcomes = [await request(p.port, "PUT", b"x" * (80 * 1024)) for _ in range(2)]
        assert sorted(s for s, _, _ in outcomes) == [200, 503]
        failed = next(h for s, h, _ in outcomes if s == 503)
        assert failed["x-protomesh-reason"].startswith("upstream_reset")
        assert any(r["retry_note"] == "body_too_large_to_replay" for r in records(p))
    finally:
        bad.close(), good.close()


async def test_non_idempotent_method_is_not_retried(proxy):
    bad, good = await Upstream("bad", "reset").start(), await Upstream("good").start()
    policy = RetryPolicy(frozenset({"reset"}), 1, base_interval_s=0.001, request_headers=IDEMPOTENT)
    try:
        p = await proxy(config([bad.port, good.port], policy))
        posts = sorted([(await request(p.port, "POST", b"pay"))[0] for _ in range(2)])
        assert posts == [200, 503]
        assert any(r["retry_note"] == "request_not_retriable" for r in records(p))
        gets = [(await request(p.port, "GET"))[0] for _ in range(4)]
        assert gets == [200] * 4
    finally:
        bad.close(), good.close()


async def test_connect_failure_is_retried():
    dead = await Upstream("dead").start()
    dead_port = dead.port
    dead.close()
    await dead.server.wait_closed()
    good = await Upstream("good").start()
    dp = Dataplane("t")
    dp.swap(config([dead_port, good.port], RetryPolicy(frozenset({"connect-failure"}), 1, base_interval_s=0.001)))
    pool = HttpPool()
    lst = HttpListener("out", dp, pool)
    await lst.start("127.0.0.1", 0)
    try:
        assert [(await request(lst.port))[0] for _ in range(6)] == [200] * 6
    finally:
        lst.close(), pool.close(), good.close()


async def test_slow_endpoint_per_try_timeout_then_retry_elsewhere(proxy):
    slow, fast = await Upstream("slow", "slow", delay=3.0).start(), await Upstream("fast").start()
    policy = RetryPolicy(frozenset({"5xx"}), 1, per_try_timeout_s=0.2, base_interval_s=0.001)
    try:
        p = await proxy(config([slow.port, fast.port], policy))
        for _ in range(4):
            started = time.monotonic()
            status, _, payload = await request(p.port)
            assert status == 200 and json.loads(payload)["by"] == "fast"
            assert time.monotonic() - started < 1.5  # not the slow one's 3 s
        assert slow.hits >= 2
    finally:
        slow.close(), fast.close()


async def test_retry_budget_exhausted_is_the_reason(proxy):
    bad = await Upstream("bad", "reset").start()
    policy = RetryPolicy(frozenset({"reset"}), 3, base_interval_s=0.001)
    try:
        p = await proxy(config([bad.port], policy, breaker=CircuitBreaker(max_retries=0)))
        status, headers, _ = await request(p.port)
        assert status == 503 and headers["x-protomesh-reason"].startswith("retry_budget_exhausted")
        assert bad.hits == 1
        assert p.dataplane.stats.counter("retry_overflow", (("cluster", "c"),)) == 1
    finally:
        bad.close()


async def test_circuit_breaker_overflow_answers_at_once(proxy):
    slow = await Upstream("slow", "slow", delay=1.0).start()
    try:
        p = await proxy(config([slow.port], breaker=CircuitBreaker(max_requests=1)))
        first = asyncio.ensure_future(request(p.port))
        async with asyncio.timeout(WAIT):
            while slow.hits == 0:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        status, headers, body = await request(p.port)
        assert time.monotonic() - started < 0.5
        assert status == 503 and headers["x-protomesh-reason"].startswith("overflow")
        assert b"max_requests" in body
        assert (await first)[0] == 200
        assert p.dataplane.stats.counter("circuit_breaker_overflow", (("cluster", "c"), ("limit", "max_requests"))) == 1
        assert p.dataplane.clusters["c"].breaker.requests == 0
    finally:
        slow.close()


async def test_consecutive_5xx_ejects_the_endpoint(proxy):
    bad, good = await Upstream("bad", "503").start(), await Upstream("good").start()
    od = OutlierPolicy(consecutive_5xx=3, base_ejection_s=30.0, max_ejection_percent=50, interval_s=60.0)
    try:
        p = await proxy(config([bad.port, good.port], outlier=od))
        for _ in range(6):
            await request(p.port)
        assert bad.hits == 3
        for _ in range(10):
            assert (await request(p.port))[0] == 200
        assert bad.hits == 3  # ejected: no more traffic
        st = p.dataplane.clusters["c"]
        assert st.outlier.ejected == {f"127.0.0.1:{bad.port}"}
        assert p.dataplane.stats.counter("outlier_ejections", (("cluster", "c"),)) == 1
    finally:
        bad.close(), good.close()
