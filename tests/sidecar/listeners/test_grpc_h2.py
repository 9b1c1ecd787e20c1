"""The h2 gRPC engine end to end: a real grpcio client → GrpcH2Listener → a real grpcio server,
all on 127.0.0.1.  Metadata, status and trailers relayed; all four call kinds; messages far
beyond the flow-control windows; deadlines; cancellation; local replies with reasons; retries;
reflection and health answered locally; malformed frames; drain."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.config.model import (Cluster, Endpoint, Listener, Mirror, PathMatch, RetryPolicy, Route,
                                  RouteTable, RuntimeConfig, VirtualHost, WeightedCluster)
from sidecar.dataplane import Dataplane
from sidecar.filters.fault import FaultPolicy
from sidecar.h2 import frames as F
from sidecar.h2.hpack import Encoder
from tests.sidecar.listeners.grpc_apps import BIG, App
from sidecar.listeners.grpc_h2 import GrpcH2Listener
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.h2_pool import H2Pool

KINDS = {"/t.S/Unary": "unary", "/t.S/Server": "server_stream", "/t.S/Client": "client_stream",
         "/t.S/Bidi": "bidi_stream", "/t.S/Hang": "server_stream"}


def config(ports, retry=None, timeout_s=5.0, descriptor_set=b"", prefix="/t.S/", fault=None, shadow=None):
    route = Route("r", PathMatch("prefix", prefix), grpc_only=False, clusters=(WeightedCluster("c", 1),),
                  timeout_s=timeout_s, retry=retry, fault=fault,
                  mirrors=(Mirror("shadow", 1.0),) if shadow else ())
    clusters = {"c": Cluster("c", "round_robin", True, 1.0, False, tuple(Endpoint("127.0.0.1", p) for p in ports))}
    if shadow:
        clusters["shadow"] = Cluster("shadow", "round_robin", True, 1.0, False, (Endpoint("127.0.0.1", shadow),))
    return RuntimeConfig(
        listeners={"g": Listener("g", "127.0.0.1", 0, "grpc", "outbound", "rt", grpc_kinds=KINDS,
                                 descriptor_set=descriptor_set)},
        route_tables={"rt": RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))},
        clusters=clusters)


class CountingDataplane(Dataplane):
    """Checks the contract: every call that began finishes exactly once."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.begun: list = []
        self.finished: list = []

    def begin(self, call):
        super().begin(call)
        self.begun.append(call)

    def finish(self, call, *a, **kw):
        assert all(c is not call for c in self.finished), f"finish twice for {call.path}"
        self.finished.append(call)
        call.extra["bytes"] = (kw.get("bytes_in"), kw.get("bytes_out"))
        super().finish(call, *a, **kw)


@pytest.fixture
async def mesh():
    made = {"apps": [], "listeners": [], "pools": [], "channels": []}

    async def make(apps, retry=None, timeout_s=5.0, ports=None, **kw):
        made["apps"] += apps
        dp = CountingDataplane("t")
        dp.swap(config(ports or [a.port for a in apps], retry, timeout_s, **kw))
        h2pool = H2Pool()
        lst = GrpcH2Listener("g", dp, GrpcPool(), h2pool)
        await lst.start("127.0.0.1", 0)
        made["listeners"].append(lst)
        made["pools"].append(h2pool)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{lst.port}", options=BIG)
        made["channels"].append(ch)
        return ch, dp, lst

    yield make
    for ch in made["channels"]:
        await ch.close()
    for lst in made["listeners"]:
        await lst.close()
        for _ in range(100):  # closing connections cancel what is left; then all have finished
            if lst.inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert lst.inflight == 0
        dp = lst.dataplane
        assert len(dp.finished) == len(dp.begun)
    for pool in made["pools"]:
        await pool.close()
    for app in made["apps"]:
        await app.stop()


