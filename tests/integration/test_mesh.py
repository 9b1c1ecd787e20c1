"""The mesh end to end, real processes: traffic both ways, balancing, tracing across hops."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import grpc

from demo.topology import admin_json
from demo.users.v1 import users_pb2
from tests.integration.helpers import GrpcClients, http_get, http_json


def test_grpc_through_gateway_is_balanced_across_two_replicas(mesh):
    clients = GrpcClients(mesh.gateway_grpc)
    try:
        served = Counter(clients.get_user(str(i % 5 + 1)).served_by for i in range(40))
    finally:
        clients.close()
    assert set(served) == {"users-1", "users-2"}
    assert abs(served["users-1"] - served["users-2"]) <= 2  # round robin


def test_all_four_grpc_call_kinds_cross_the_mesh(mesh):
    clients = GrpcClients(mesh.gateway_grpc)
    try:
        streamed = list(clients.users.ListUsers(users_pb2.ListUsersRequest(page_size=3), timeout=5))
        assert len(streamed) == 3
        summary = clients.users.CreateUsers(iter([users_pb2.CreateUserRequest(name="a", email="a@x"),
                                                  users_pb2.CreateUserRequest(name="b", email="b@x")]), timeout=5)
        assert summary.created_count == 2
        replies = list(clients.users.Chat(iter([users_pb2.ChatRequest(text=t) for t in ("x", "y", "z")]), timeout=5))
        assert [r.seq for r in replies] == [1, 2, 3] or len(replies) == 3
        # metadata in, trailing metadata and status out, unchanged by the mesh
        user, call = clients.users.GetUser.with_call(users_pb2.GetUserRequest(id="3"),
                                                      metadata=(("x-custom", "kept"),), timeout=5)
        assert dict(call.trailing_metadata())["x-served-by"] in ("users-1", "users-2")
        try:
            clients.get_user("does-not-exist")
            raise AssertionError("expected NOT_FOUND")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert "does-not-exist" in err.details()
    finally:
        clients.close()


def test_service_to_service_grpc_and_http_through_sidecars(mesh):
    clients = GrpcClients(mesh.gateway_grpc)
    try:
        orders = [clients.create_order() for _ in range(10)]
    finally:
        clients.close()
    assert all(o.product_name and o.user.id == "2" and o.total_cents == 2 * o.unit_price_cents for o in orders)
    assert {o.user.served_by for o in orders} == {"users-1", "users-2"}  # orders' sidecar balances too
    orders_sidecar = next(i for i in mesh.instances if i.service == "orders")
    clusters = admin_json(orders_sidecar.admin, "/clusters")["clusters"]
    assert sum(ep["served"] for ep in clusters["products"]["endpoints"]) >= 10  # HTTP hop via sidecar
    assert sum(ep["served"] for ep in clusters["users"]["endpoints"]) >= 10  # gRPC hop via sidecar


def test_http_through_gateway_and_local_replies_have_reasons(mesh):
    status, headers, body = http_json(mesh.gateway_http, "/v1/products/p2")
    assert status == 200 and body["id"] == "p2" and headers["x-served-by"] == "products-1"
    status, headers, body = http_json(mesh.gateway_http, "/nowhere")
    assert status == 404
    assert headers["x-protomesh-reason"].startswith("no_route")
    assert body["error"] == "no_route"


def test_admin_endpoints(mesh):
    inst = mesh.instances[0]
    dump = admin_json(inst.admin, "/config_dump")
    assert set(dump["config"]["listeners"]) == {"inbound", "outbound_http", "outbound_grpc"}
    assert all(dump["xds"]["types"][t]["version"] for t in ("CDS", "EDS", "LDS", "RDS"))
    status, _, body = http_get(inst.admin, "/metrics")
    assert status == 200 and b"protomesh_config_updates_total" in body
    status, _, _ = http_get(inst.admin, "/healthz")
    assert status == 200
    nodes = admin_json(mesh.control_admin, "/nodes")
    assert {n["node"] for n in nodes} >= {"gateway", "users-1-sidecar", "users-2-sidecar", "orders-1-sidecar"}


def test_protomesh_status_lists_every_node_acked(mesh):
    out = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", mesh.control_addr, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    nodes = {n["node"]: n for n in json.loads(out.stdout)}
    assert {"gateway", "users-1-sidecar", "users-2-sidecar", "orders-1-sidecar", "products-1-sidecar"} <= set(nodes)
    for node in nodes.values():
        assert {t: v["status"] for t, v in node["types"].items()} == {t: "ACKED" for t in ("CDS", "EDS", "LDS", "RDS")}
    table = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", mesh.control_addr],
                           capture_output=True, text=True, timeout=30).stdout
    assert "users-1-sidecar" in table and "ACKED" in table


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_one_trace_spans_gateway_orders_users(mesh, collector):
    clients = GrpcClients(mesh.gateway_grpc)
    try:
        clients.create_order(metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),))
    finally:
        clients.close()

    def complete(spans):
        services = {s["service"] for s in spans if s["trace_id"] == TRACE_ID}
        return {"sidecar.gateway", "sidecar.orders", "orders", "sidecar.users", "users",
                "sidecar.products", "products"} <= services

    spans = [s for s in collector.wait_for(complete, timeout=30) if s["trace_id"] == TRACE_ID]
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_span_id"] not in by_id]
    assert [r["parent_span_id"] for r in roots] == [PARENT]  # everything hangs off the caller's span
    root = roots[0]
    assert root["service"] == "sidecar.gateway" and root["kind"] == "SERVER"
    assert root["attributes"]["rpc.system"] == "grpc"
    assert root["attributes"]["rpc.service"] == "demo.orders.v1.Orders"
    assert root["attributes"]["rpc.method"] == "CreateOrder"

    def ancestry(span):
        chain = []
        while span is not None:
            chain.append(span["service"])
            span = by_id.get(span["parent_span_id"])
        return list(reversed(chain))

    users_app = next(s for s in spans if s["service"] == "users" and s["kind"] == "SERVER")
    chain = ancestry(users_app)
    # gateway → orders sidecar (inbound) → orders app → orders sidecar (outbound) → users sidecar → users
    compact = [c for i, c in enumerate(chain) if i == 0 or chain[i - 1] != c]
    assert compact == ["sidecar.gateway", "sidecar.orders", "orders", "sidecar.orders", "sidecar.users", "users"]
    client_spans = [s for s in spans if s["service"].startswith("sidecar.") and s["kind"] == "CLIENT"]
    assert all("server.address" in s["attributes"] for s in client_spans)
    products_hop = next(s for s in spans if s["service"] == "sidecar.products" and s["kind"] == "SERVER")
    assert products_hop["attributes"]["http.request.method"] == "GET"
    assert products_hop["attributes"]["http.response.status_code"] == 200
