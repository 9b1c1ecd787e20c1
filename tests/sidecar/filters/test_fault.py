"""Fault injection: the pure decisions (tables, header triggers, caps), the xDS round trip from
mesh.yaml's shape, and injected rates through real HTTP and gRPC listeners (statistical)."""
from __future__ import annotations

import asyncio
import math
import random
import time

import grpc
import pytest

from control.model import FaultSpec, Traffic
from control.translate import build
from sidecar.call import Call
from sidecar.config.errors import ConfigError
from sidecar.config.model import (Cluster, Endpoint, Listener, PathMatch, Route, RouteTable,
                                  RuntimeConfig, VirtualHost, WeightedCluster)
from sidecar.config.parse import parse_route
from sidecar.dataplane import Dataplane
from sidecar.filters import fault
from sidecar.filters.fault import FaultPolicy, Hold, abort_for, delay_for, inject
from sidecar.listeners.grpc import GrpcListener
from sidecar.listeners.http import HttpListener
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.http_pool import HttpPool

ALWAYS = (100, 100)


@pytest.mark.parametrize("policy, headers, delay", [
    (FaultPolicy(delay_s=0.2, delay_share=ALWAYS), {}, 0.2),
    (FaultPolicy(delay_s=0.2, delay_share=(0, 100)), {}, 0.0),
    (FaultPolicy(header_delay=True, delay_share=ALWAYS), {}, 0.0),  # no header: no delay
    (FaultPolicy(header_delay=True, delay_share=ALWAYS), {fault.DELAY_HEADER: "150"}, 0.15),
    (FaultPolicy(header_delay=True, delay_share=ALWAYS), {fault.DELAY_HEADER: "abc"}, 0.0),
    (FaultPolicy(header_delay=True, delay_share=ALWAYS),
     {fault.DELAY_HEADER: "150", fault.DELAY_PERCENT_HEADER: "0"}, 0.0),
    (FaultPolicy(header_delay=True, delay_share=(0, 100)), {fault.DELAY_HEADER: "150",
                                                            fault.DELAY_PERCENT_HEADER: "100"}, 0.0),  # capped
])
def test_delay_decisions(policy, headers, delay):
    assert delay_for(policy, headers, lambda: 0.5) == pytest.approx(delay)


@pytest.mark.parametrize("policy, headers, grpc_call, expected", [
    (FaultPolicy(abort_status=503, abort_share=ALWAYS), {}, False, (503, 14)),
    (FaultPolicy(abort_status=404, abort_share=ALWAYS), {}, True, (404, 12)),
    (FaultPolicy(abort_grpc_status=8, abort_share=ALWAYS), {}, True, (429, 8)),
    (FaultPolicy(abort_status=503, abort_share=(0, 100)), {}, False, None),
    (FaultPolicy(header_abort=True, abort_share=ALWAYS), {}, False, None),
    (FaultPolicy(header_abort=True, abort_share=ALWAYS), {fault.ABORT_HEADER: "418"}, False, (418, 2)),
    (FaultPolicy(header_abort=True, abort_share=ALWAYS), {fault.ABORT_GRPC_HEADER: "14"}, True, (503, 14)),
    (FaultPolicy(header_abort=True, abort_share=ALWAYS), {fault.ABORT_HEADER: "99"}, False, None),
    (FaultPolicy(header_abort=True, abort_share=ALWAYS),
     {fault.ABORT_HEADER: "503", fault.ABORT_PERCENT_HEADER: "0"}, False, None),
])
def test_abort_decisions(policy, headers, grpc_call, expected):
    reply = abort_for(policy, headers, grpc_call, lambda: 0.5)
    if expected is None:
        assert reply is None
    else:
        assert (reply.status, reply.grpc_status, reply.reason) == (*expected, "fault_abort")


def test_delay_then_abort_across_two_routing_passes():
    p = FaultPolicy(delay_s=0.1, delay_share=ALWAYS, abort_status=503, abort_share=ALWAYS)
    call = Call("http", "GET", "h", "/", {}, "1.2.3.4:5", "l")
    assert inject(p, call, random.random) == Hold(0.1)
    assert inject(p, call, random.random).reason == "fault_abort"  # decided after the delay
    assert inject(p, call, random.random) is None


@pytest.mark.parametrize("percent", [5.0, 30.0, 90.0])
def test_injected_rate_within_binomial_tolerance(percent):
    rng = random.Random(int(percent * 7))
    p = fault.parse(build.pack(build.fault_config(FaultSpec(abort_status=503, abort_percent=percent))), "f")
    n = 20000
    hits = sum(abort_for(p, {}, False, rng.random) is not None for _ in range(n))
    share = percent / 100
    assert abs(hits - n * share) <= 5 * math.sqrt(n * share * (1 - share))


def test_mesh_fault_round_trips_and_unknown_fields_are_refused():
    route = build.apply_traffic_route(build.route("r", prefix="/", split=(("c", 1),), timeout_s=5.0),
                                      Traffic(fault=FaultSpec(delay_s=0.25, delay_percent=12.5,
                                                              header_abort=True, abort_percent=50)), True)
    parsed = parse_route(route, "r").fault
    assert parsed == FaultPolicy(delay_s=0.25, delay_share=(125000, 1000000), header_abort=True,
                                 abort_share=(500000, 1000000))
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    cfg = fault_pb2.HTTPFault()
    route.typed_per_filter_config[fault.FILTER_NAME].Unpack(cfg)
    cfg.max_active_faults.value = 3
    route.typed_per_filter_config[fault.FILTER_NAME].Pack(cfg)
    with pytest.raises(ConfigError) as info:
        parse_route(route, "r")
    assert info.value.where.endswith("typed_per_filter_config[envoy.filters.http.fault].max_active_faults")