async def test_unary_relays_messages_metadata_and_status(mesh):
    app = await App().start()
    ch, dp, lst = await mesh([app])
    call = ch.unary_unary("/t.S/Unary")(b"hello", timeout=5, metadata=(("x-user", "u1"), ("x-key-bin", b"\x01\x02")))
    assert await call == b"app:hello"
    assert ("x-initial", "yes") in tuple(await call.initial_metadata())
    trailing = tuple(await call.trailing_metadata())
    assert ("x-trailing", "also") in trailing and ("x-bin", b"\x00\xff") in trailing
    seen = app.metadata[0]
    assert seen["x-user"] == "u1" and seen["x-key-bin"] == b"\x01\x02"
    assert seen["traceparent"].startswith("00-")  # the mesh's own hop, not the caller's
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/t.S/Unary")(b"fail", timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "nope: ünïcode"
    assert ("why", "asked-to") in tuple(info.value.trailing_metadata())
    assert lst.inflight == 0
    assert dp.finished[0].extra["bytes"] == (5 + 5, 5 + 9)  # gRPC-framed "hello" in, "app:hello" out


async def test_all_four_kinds(mesh):
    app = await App().start()
    ch, _, _ = await mesh([app])
    assert [m async for m in ch.unary_stream("/t.S/Server")(b"4", timeout=5)] == [b"app:0", b"app:1", b"app:2", b"app:3"]

    async def gen(n, size):
        for i in range(n):
            yield bytes([65 + i % 26]) * size
    assert await ch.stream_unary("/t.S/Client")(gen(50, 1000), timeout=5) == b"50/50000"
    call = ch.stream_stream("/t.S/Bidi")(timeout=5)
    for m in (b"abc", b"hello", b"xyz"):  # ping-pong: each answer before the next request
        await call.write(m)
        assert await call.read() == m[::-1]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_messages_far_beyond_the_windows(mesh):
    """8 MiB each way through windows of 1 MiB (ours) and 64 KiB (grpcio's first ones):
    everything arrives, in order, with flow control on both connections."""
    app = await App().start()
    ch, _, _ = await mesh([app])
    big = bytes(range(256)) * (8 * 4096)
    assert len(await ch.unary_unary("/t.S/Unary")(b"size:%d" % len(big), timeout=20)) == len(big)
    assert await ch.stream_unary("/t.S/Client")(_repeat(big, 2), timeout=20) == b"2/%d" % (2 * len(big))
    got = [m async for m in ch.stream_stream("/t.S/Bidi")(_repeat(big[:3 << 20], 4), timeout=20)]
    assert got == [big[:3 << 20][::-1]] * 4


async def _repeat(msg, n):
    for _ in range(n):
        yield msg


