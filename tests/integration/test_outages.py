"""Failures around the mesh: the control server goes away and comes back; upstreams die;
broken config at start.  Each has a defined outcome and the sidecars keep serving."""
from __future__ import annotations

import subprocess
import sys

import grpc

from demo.topology import admin_json
from protomesh.launch import http_ok, wait_until
from tests.integration.helpers import GrpcClients, http_get


def test_sidecars_survive_a_control_server_restart(fresh_mesh):
    topo = fresh_mesh
    topo.start_all(users_replicas=2)
    topo.launcher.stop(topo.control)
    clients = GrpcClients(topo.gateway_grpc)
    try:
        # Control plane down: the data plane keeps serving on its last config...
        assert {clients.get_user(str(i % 5 + 1)).served_by for i in range(10)} == {"users-1", "users-2"}
        assert http_get(topo.gateway_http, "/v1/products/p1")[0] == 200
        # ...and a gateway restarted meanwhile serves from its persisted config.
        topo.launcher.stop(topo.gateway)
        topo.start_gateway()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{topo.gateway_admin}/ready"), 20,
                   "the restarted gateway to be ready from its persisted config", proc=topo.gateway)
        clients.close()
        clients = GrpcClients(topo.gateway_grpc)
        assert clients.create_order().user.id == "2"
        # Control back on the same address: every node resubscribes and registers again.
        topo.start_control()
        names = {"gateway", "users-1-sidecar", "users-2-sidecar", "orders-1-sidecar", "products-1-sidecar"}
        wait_until(lambda: names <= {n["node"] for n in admin_json(topo.control_admin, "/nodes")}, 30,
                   "every sidecar to reconnect")
        wait_until(lambda: all(t["acked"] for n in admin_json(topo.control_admin, "/nodes")
                               for t in n["types"].values()), 30, "every node to ACK the new server's config")
        topo.wait_endpoints(topo.gateway_admin, "users", 2)
        assert {clients.get_user(str(i % 5 + 1)).served_by for i in range(10)} == {"users-1", "users-2"}
    finally:
        clients.close()


def test_dead_upstream_gets_a_reasoned_error_and_the_sidecar_keeps_serving(fresh_mesh):
    topo = fresh_mesh
    topo.start_all(users_replicas=1)
    users = next(i for i in topo.instances if i.service == "users")
    products = next(i for i in topo.instances if i.service == "products")
    topo.launcher.stop(users.app)
    topo.launcher.stop(products.app)
    clients = GrpcClients(topo.gateway_grpc)
    try:
        try:
            clients.get_user("1")
            raise AssertionError("expected UNAVAILABLE")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            reasons = [v for k, v in err.trailing_metadata() if k == "x-protomesh-reason"]
            assert reasons and reasons[0].startswith("upstream_unavailable")
            assert "inbound|users" in err.details()
    finally:
        clients.close()
    status, headers, body = http_get(topo.gateway_http, "/v1/products/p1")
    assert status == 503 and headers["x-protomesh-reason"].startswith("upstream_unavailable")
    assert b"upstream_unavailable" in body
    # Still serving: a local route answer and admin stay up.
    assert http_get(topo.gateway_http, "/elsewhere")[0] == 404
    assert http_ok(f"http://127.0.0.1:{users.admin}/healthz")
    log = (topo.workdir / "logs" / "users-1-sidecar.access.jsonl")
    wait_until(lambda: "upstream_unavailable" in log.read_text(), 10, "the access log to record the reason")


def _control(tmp_path, text):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(text)
    return subprocess.run([sys.executable, "-m", "protomesh", "control", "--mesh", str(mesh),
                           "--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30)


def test_malformed_mesh_yaml_fails_at_start_with_a_clear_error(tmp_path):
    out = _control(tmp_path, "services:\n  users: { protocol: grpc\n")
    assert out.returncode == 2
    assert "mesh.yaml:" in out.stderr and "YAML syntax error" in out.stderr
    assert "Traceback" not in out.stderr


def test_route_to_unknown_service_is_rejected_at_load(tmp_path):
    out = _control(tmp_path, "services:\n  products: { protocol: http }\ngateway:\n  http: 127.0.0.1:1\n"
                             "  routes:\n    - { match: { path_prefix: /x }, to: nosuch }\n")
    assert out.returncode == 2
    assert "gateway.routes[0].to: unknown service 'nosuch'" in out.stderr
    assert "fix: use one of: products" in out.stderr


def test_gateway_with_two_workers_shares_its_listeners(fresh_mesh):
    topo = fresh_mesh
    topo.start_control()
    topo.start_instance("products", "products-1")
    topo.gateway = topo.launcher.start("gateway", [
        "sidecar", "--gateway", "--control", topo.control_addr, "--admin", f"127.0.0.1:{topo.gateway_admin}",
        "--node-id", "gateway", "--workers", "2", "--access-log", "off"])
    topo.wait_ready()
    for k in range(2):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{topo.gateway_admin + k}/ready"), 20,
                   f"gateway worker {k} to be ready", proc=topo.gateway)
    nodes = {n["node"] for n in admin_json(topo.control_admin, "/nodes")}
    assert {"gateway~w0", "gateway~w1"} <= nodes

    def served_by_both():
        for _ in range(20):  # a new connection each time: the kernel spreads them over both
            assert http_get(topo.gateway_http, "/v1/products/p1")[0] == 200
        counts = []
        for k in range(2):
            metrics = http_get(topo.gateway_admin + k, "/metrics")[2].decode()
            counts.append(sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                              if line.startswith("protomesh_requests_total{")))
        return all(counts)
    wait_until(served_by_both, 30, "both workers to serve requests")
    assert topo.launcher.stop(topo.gateway) == 0  # SIGTERM drains worker 0, then its children
