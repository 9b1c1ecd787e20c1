"""Config changes on a running mesh: edits apply without restarts or failed requests; a config a
sidecar cannot honour is NACKed and the old one keeps serving; broken edits are refused."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from demo.topology import admin_json
from protomesh.launch import free_port, tcp_open, wait_until
from tests.integration.helpers import http_get


class LoadLoop:
    """Sequential keep-alive-less GETs through the gateway until stopped (bounded: count and time)."""

    def __init__(self, port: int, path: str, max_requests: int = 5000, max_seconds: float = 60.0):
        self.port, self.path = port, path
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                status, headers, _ = http_get(self.port, self.path)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                self.failures.append(f"{status} {headers.get('x-protomesh-reason', '')}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def test_mesh_edit_applies_without_failed_requests(fresh_mesh):
    topo = fresh_mesh
    spare = free_port()
    extra = topo.launcher.start("products-static", ["service", "products", "--listen", f"127.0.0.1:{spare}",
                                                     "--replica", "products-static"])
    wait_until(lambda: tcp_open("127.0.0.1", spare), 20, "the static products app", proc=extra)
    topo.write_mesh(topo.mesh_yaml(products_endpoints=[f"127.0.0.1:{spare}"]))
    topo.start_all(users_replicas=1)
    topo.wait_endpoints(topo.gateway_admin, "products", 2)

    with LoadLoop(topo.gateway_http, "/v1/products/p1") as load:
        wait_until(lambda: load.total >= 20, 20, "load to flow")
        # One edit: a new route (with a prefix rewrite) and the static endpoint removed.
        edited = topo.mesh_yaml().replace(
            "  routes:\n",
            "  routes:\n    - { name: products-v2, match: { path_prefix: /v2/products }, to: products,"
            " rewrite_prefix: /v1/products }\n", 1)
        topo.write_mesh(edited)
        wait_until(lambda: http_get(topo.gateway_http, "/v2/products/p3")[0] == 200, 20, "the new route")
        topo.wait_endpoints(topo.gateway_admin, "products", 1)
        before = load.total
        wait_until(lambda: load.total >= before + 20, 20, "load to continue after the edit")
    assert load.failures == [], load.failures[:5]
    status, headers, body = http_get(topo.gateway_http, "/v2/products/p3")
    assert json.loads(body)["id"] == "p3" and headers["x-served-by"] == "products-1"


def _status(topo) -> dict:
    out = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {n["node"]: n for n in json.loads(out.stdout)}


def test_unsupported_resource_is_nacked_and_old_config_keeps_serving(fresh_mesh):
    topo = fresh_mesh
    topo.start_all(users_replicas=1)
    good = topo.mesh_yaml()
    acked = admin_json(topo.gateway_admin, "/config_dump")["xds"]["types"]["CDS"]["version"]
    csds_acked = _status(topo)["gateway"]["types"]["CDS"]["version"]  # CSDS's own version string
    # MURMUR_HASH_2 for the ring is valid xDS (Envoy honours it) but this sidecar's ring hashes
    # with its own function, so it refuses the field by name.
    assert "protocol: http, lb: round_robin" in good
    topo.write_mesh(good.replace("protocol: http, lb: round_robin",
                                 "protocol: http, lb: ring_hash, ring_hash: { hash_function: murmur_hash_2 }"))

    def gateway_nacked():
        n = _status(topo).get("gateway")
        return n and n["types"]["CDS"]["status"] == "NACKED" and n

    node = wait_until(gateway_nacked, 20, "the gateway to NACK the new clusters")
    assert "ring_hash_lb_config.hash_function" in node["types"]["CDS"]["error"]
    assert node["types"]["CDS"]["version"] == csds_acked, node["types"]["CDS"]  # still on the last good version
    dump = admin_json(topo.gateway_admin, "/config_dump")["xds"]["types"]["CDS"]
    assert dump["version"] == acked and "hash_function" in dump["nack"]
    for _ in range(10):
        assert http_get(topo.gateway_http, "/v1/products/p1")[0] == 200
    table = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr],
                           capture_output=True, text=True, timeout=30).stdout
    assert "NACKED" in table and "hash_function" in table
    topo.write_mesh(good)
    wait_until(lambda: _status(topo)["gateway"]["types"]["CDS"]["status"] == "ACKED", 20, "the fix to be ACKed")


def test_broken_mesh_edit_keeps_old_config(fresh_mesh):
    topo = fresh_mesh
    topo.start_all(users_replicas=1)
    topo.write_mesh(topo.mesh_yaml().replace("to: products", "to: inventory"))
    wait_until(lambda: admin_json(topo.control_admin, "/config_dump")["mesh_error"], 20, "the edit to be rejected")
    err = admin_json(topo.control_admin, "/config_dump")["mesh_error"]
    assert "gateway.routes[0].to" in err and "inventory" in err and "mesh.yaml" in err
    assert http_get(topo.gateway_http, "/v1/products/p1")[0] == 200
    assert "mesh edit rejected" in topo.control.log_tail(50)