async def test_caller_deadline_is_passed_on_and_enforced(mesh):
    app = await App("slow", "slow").start()
    ch, dp, _ = await mesh([app], timeout_s=None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/t.S/Unary")(b"x", timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.remaining[0] is not None and app.remaining[0] <= 0.51  # grpc core rounds grpc-timeout up a little


async def test_route_timeout_is_a_local_reply_with_reason(mesh):
    app = await App("slow", "slow").start()
    ch, _, _ = await mesh([app], timeout_s=0.3)
    call = ch.unary_unary("/t.S/Unary")(b"x", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ("x-protomesh-reason", "upstream_timeout route=r") in tuple(info.value.trailing_metadata())
    assert app.remaining[0] <= 0.31  # the route timeout went upstream as grpc-timeout (rounded up a little)


async def test_cancel_reaches_the_upstream(mesh):
    app = await App().start()
    ch, dp, lst = await mesh([app])
    call = ch.unary_stream("/t.S/Hang")(b"", timeout=20)
    assert await call.read() == b"started"
    call.cancel()
    await asyncio.wait_for(app.cancelled.wait(), 5)
    for _ in range(200):
        if lst.inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert lst.inflight == 0


async def test_unreachable_upstream_is_unavailable_with_reason(mesh):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there now
    ch, _, _ = await mesh([], ports=[dead])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/t.S/Unary")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("x-protomesh-reason", "upstream_unavailable route=r") in tuple(info.value.trailing_metadata())
    assert "cluster c endpoint 127.0.0.1:%d" % dead in info.value.details()


async def test_no_route_is_unimplemented_with_reason(mesh):
    app = await App().start()
    ch, _, _ = await mesh([app])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/other.S/M")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert ("x-protomesh-reason", "no_route") in tuple(info.value.trailing_metadata())
    assert app.hits == 0


async def test_health_and_reflection_answered_locally(mesh):
    from tests.sidecar.transcode.protoset import demo_set
    app = await App().start()
    ch, _, _ = await mesh([app], descriptor_set=demo_set(), prefix="/demo.users.v1.Users/")
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    answers = [a async for a in stub.ServerReflectionInfo(
        _one(reflection_pb2.ServerReflectionRequest(list_services="")), timeout=5)]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "demo.users.v1.Users" in names
    assert app.hits == 0


async def _one(msg):
    yield msg


async def test_malformed_frames_get_goaway_and_the_listener_keeps_serving(mesh):
    app = await App().start()
    ch, _, lst = await mesh([app])
    for garbage in (b"GET / HTTP/1.1\r\n\r\n",
                    F.PREFACE + F.settings() + F.frame(F.DATA, 0, 0, b"x"),
                    F.PREFACE + F.settings() + F.frame(F.HEADERS, F.FLAG_END_HEADERS, 1, b"\xff\xff\xff")):
        reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
        writer.write(garbage)
        data = await asyncio.wait_for(reader.read(), 5)  # until the listener closes it
        writer.close()
        frames_seen = _frame_types(data)
        assert F.GOAWAY in frames_seen
    # A request head that is not gRPC-shaped costs one stream only.
    reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
    bad = Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/t.S/Unary")])
    writer.write(F.PREFACE + F.settings() + F.headers(1, bad, True))
    data = b""
    while F.RST_STREAM not in _frame_types(data):
        data += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert await ch.unary_unary("/t.S/Unary")(b"still", timeout=5) == b"app:still"


def _frame_types(data: bytes) -> list[int]:
    out, pos = [], 0
    while len(data) - pos >= 9:
        length, ftype, _, _ = F.parse_header(data, pos)
        out.append(ftype)
        pos += 9 + length
    return out


async def test_drain_lets_the_call_in_flight_finish(mesh):
    """GOAWAY goes out, the bidi call open at that moment goes on to its end, then the
    listener refuses new connections."""
    app = await App().start()
    ch, _, lst = await mesh([app])
    call = ch.stream_stream("/t.S/Bidi")(timeout=10)
    await call.write(b"before")
    assert await call.read() == b"erofeb"
    drain = asyncio.ensure_future(lst.drain(5.0))
    await asyncio.sleep(0)  # let the drain send its GOAWAY
    await call.write(b"after")
    assert await call.read() == b"retfa"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(drain, 6)
    assert not lst._conns
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", lst.port)


async def test_upstream_restart_is_survived(mesh):
    """The upstream goes away (GOAWAY, then closed): the pooled connection is dropped and the
    next calls reconnect to the new server."""
    app = await App().start()
    ch, _, _ = await mesh([app])
    assert await ch.unary_unary("/t.S/Unary")(b"1", timeout=5) == b"app:1"
    port = app.port
    await app.server.stop(0.5)
    app2 = App("app2")
    app2.server = grpc.aio.server()
    app2.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"Unary": grpc.unary_unary_rpc_method_handler(app2.unary)}),))
    assert app2.server.add_insecure_port(f"127.0.0.1:{port}") == port
    await app2.server.start()
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await ch.unary_unary("/t.S/Unary")(b"2", timeout=5) == b"app2:2"
                break
            except grpc.aio.AioRpcError as err:  # at most the call that met the closing connection
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
    finally:
        await app2.server.stop(None)


async def test_fault_delay_then_abort_is_a_local_reply(mesh):
    app = await App().start()
    ch, dp, _ = await mesh([app], fault=FaultPolicy(delay_s=0.2, delay_share=(100, 100), abort_grpc_status=8,
                                                   abort_share=(100, 100)))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary("/t.S/Unary")(b"x", timeout=5)
    assert time.monotonic() - started >= 0.2  # held before the abort
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert any(k == "x-protomesh-reason" for k, _ in info.value.trailing_metadata())
    assert app.hits == 0


async def test_cancel_during_a_fault_delay_finishes_once(mesh):
    app = await App().start()
    ch, dp, lst = await mesh([app], fault=FaultPolicy(delay_s=5.0, delay_share=(100, 100)))
    call = ch.unary_unary("/t.S/Unary")(b"x", timeout=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):
        if dp.finished:
            break
        await asyncio.sleep(0.01)
    assert len(dp.finished) == 1 and app.hits == 0


