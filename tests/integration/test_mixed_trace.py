"""A mixed mesh still makes one trace: our gateway, orders behind a real Envoy, users called proxyless.

    test client (traceparent) → our gateway (sidecar.gateway)
      → the orders Envoy, inbound (envoy.orders; Envoy's OpenTelemetry tracer, configured only by
        our control server from mesh.yaml `telemetry`)
        → orders app
          → users, proxyless: grpcio's xDS resolver in the orders process dials `xds:///users`,
            bootstrapped against our control server; no proxy on the client side
            → users' inbound sidecar (sidecar.users) → users app
          → products over the orders Envoy's outbound HTTP listener → sidecar.products → products

Every process is real and on 127.0.0.1; spans land in a real OTLP/gRPC receiver.
"""
from __future__ import annotations

import json

import pytest

from demo.topology import Topology, admin_json
from protomesh import envoy
from protomesh.launch import wait_until
from tests.integration.helpers import GrpcClients
from tests.integration.test_proxyless import bootstrap

TRACE_ID = "6e0c63257de34c92bf9efcd03927272e"
CALLER = "a3ce929d0e0e4736"
PROXYLESS_NODE = "orders-1-proxyless"
# Services whose spans the trace must hold.  `envoy.orders` is the name the control server gives
# the orders Envoy's tracer (`control/translate/envoy.py`: build.tracing(..., f"envoy.{service}")).
REQUIRED = {"sidecar.gateway", "envoy.orders", "orders", "sidecar.users", "users", "sidecar.products", "products"}


@pytest.fixture
def mixed_mesh(tmp_path, collector):
    envoy.binary()  # fails with "run make envoy-venv" when Envoy is not installed
    topo = Topology(tmp_path, otlp=collector.endpoint)
    try:
        topo.start_control(grace_s=1.0, warmup_s=0)
        for i in (1, 2):
            topo.start_instance("users", f"users-{i}", state_dir=False)
        topo.start_instance("products", "products-1", state_dir=False)
        orders = topo.start_envoy_instance(
            "orders", "orders-1", users="xds:///users",
            app_env={"GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap(topo.control_addr, PROXYLESS_NODE)})
        topo.start_gateway()
        topo.wait_ready()
        topo.wait_endpoints(topo.gateway_admin, "orders", 1)
        wait_until(lambda: envoy.endpoints(orders.admin, "products"), 20,
                   "the orders Envoy to hold the products endpoint", proc=orders.sidecar)
        topo.orders = orders
        yield topo
    finally:
        topo.stop_all()


def envoy_counter(admin_port: int, name: str) -> int:
    """One counter from Envoy's admin /stats (0 when Envoy has not created it)."""
    data = json.loads(envoy.admin_get(admin_port, f"/stats?format=json&filter=^{name}$"))
    return sum(int(s.get("value", 0)) for s in data.get("stats", []) if s.get("name") == name)


def describe(spans: list[dict]) -> str:
    return "\n".join(f"  {s['service']:<18} {s['kind']:<8} {s['name']:<40} {s['span_id']} <- {s['parent_span_id']}"
                     for s in sorted(spans, key=lambda s: s["start_ns"]))


def test_one_trace_spans_gateway_envoy_and_proxyless_hops(mixed_mesh, collector):
    topo = mixed_mesh
    clients = GrpcClients(topo.gateway_grpc)
    try:
        # The first call also makes the orders process resolve xds:///users (LDS, CDS, EDS from
        # our control server); retry until the whole path answers, within a bound.
        wait_until(lambda: clients.create_order(timeout=5) is not None, 20, "a first CreateOrder through the mixed mesh",
                   interval_s=0.2, proc=topo.orders.app)
        order = clients.create_order(metadata=(("traceparent", f"00-{TRACE_ID}-{CALLER}-01"),))
    finally:
        clients.close()
    assert order.served_by == "orders-1" and order.user.id == "2" and order.product_name
    assert order.user.served_by in ("users-1", "users-2")

    # The users hop really was proxyless: the orders process is a grpc xDS client of our control
    # server, and the orders Envoy sent nothing to users (products did go through it).
    nodes = {n["node"]: n for n in admin_json(topo.control_admin, "/nodes")}
    assert PROXYLESS_NODE in nodes, sorted(nodes)
    assert (nodes[PROXYLESS_NODE]["flavour"], nodes[PROXYLESS_NODE]["role"]) == ("grpc", "client")
    assert envoy_counter(topo.orders.admin, "cluster.users.upstream_rq_total") == 0
    assert envoy_counter(topo.orders.admin, "cluster.products.upstream_rq_total") >= 2

    def in_trace(spans):
        return [s for s in spans if s["trace_id"] == TRACE_ID]

    def whole(spans):
        mine = in_trace(spans)
        ids = {s["span_id"] for s in mine}
        return REQUIRED <= {s["service"] for s in mine} and sum(s["parent_span_id"] not in ids for s in mine) == 1

    try:
        spans = in_trace(collector.wait_for(whole, timeout=20))
    except TimeoutError as exc:
        pytest.fail(f"no whole trace {TRACE_ID} with spans from {sorted(REQUIRED)}: {exc}\n"
                    f"{describe(in_trace(collector.collector.spans()))}")
    by_id = {s["span_id"]: s for s in spans}
    shown = describe(spans)

    # Everything hangs off the caller's span; our gateway made the root.
    roots = [s for s in spans if s["parent_span_id"] not in by_id]
    assert [r["parent_span_id"] for r in roots] == [CALLER], shown
    root = roots[0]
    assert (root["service"], root["kind"]) == ("sidecar.gateway", "SERVER"), shown
    assert root["attributes"]["rpc.service"] == "demo.orders.v1.Orders"
    assert root["attributes"]["rpc.method"] == "CreateOrder"
    assert "sidecar.orders" not in {s["service"] for s in spans}, shown  # orders has no sidecar of ours

    def ancestry(span):
        chain = []
        while span is not None:
            chain.append(span)
            span = by_id.get(span["parent_span_id"])
        return list(reversed(chain))

    def compact(chain):
        names = [s["service"] for s in chain]
        return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]

    users_app = next(s for s in spans if s["service"] == "users" and s["kind"] == "SERVER")
    chain = ancestry(users_app)
    assert chain[0] is root, shown
    # The users app descends from the Envoy span, and between orders and users' sidecar there is
    # no proxy at all: the users sidecar's SERVER span is the child of the orders app's own span.
    assert compact(chain) == ["sidecar.gateway", "envoy.orders", "orders", "sidecar.users", "users"], shown
    envoy_span = next(s for s in chain if s["service"] == "envoy.orders")
    assert envoy_span["kind"] == "SERVER", shown  # Envoy's inbound listener: an ingress span
    assert by_id[envoy_span["parent_span_id"]]["service"] == "sidecar.gateway", shown
    users_hop = next(s for s in chain if s["service"] == "sidecar.users")
    assert users_hop["kind"] == "SERVER", shown
    caller = by_id[users_hop["parent_span_id"]]
    assert (caller["service"], caller["kind"]) == ("orders", "CLIENT"), shown

    products_app = next(s for s in spans if s["service"] == "products" and s["kind"] == "SERVER")
    chain = ancestry(products_app)
    assert compact(chain) == [
        "sidecar.gateway", "envoy.orders", "orders", "envoy.orders", "sidecar.products", "products"], shown
    egress = [s for s in chain if s["service"] == "envoy.orders"][-1]
    assert egress["kind"] == "CLIENT", shown  # Envoy's outbound HTTP listener: an egress span
