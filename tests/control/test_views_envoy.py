"""Per-client views: what an Envoy sidecar/gateway and a proxyless gRPC client get from one mesh."""
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import struct_pb2

from control.model import load_mesh
from control.registry import Registry, registration_from_node
from control.translate.envoy import listen_overrides
from control.views import Views
from protomesh import envoy, xdstypes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mesh(tmp_path):
    p = tmp_path / "mesh.yaml"
    p.write_text(f"proto_paths: [{REPO / 'proto'}]\nservices:\n"
                 "  users: { protocol: grpc, proto: demo/users/v1/users.proto }\n"
                 "  products: { protocol: http, endpoints: ['127.0.0.1:9000'] }\n"
                 "gateway:\n  http: 127.0.0.1:8080\n  routes:\n"
                 "    - { match: { path_prefix: /v1/products }, to: products }\n")
    return load_mesh(str(p))


def node(node_id, meta, agent=""):
    n = base_pb2.Node(id=node_id, user_agent_name=agent)
    s = struct_pb2.Struct()
    s.update(meta)
    n.metadata.CopyFrom(s)
    return n


def unpack(any_msg, cls):
    m = cls()
    any_msg.Unpack(m)
    return m


def test_envoy_sidecar_gets_inbound_and_outbound_listeners_without_protomesh_extensions(mesh):
    registry = Registry()
    reg = registration_from_node(node("e1", envoy.node_metadata(
        service="users", protocol="grpc", app="127.0.0.1:7001", inbound="127.0.0.1:7002",
        outbound_http="127.0.0.1:7003", outbound_grpc="127.0.0.1:7004"), agent="envoy"))
    assert reg.flavour == "envoy" and reg.advertise == ("127.0.0.1", 7002)
    registry.connect(reg)
    view = Views(mesh, registry).for_node(reg)
    assert set(view[xdstypes.LISTENER]) == {"inbound", "outbound_http", "outbound_grpc"}
    inbound = unpack(view[xdstypes.LISTENER]["inbound"], listener_pb2.Listener)
    assert inbound.address.socket_address.port_value == 7002 and not inbound.metadata.typed_filter_metadata
    assert "inbound|users" in view[xdstypes.CLUSTER] and "inbound|users" in view[xdstypes.ROUTE]
    cla = unpack(view[xdstypes.ENDPOINT]["users"], endpoint_pb2.ClusterLoadAssignment)
    assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 7002


def test_envoy_gateway_listeners_can_move(mesh):
    n = node("gw", envoy.node_metadata(role="gateway", gateway_http="127.0.0.1:9999"), agent="envoy")
    reg = registration_from_node(n)
    view = Views(mesh, Registry()).for_node(reg, listen_overrides(n))
    lst = unpack(view[xdstypes.LISTENER]["gateway_http"], listener_pb2.Listener)
    assert lst.address.socket_address.port_value == 9999


def test_proxyless_client_gets_api_listeners_and_named_weighted_localities(mesh):
    reg = registration_from_node(base_pb2.Node(id="px", user_agent_name="gRPC Python"))
    assert (reg.flavour, reg.role, reg.service) == ("grpc", "client", "")
    registry = Registry()
    registry.connect(registration_from_node(node("u1", {xdstypes.META_SERVICE: "users",
                                                          "protomesh.advertise": "127.0.0.1:7002"})))
    view = Views(mesh, registry).for_node(reg)
    assert set(view[xdstypes.LISTENER]) == {"users"}  # gRPC services only, named like the target
    lst = unpack(view[xdstypes.LISTENER]["users"], listener_pb2.Listener)
    hcm = unpack(lst.api_listener.api_listener, hcm_pb2.HttpConnectionManager)
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "users"
    cla = unpack(view[xdstypes.ENDPOINT]["users"], endpoint_pb2.ClusterLoadAssignment)
    assert cla.endpoints[0].load_balancing_weight.value == 1 and cla.endpoints[0].locality.region
