"""The sidecar's xDS client: Delta by default against our control server, state of the world
against a server that answers Delta with UNIMPLEMENTED; Delta responses applied all or nothing."""
import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from control.model import load_mesh
from control.registry import Registry
from control.server import ControlPlane
from control.translate import build
from control.views import Views
from protomesh import xdstypes
from sidecar.config.errors import ConfigError
from sidecar.xds.client import XdsClient
from sidecar.xds.store import Store

MESH = ("services:\n  products: { protocol: http, endpoints: ['127.0.0.1:9000'] }\n"
        "gateway:\n  http: 127.0.0.1:8080\n  routes:\n    - { match: { path_prefix: / }, to: products }\n")


class SotwOnly(ControlPlane):
    """A control server from before Delta: grpc answers UNIMPLEMENTED."""

    async def DeltaAggregatedResources(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        yield  # pragma: no cover


def gateway_node() -> base_pb2.Node:
    n = base_pb2.Node(id="gw-test", user_agent_name="protomesh")
    meta = struct_pb2.Struct()
    meta.update({xdstypes.META_ROLE: "gateway", xdstypes.META_FLAVOUR: "protomesh"})
    n.metadata.CopyFrom(meta)
    return n


async def run_client(tmp_path, plane_cls):
    (tmp_path / "mesh.yaml").write_text(MESH)
    registry = Registry()
    plane = plane_cls(Views(load_mesh(str(tmp_path / "mesh.yaml")), registry), registry, debounce_s=0.01)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(plane, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    configs = []
    client = XdsClient(gateway_node(), [f"127.0.0.1:{port}"], configs.append)
    task = asyncio.ensure_future(client.run())
    try:
        for _ in range(200):  # bounded: 10 s
            if configs and configs[-1].route_tables and configs[-1].assignments:
                break
            await asyncio.sleep(0.05)
        return client, configs, plane.status()
    finally:
        client.stop()
        await asyncio.wait_for(task, 10)
        await server.stop(None)


def test_delta_is_the_default(tmp_path):
    client, configs, nodes = asyncio.run(run_client(tmp_path, ControlPlane))
    assert client.active_api == "delta" and nodes[0]["api"] == "delta"
    cfg = configs[-1]
    assert set(cfg.listeners) == {"gateway_http"} and "products" in cfg.assignments
    assert all(not t["pending"] and t["acked"] == t["sent"] for t in nodes[0]["types"].values())


def test_falls_back_to_state_of_the_world(tmp_path):
    client, configs, nodes = asyncio.run(run_client(tmp_path, SotwOnly))
    assert client.active_api == "sotw" and client.sotw_only and nodes[0]["api"] == "sotw"
    assert "products" in configs[-1].assignments


def resource(name, cluster):
    return discovery_pb2.Resource(name=name, version="v-" + name, resource=build.pack(cluster))


def test_delta_apply_adds_removes_and_is_all_or_nothing():
    store = Store()
    store.apply_delta(xdstypes.CLUSTER, "", [resource("a", build.cluster("a", "round_robin", False, 1.0)),
                                             resource("b", build.cluster("b", "round_robin", True, 1.0))], [])
    assert set(store.types[xdstypes.CLUSTER].parsed) == {"a", "b"}
    version = store.types[xdstypes.CLUSTER].version
    store.apply_delta(xdstypes.CLUSTER, "", [], ["a"])
    assert set(store.types[xdstypes.CLUSTER].parsed) == {"b"} and store.types[xdstypes.CLUSTER].version != version
    bad = build.cluster("c", "round_robin", False, 1.0)
    bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED  # a policy our sidecar cannot honour
    with pytest.raises(ConfigError):
        store.apply_delta(xdstypes.CLUSTER, "", [resource("c", bad), resource("b", build.cluster("b", "random", False, 1.0))], [])
    assert set(store.types[xdstypes.CLUSTER].parsed) == {"b"}
    assert store.types[xdstypes.CLUSTER].parsed["b"].lb_policy == "round_robin"  # nothing applied