async def test_unary_mirror(mesh):
    app, shadow = await App("app").start(), await App("shadow").start()
    ch, _, _ = await mesh([app], shadow=shadow.port)
    replies = [await ch.unary_unary("/t.S/Unary")(b"m%d" % i, timeout=5) for i in range(5)]
    assert replies == [b"app:m%d" % i for i in range(5)]
    deadline = time.monotonic() + 5
    while shadow.hits < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert shadow.hits == 5
    await shadow.stop()


async def test_a_reader_that_stops_slows_the_upstream_down(mesh):
    """Backpressure end to end: the caller stops reading a server stream of 1 MiB messages;
    flow control on both connections stops the upstream from producing (nothing piles up in
    the proxy); when the caller reads again every message arrives, in order."""
    produced = []

    class Producer(App):
        async def server_stream(self, request, context):
            for i in range(64):
                produced.append(i)
                yield bytes([i]) * (1 << 20)

    app = await Producer().start()
    ch, _, lst = await mesh([app])
    call = ch.unary_stream("/t.S/Server")(b"", timeout=30)
    assert (await call.read())[0] == 0
    stable, last = 0, -1
    for _ in range(500):  # until production stops (bounded: 5 s)
        await asyncio.sleep(0.01)
        stable = stable + 1 if len(produced) == last else 0
        last = len(produced)
        if stable >= 30:
            break
    assert len(produced) < 40, len(produced)  # windows (ours and grpcio's) hold far less than 64 MiB
    queued = sum(sum(map(len, st.pending or ())) for c in lst._conns for st in c.streams.values())
    assert queued <= 2 << 20  # what the proxy holds is bounded by the window it gave upstream
    got = [1]
    while True:
        m = await call.read()
        if m is grpc.aio.EOF:
            break
        assert m == bytes([got[-1]]) * (1 << 20)
        got.append(got[-1] + 1)
    assert got[-1] == 64 and await call.code() == grpc.StatusCode.OK  # messages 0..63


async def test_many_concurrent_calls_of_every_kind(mesh):
    """Hundreds of calls at once over one downstream and a few upstream connections (grpcio's
    server refuses beyond its stream limit; the pool opens more): all answered right."""
    app = await App().start()
    ch, dp, _ = await mesh([app])

    async def one(i):
        kind = i % 4
        if kind == 0:
            assert await ch.unary_unary("/t.S/Unary")(b"%d" % i, timeout=20) == b"app:%d" % i
        elif kind == 1:
            assert len([m async for m in ch.unary_stream("/t.S/Server")(b"5", timeout=20)]) == 5
        elif kind == 2:
            assert await ch.stream_unary("/t.S/Client")(_repeat(b"x" * i, 3), timeout=20) == b"3/%d" % (3 * i)
        else:
            got = [m async for m in ch.stream_stream("/t.S/Bidi")(_repeat(b"ab%d" % i, 2), timeout=20)]
            assert got == [(b"ab%d" % i)[::-1]] * 2
    await asyncio.gather(*(one(i) for i in range(400)))
    assert len(dp.finished) == 400


async def test_caller_connection_dropped_mid_stream(mesh):
    app = await App().start()
    _, dp, lst = await mesh([app])
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{lst.port}")
    call = ch.unary_stream("/t.S/Hang")(b"", timeout=20)
    assert await call.read() == b"started"
    await ch.close(None)  # the whole connection goes
    await asyncio.wait_for(app.cancelled.wait(), 5)
    for _ in range(200):
        if dp.finished:
            break
        await asyncio.sleep(0.01)
    assert len(dp.finished) == 1


async def test_a_stream_is_never_retried_after_a_message_was_relayed(mesh):
    mid, up = await App("mid", "midstream").start(), await App("up").start()
    ch, _, _ = await mesh([mid, up], RetryPolicy(frozenset({"unavailable"}), 1, base_interval_s=0.001))
    outcomes = []
    for _ in range(2):  # round robin: one of the two calls meets `mid`
        got = []
        try:
            async for m in ch.unary_stream("/t.S/Server")(b"2", timeout=5):
                got.append(m)
            outcomes.append(("ok", got))
        except grpc.aio.AioRpcError as err:
            outcomes.append((err.code(), got))
    assert (grpc.StatusCode.UNAVAILABLE, [b"first"]) in outcomes  # the caller would see it twice
    assert ("ok", [b"up:0", b"up:1"]) in outcomes
    assert mid.hits == 1
