"""Real Envoy (from .venv-envoy) configured only by our control server, over SotW and over Delta.

One mesh: two users replicas and products behind our sidecars, orders behind an Envoy sidecar,
and two Envoy gateways on mesh.yaml's gateway routes — one speaking SotW ADS, one Delta.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from demo.topology import Topology
from protomesh import envoy
from protomesh.launch import wait_until
from tests.integration.helpers import GrpcClients, http_get

MODES = ("sotw", "delta")
BAD_REGEX_ROUTE = ('    - { name: bad-regex, match: { path_regex: "^/v9/(?=x).*" }, to: products }\n')


@pytest.fixture(scope="module")
def envoy_mesh(tmp_path_factory):
    envoy.binary()  # fails with "run make envoy-venv" when Envoy is not installed
    topo = Topology(tmp_path_factory.mktemp("envoy"))
    try:
        topo.start_control(grace_s=1.0, warmup_s=0)
        for i in (1, 2):
            topo.start_instance("users", f"users-{i}", state_dir=False)
        topo.start_instance("products", "products-1", state_dir=False)
        orders = topo.start_envoy_instance("orders", "orders-1", delta=True)
        gateways = {mode: topo.start_envoy_gateway(f"envoy-gw-{mode}", delta=mode == "delta") for mode in MODES}
        topo.wait_ready()
        for gw in gateways.values():
            wait_until(lambda: len(envoy.endpoints(gw["admin"], "users")) == 2, 20,
                       "the Envoy gateway to hold both users endpoints", proc=gw["proc"])
        wait_until(lambda: len(envoy.endpoints(orders.admin, "users")) == 2, 20,
                   "the orders Envoy to hold both users endpoints", proc=orders.sidecar)
        topo.gateways = gateways
        yield topo
    finally:
        topo.stop_all()


def status(topo) -> dict:
    out = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {n["node"]: n for n in json.loads(out.stdout)}


def served_by(gw: dict, calls: int) -> dict[str, int]:
    clients = GrpcClients(gw["grpc"])
    try:
        seen: dict[str, int] = {}
        for _ in range(calls):
            who = clients.get_user("1").served_by
            seen[who] = seen.get(who, 0) + 1
        return seen
    finally:
        clients.close()


@pytest.mark.parametrize("mode", MODES)
def test_envoy_routes_http_and_grpc_balanced(envoy_mesh, mode):
    gw = envoy_mesh.gateways[mode]
    status_code, headers, body = http_get(gw["http"], "/v1/products/p1")
    assert status_code == 200 and json.loads(body)["id"] == "p1"
    assert headers["x-served-by"] == "products-1"
    seen = served_by(gw, 20)
    assert set(seen) == {"users-1", "users-2"} and min(seen.values()) >= 5, seen
    # CreateOrder: Envoy gateway → orders' Envoy sidecar (inbound) → orders app → the same Envoy
    # (outbound gRPC to users, outbound HTTP to products) → our sidecars.
    clients = GrpcClients(gw["grpc"])
    try:
        order = clients.create_order()
    finally:
        clients.close()
    assert order.user.served_by in ("users-1", "users-2") and order.product_name and order.served_by == "orders-1"
    nodes = status(envoy_mesh)
    assert nodes[f"envoy-gw-{mode}"]["flavour"] == "envoy"
    assert all(t["status"] == "ACKED" for t in nodes[f"envoy-gw-{mode}"]["types"].values())


def test_cluster_change_applies_without_warming_stall(envoy_mesh):
    """A Cluster change makes Envoy warm the cluster until it gets its endpoints again: over SotW
    it re-requests EDS with the same nonce, over Delta it waits; either way the control server
    must answer, or the change sits for the 15 s initial-fetch timeout."""
    topo = envoy_mesh
    started = time.monotonic()
    topo.write_mesh(topo.mesh_yaml().replace("lb: round_robin, timeout: 5s", "lb: least_request, timeout: 5s", 1))
    took = {}
    for mode, gw in topo.gateways.items():
        def applied():
            active, warming = envoy.dynamic_clusters(gw["admin"])
            return active["users"]["cluster"].get("lb_policy") == "LEAST_REQUEST" and "users" not in warming
        wait_until(applied, 12, f"the {mode} Envoy to apply the users cluster change", proc=gw["proc"])
        took[mode] = time.monotonic() - started
    assert max(took.values()) < 8, took  # mesh poll (0.5 s) + debounce + push; the stall is 15 s
    for gw in topo.gateways.values():
        assert set(served_by(gw, 10)) == {"users-1", "users-2"}
    topo.write_mesh(topo.mesh_yaml())


def test_rejected_resource_is_nacked_and_envoy_keeps_serving(envoy_mesh):
    """mesh.yaml validates regexes with Python's `re`, which accepts lookahead; Envoy compiles
    RE2, which refuses it.  A real divergence the control server can express: Envoy NACKs the
    route table, `protomesh status` shows it, and the last good routes keep serving."""
    topo = envoy_mesh
    good = topo.mesh_yaml()
    topo.write_mesh(good.replace("  routes:\n", "  routes:\n" + BAD_REGEX_ROUTE, 1))

    def nacked():
        nodes = status(topo)
        return all(nodes[f"envoy-gw-{m}"]["types"]["RDS"]["status"] == "NACKED" for m in MODES) and nodes
    nodes = wait_until(nacked, 20, "both Envoy gateways to NACK the route table")
    for mode in MODES:
        assert nodes[f"envoy-gw-{mode}"]["types"]["RDS"]["error"]
        gw = topo.gateways[mode]
        assert http_get(gw["http"], "/v1/products/p2")[0] == 200
        assert set(served_by(gw, 6)) == {"users-1", "users-2"}
    table = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr],
                           capture_output=True, text=True, timeout=30).stdout
    assert "NACKED" in table and "envoy-gw-delta" in table
    topo.write_mesh(good)
    wait_until(lambda: all(status(topo)[f"envoy-gw-{m}"]["types"]["RDS"]["status"] == "ACKED" for m in MODES),
               20, "the fixed route table to be ACKed")


def test_removed_endpoint_stops_getting_traffic(envoy_mesh):
    topo = envoy_mesh
    victim = next(i for i in topo.instances if i.replica == "users-2")
    topo.launcher.stop(victim.sidecar)  # its registration expires after the grace (1 s)
    started = time.monotonic()
    for mode, gw in topo.gateways.items():
        wait_until(lambda: len(envoy.endpoints(gw["admin"], "users")) == 1, 15,
                   f"the {mode} Envoy to drop the users-2 endpoint", proc=gw["proc"])
    assert time.monotonic() - started < 10
    for gw in topo.gateways.values():
        assert served_by(gw, 10) == {"users-1": 10}
