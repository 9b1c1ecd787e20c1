"""The control server's xDS surface on both engines (our HTTP/2 gRPC server, the default, and
grpc.aio), spoken to by a real grpcio client on loopback: the same answers either way."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import struct_pb2

from control.app import ControlOptions, ControlServer
from protomesh import xdstypes
from sidecar.h2.connection import H2Connection, IgnoreStream
from sidecar.h2.grpcwire import frame_message
from tests.waiting import until

WAIT = 10.0
MESH = """
services:
  products: { protocol: http, endpoints: ["127.0.0.1:9"] }
"""


def node(node_id: str = "products-1") -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="products", user_agent_name="protomesh")
    meta = struct_pb2.Struct()
    meta.update({xdstypes.META_ROLE: "sidecar", xdstypes.META_FLAVOUR: "protomesh",
                 xdstypes.META_SERVICE: "products", xdstypes.META_PROTOCOL: "http",
                 "protomesh.advertise": "127.0.0.1:20001"})
    n.metadata.CopyFrom(meta)
    return n


@pytest.fixture(params=("h2", "grpcio"))
async def control(request, tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    server = ControlServer(ControlOptions(mesh=str(mesh), xds="127.0.0.1:0", admin="127.0.0.1:0",
                                          xds_engine=request.param))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}")
    yield server, channel
    await channel.close()
    await server.stop()


async def test_sotw_stream_gets_clusters_and_its_end_forgets_the_stream(control):
    server, channel = control
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    await call.write(discovery_pb2.DiscoveryRequest(node=node(), type_url=xdstypes.CLUSTER))
    resp = await asyncio.wait_for(call.read(), WAIT)
    assert resp.type_url == xdstypes.CLUSTER and resp.version_info and resp.nonce
    assert any(True for _ in resp.resources)
    assert server.plane.status()[0]["node"] == "products-1"
    call.cancel()
    await until(lambda: not server.plane.streams, "the stream to be forgotten")


async def test_first_request_without_a_node_is_refused_with_why(control):
    _, channel = control
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    await call.write(discovery_pb2.DiscoveryRequest(type_url=xdstypes.CLUSTER))
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry node.id" in await call.details()


async def test_delta_stream_gets_clusters(control):
    _, channel = control
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
    await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node(), type_url=xdstypes.CLUSTER))
    resp = await asyncio.wait_for(call.read(), WAIT)
    assert resp.type_url == xdstypes.CLUSTER and resp.nonce and len(resp.resources) > 0
    call.cancel()


async def test_csds_fetch_and_stream_list_the_connected_node(control):
    _, channel = control
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    await ads.write(discovery_pb2.DiscoveryRequest(node=node(), type_url=xdstypes.CLUSTER))
    await asyncio.wait_for(ads.read(), WAIT)
    csds = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
    fetched = await asyncio.wait_for(csds.FetchClientStatus(csds_pb2.ClientStatusRequest()), WAIT)
    assert [c.node.id for c in fetched.config] == ["products-1"]
    stream = csds.StreamClientStatus()
    await stream.write(csds_pb2.ClientStatusRequest())
    streamed = await asyncio.wait_for(stream.read(), WAIT)
    assert [c.node.id for c in streamed.config] == ["products-1"]
    await stream.done_writing()
    assert await asyncio.wait_for(stream.code(), WAIT) == grpc.StatusCode.OK
    ads.cancel()


async def test_bytes_that_are_not_a_request_end_the_stream_and_the_server_keeps_serving(control):
    server, channel = control
    raw = channel.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
    call = raw()
    await call.write(b"\xff\xff\xff")
    code = await asyncio.wait_for(call.code(), WAIT)
    if server.opts.xds_engine == "h2":  # (grpc.aio answers INTERNAL without naming the message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid DiscoveryRequest" in await call.details()
    else:
        assert code != grpc.StatusCode.OK
    await until(lambda: not server.plane.streams, "the stream to be forgotten")
    await test_sotw_stream_gets_clusters_and_its_end_forgets_the_stream((server, channel))


async def test_a_sidecar_that_stops_answering_keepalive_pings_loses_its_stream(tmp_path):
    """(The h2 engine: the grpc.aio one has no keepalive, see control/app.py.)"""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    server = ControlServer(ControlOptions(mesh=str(mesh), xds="127.0.0.1:0", admin="127.0.0.1:0",
                                          keepalive_s=0.05, keepalive_timeout_s=0.1))
    await server.start()
    try:
        _, client = await asyncio.get_running_loop().create_connection(
            lambda: H2Connection(client=True), "127.0.0.1", server.xds_port)
        st = client.open_stream(IgnoreStream)
        client.send_headers(st, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"control"),
                                 (b":path", b"/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                                            b"StreamAggregatedResources"),
                                 (b"content-type", b"application/grpc"), (b"te", b"trailers")])
        client.send_data(st, frame_message(discovery_pb2.DiscoveryRequest(
            node=node(), type_url=xdstypes.CLUSTER).SerializeToString()))
        await until(lambda: [n["node"] for n in server.plane.status()] == ["products-1"], "the node to register")
        client.transport.pause_reading()  # its host vanished: no FIN, no PING ACK
        await until(lambda: not server.plane.streams, "the stream to end")
        client.close()
    finally:
        await server.stop()