def test_mesh_yaml_fault_validation(tmp_path):
    from control.errors import MeshError
    from control.model import load_mesh
    p = tmp_path / "mesh.yaml"
    p.write_text("services:\n  a: { protocol: http, fault: { abort: { status: 503, percent: 150 } } }\n")
    with pytest.raises(MeshError) as info:
        load_mesh(p)
    assert "services.a.fault.abort.percent" in str(info.value)
    p.write_text("services:\n  a: { protocol: http, fault: { delay: { fixed: 50ms, percent: 10 }, "
                 "abort: { header: true } } }\n")
    f = load_mesh(p).services["a"].traffic.fault
    assert (f.delay_s, f.delay_percent, f.header_abort) == (0.05, 10.0, True)


# ---- through real listeners -----------------------------------------------------------------
async def _upstream():
    hits = []

    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                hits.append(time.monotonic())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], hits


def _config(port: int, policy: FaultPolicy, protocol="http", timeout_s=5.0) -> RuntimeConfig:
    route = Route("faulty", PathMatch("prefix", "/"), clusters=(WeightedCluster("c", 1),), timeout_s=timeout_s,
                  fault=policy)
    return RuntimeConfig(
        listeners={"out": Listener("out", "127.0.0.1", 0, protocol, "outbound", "rt")},
        route_tables={"rt": RouteTable("rt", (VirtualHost("vh", ("*",), (route,)),))},
        clusters={"c": Cluster("c", "round_robin", protocol == "grpc", 1.0, False, (Endpoint("127.0.0.1", port),))})


async def _get(port: int, headers: str = "") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /x HTTP/1.1\r\nhost: c\r\n{headers}connection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head = data.partition(b"\r\n\r\n")[0].decode().lower()
    reason = next((l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.startswith("x-protomesh-reason")), "")
    return int(head.split()[1]), reason


async def test_http_abort_rate_and_reason_through_the_listener():
    server, port, hits = await _upstream()
    dp = Dataplane("t")
    dp.swap(_config(port, FaultPolicy(abort_status=503, abort_share=(30, 100))))
    lst = HttpListener("out", dp, HttpPool())
    await lst.start("127.0.0.1", 0)
    try:
        n, results = 400, []
        for _ in range(n // 40):  # 40 at a time: loopback backlogs stay out of the picture
            results += await asyncio.gather(*(_get(lst.port) for _ in range(40)))
        aborted = [r for r in results if r[0] == 503]
        assert all(reason.startswith("fault_abort") for _, reason in aborted)
        assert len(aborted) + len(hits) == n and all(s == 200 for s, _ in results if s != 503)
        assert abs(len(aborted) - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)
    finally:
        lst.close()
        server.close()


async def test_http_delay_holds_the_request_and_header_triggers_work():
    server, port, hits = await _upstream()
    dp = Dataplane("t")
    dp.swap(_config(port, FaultPolicy(header_delay=True, delay_share=ALWAYS, header_abort=True,
                                      abort_share=ALWAYS), timeout_s=0.2))
    lst = HttpListener("out", dp, HttpPool())
    await lst.start("127.0.0.1", 0)
    try:
        t0 = time.monotonic()
        assert await _get(lst.port) == (200, "")
        assert time.monotonic() - t0 < 0.15
        t0 = time.monotonic()
        # A 300 ms delay on a 200 ms route timeout still succeeds: the hold is before the router.
        assert await _get(lst.port, f"{fault.DELAY_HEADER}: 300\r\n") == (200, "")
        assert time.monotonic() - t0 >= 0.3 and hits[-1] - t0 >= 0.3
        status, reason = await _get(lst.port, f"{fault.ABORT_HEADER}: 429\r\n")
        assert status == 429 and reason.startswith("fault_abort")
        assert len(hits) == 2
    finally:
        lst.close()
        server.close()


async def test_grpc_abort_and_delay():
    async def echo(request, context):
        return request
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(echo)}),))
    up = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dp = Dataplane("t")
    dp.swap(_config(up, FaultPolicy(delay_s=0.2, delay_share=ALWAYS, abort_grpc_status=8, abort_share=(50, 100)),
                    protocol="grpc"))
    lst = GrpcListener("out", dp, GrpcPool())
    await lst.start("127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{lst.port}")
    try:
        m = ch.unary_unary("/t.S/M")
        codes = []
        t0 = time.monotonic()

        async def one():
            try:
                await m(b"hi", timeout=5)
                codes.append(0)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code().value[0])
                assert dict(err.trailing_metadata()).get("x-protomesh-reason", "").startswith("fault_abort")
        await asyncio.gather(*(one() for _ in range(60)))
        assert time.monotonic() - t0 >= 0.2  # every call was held first
        assert set(codes) <= {0, 8} and 10 <= codes.count(8) <= 50
    finally:
        await ch.close()
        await lst.close()
        await server.stop(None)
