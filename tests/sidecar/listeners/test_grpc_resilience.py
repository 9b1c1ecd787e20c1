"""gRPC listeners, both engines (h2 and grpcio): retries on gRPC codes and per-try timeouts,
retries only before a message was relayed, and the caller's deadline shrinking hop by hop (each
hop sends what is left as grpc-timeout)."""
from __future__ import annotations

import time

import grpc
import pytest

from sidecar.config.model import (Cluster, Endpoint, Listener, PathMatch, RetryPolicy, Route,
                                  RouteTable, RuntimeConfig, VirtualHost, WeightedCluster)
from sidecar.dataplane import Dataplane
from sidecar.listeners import grpc_engine
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.h2_pool import H2Pool
from tests.sidecar.listeners.grpc_apps import App

KINDS = {"/t.S/Unary": "unary", "/t.S/Stream": "server_stream"}


def config(ports, retry=None, timeout_s=5.0):
    route = Route("r", PathMatch("prefix", "/"), grpc_only=False, clusters=(WeightedCluster("c", 1),),
                  timeout_s=timeout_s, retry=retry)
    return RuntimeConfig(
        listeners={"g": Listener("g", "127.0.0.1", 0, "grpc", "outbound", "rt", grpc_kinds=KINDS)},
        route_tables={"rt": RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))},
        clusters={"c": Cluster("c", "round_robin", True, 1.0, False,
                               tuple(Endpoint("127.0.0.1", p) for p in ports))})


@pytest.fixture(params=grpc_engine.ENGINES)
def engine(request):
    return request.param


async def start_listener(engine: str, dp: Dataplane, pools: list):
    """A started gRPC listener of `engine`; its pools are appended to `pools` for closing."""
    pool, h2 = GrpcPool(), H2Pool()
    pools += [pool, h2]
    lst = grpc_engine.make(engine, "g", dp, pool, h2)
    await lst.start("127.0.0.1", 0)
    return lst


@pytest.fixture
async def mesh(engine):
    made = {"apps": [], "listeners": [], "pools": [], "channels": []}

    async def make(apps, retry=None, timeout_s=5.0):
        made["apps"] += apps
        dp = Dataplane("t")
        dp.swap(config([a.port for a in apps], retry, timeout_s))
        lst = await start_listener(engine, dp, made["pools"])
        made["listeners"].append(lst)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{lst.port}")
        ch.listener_port = lst.port
        made["channels"].append(ch)
        return ch, dp

    yield make
    for ch in made["channels"]:
        await ch.close()
    for lst in made["listeners"]:
        await lst.close()
    for pool in made["pools"]:
        await pool.close()
    for app in made["apps"]:
        await app.stop()


async def test_unavailable_is_retried_elsewhere(mesh):
    down, up = await App("down", "unavailable").start(), await App("up").start()
    ch, dp = await mesh([down, up], RetryPolicy(frozenset({"unavailable"}), 2, base_interval_s=0.001))
    unary = ch.unary_unary("/t.S/Unary")
    for i in range(6):
        assert await unary(b"req%d" % i, timeout=5) == b"up:req%d" % i
    assert down.hits >= 3
    assert dp.stats.counter("retries", (("cluster", "c"),)) >= 3


async def test_without_policy_the_code_is_relayed(mesh):
    down = await App("down", "unavailable").start()
    ch, _ = await mesh([down])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/t.S/Unary")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details().endswith("down for maintenance")


async def test_per_try_timeout_then_retry_succeeds_elsewhere(mesh):
    slow, fast = await App("slow", "slow").start(), await App("fast").start()
    ch, _ = await mesh([slow, fast], RetryPolicy(frozenset({"5xx"}), 1, per_try_timeout_s=0.2,
                                                  base_interval_s=0.001))
    for _ in range(4):
        started = time.monotonic()
        assert (await ch.unary_unary("/t.S/Unary")(b"q", timeout=5)).startswith(b"fast:")
        assert time.monotonic() - started < 1.5
    assert slow.hits >= 2
    assert all(r < 0.25 for r in slow.remaining)  # the per-try timeout was the deadline it saw


async def test_server_stream_retried_before_the_first_message_only(mesh):
    down, up = await App("down", "unavailable").start(), await App("up").start()
    ch, _ = await mesh([down, up], RetryPolicy(frozenset({"unavailable"}), 1, base_interval_s=0.001))
    for _ in range(4):
        got = [m async for m in ch.unary_stream("/t.S/Stream")(b"s", timeout=5)]
        assert got == [b"up:0", b"up:1", b"up:2"]
    mid, up2 = await App("mid", "midstream").start(), await App("up2").start()
    ch2, _ = await mesh([mid, up2], RetryPolicy(frozenset({"unavailable"}), 1, base_interval_s=0.001))
    outcomes = []
    for _ in range(2):
        got = []
        try:
            async for m in ch2.unary_stream("/t.S/Stream")(b"s", timeout=5):
                got.append(m)
            outcomes.append(("ok", got))
        except grpc.aio.AioRpcError as err:
            outcomes.append((err.code(), got))
    # A message was relayed before the failure: never retried (the caller would see it twice).
    assert (grpc.StatusCode.UNAVAILABLE, [b"first"]) in outcomes
    assert mid.hits == 1


class DeadlineDataplane(Dataplane):
    """Records the caller's remaining deadline as each call arrives at this hop."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[float] = []

    def begin(self, call):
        super().begin(call)
        if call.deadline is not None:
            self.seen.append(call.deadline - time.monotonic())


async def test_deadline_shrinks_hop_by_hop(engine):
    """caller (2 s) → hop 1 → hop 2 → app.  Each hop passes what is left of its deadline as
    `timeout=`, which grpcio sends as `grpc-timeout`.  grpc core may round the encoded value up
    (measured: 2.0 s arrives as ~2.009 s, 1.9925 s as ~1.999 s), so a hop that spends almost no
    time can show a hair more than the hop before; never more than ~1%.  Time a hop spends (here
    hop 2 waits ~0.3 s of retry back-off after a failed attempt) is always taken off."""
    app = await App("app").start()
    down = await App("down", "unavailable").start()
    hops, pools = [], []
    hop2_retry = RetryPolicy(frozenset({"unavailable"}), 1, base_interval_s=0.3, max_interval_s=0.3)
    upstream = [app.port, down.port]  # round robin starts at index 1: every call meets `down` first
    for name, policy in (("hop2", hop2_retry), ("hop1", None)):
        dp = DeadlineDataplane(name, rand=lambda: 0.999)
        dp.swap(config(upstream, policy))
        lst = await start_listener(engine, dp, pools)
        hops.insert(0, (lst, dp))
        upstream = [lst.port]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{upstream[0]}") as ch:
            for _ in range(3):
                assert await ch.unary_unary("/t.S/Unary")(b"d", timeout=2.0) == b"app:d"
        for i in range(3):
            hop1, hop2, at_app = hops[0][1].seen[i], hops[1][1].seen[i], app.remaining[i]
            assert hop1 <= 2.0 * 1.01 and hop2 <= hop1 * 1.01, (hop1, hop2)
            assert 1.5 < at_app < hop2 - 0.25, (hop1, hop2, at_app)  # the back-off was taken off
        assert down.hits == 3
    finally:
        for lst, _ in hops:
            await lst.close()
        for pool in pools:
            await pool.close()
        await app.stop()
        await down.stop()
