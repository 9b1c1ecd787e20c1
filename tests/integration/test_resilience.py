"""Resilience on real processes (control server, sidecars, apps, gateway on 127.0.0.1):

- a users replica (app and sidecar) is SIGKILLed while idempotent gRPC calls run through the
  gateway: no call fails (retries cover), the gateway takes the endpoint out (active TCP health
  check and outlier detection), and it serves again once the replica is restarted;
- a 90/10 split between two HTTP services through the gateway lands within binomial tolerance.

Every wait and every load loop is bounded in count and time; processes are stopped by PID.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter

import grpc

from demo.topology import REPO, Instance, admin_json
from protomesh.launch import free_port, http_ok, wait_until
from tests.integration.helpers import GrpcClients, http_get

MESH = """\
proto_paths: [{proto}]
services:
  users:
    protocol: grpc
    proto: demo/users/v1/users.proto
    timeout: 5s
    retries: {{ retry_on: [unavailable, connect-failure, reset], attempts: 3, per_try_timeout: 1s,
               backoff: {{ base: 10ms, max: 50ms }} }}
    # Envoy's default allows 3 concurrent retries; the 4 load threads can all be in flight on the
    # replica when it dies, so all 4 must be allowed to retry at once.
    circuit_breakers: {{ max_retries: 8 }}
    outlier_detection: {{ consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100,
                         interval: 1s, base_ejection_time: 2s, max_ejection_percent: 50 }}
    health_check: {{ tcp: {{}}, interval: 250ms, timeout: 200ms, unhealthy_threshold: 2, healthy_threshold: 2 }}
  products: {{ protocol: http, timeout: 5s }}
  products-canary: {{ protocol: http, timeout: 5s, endpoints: ["127.0.0.1:{canary}"] }}
gateway:
  http: 127.0.0.1:{http}
  grpc: 127.0.0.1:{grpc}
  routes:
    - {{ name: canary, match: {{ path_prefix: /v1/products }},
        split: [ {{ to: products, weight: 90 }}, {{ to: products-canary, weight: 10 }} ] }}
    - {{ name: users, match: {{ grpc_service: demo.users.v1.Users }}, to: users }}
"""


def _restart(topo, inst: Instance) -> None:
    """Start the replica again on the same ports (so it is the same endpoint)."""
    inst.app = topo.launcher.start(f"{inst.replica}-again", [
        "service", inst.service, "--listen", f"127.0.0.1:{inst.app_port}", "--replica", inst.replica])
    inst.sidecar = topo.launcher.start(f"{inst.replica}-sidecar-again", [
        "sidecar", "--service", inst.service, "--app", f"127.0.0.1:{inst.app_port}",
        "--control", topo.control_addr, "--inbound", f"127.0.0.1:{inst.inbound}",
        "--outbound-http", f"127.0.0.1:{inst.outbound_http}", "--outbound-grpc", f"127.0.0.1:{inst.outbound_grpc}",
        "--admin", f"127.0.0.1:{inst.admin}", "--node-id", f"{inst.replica}-sidecar", "--label",
        f"replica={inst.replica}"])


def _endpoint(topo, address: str) -> dict:
    eps = admin_json(topo.gateway_admin, "/clusters")["clusters"]["users"]["endpoints"]
    return next((e for e in eps if e["address"] == address), {})


class Load:
    """`threads` callers making GetUser calls through the gateway until stopped (and at most
    `max_calls` calls or `max_s` seconds in all)."""

    def __init__(self, port: int, threads: int = 4, max_calls: int = 40000, max_s: float = 90.0):
        self.port, self.threads, self.max_calls, self.max_s = port, threads, max_calls, max_s
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.served = Counter()
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        clients = GrpcClients(self.port)
        deadline = time.monotonic() + self.max_s
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                with self.lock:
                    if self.ok + len(self.failures) >= self.max_calls:
                        return
                try:
                    user = clients.get_user("1", timeout=5.0)
                    with self.lock:
                        self.ok += 1
                        self.served[user.served_by] += 1
                except grpc.RpcError as err:
                    with self.lock:
                        self.failures.append(f"{err.code().name}: {err.details()}")
        finally:
            clients.close()

    def __enter__(self):
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for w in self.workers:
            w.join(15)


def test_kill_a_replica_under_load_no_failures_ejected_and_back(fresh_mesh):
    topo = fresh_mesh
    canary_port = free_port()
    topo.write_mesh(MESH.format(proto=REPO / "proto", canary=canary_port, http=topo.gateway_http,
                                grpc=topo.gateway_grpc))
    # A long registration grace: the dead replica stays in EDS, so health checks and outlier
    # detection (not the registry) must take it out of the balancing set.
    topo.start_control(grace_s=120)
    topo.start_instance("users", "users-1", state_dir=False)
    u2 = topo.start_instance("users", "users-2", state_dir=False)
    topo.start_instance("products", "products-1", state_dir=False)
    canary = topo.launcher.start("products-canary", ["service", "products", "--listen",
                                                     f"127.0.0.1:{canary_port}", "--replica", "canary"])
    topo.start_gateway()
    topo.wait_ready()
    topo.wait_endpoints(topo.gateway_admin, "users", 2)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{canary_port}/healthz") or
               http_get(canary_port, "/v1/products")[0] < 500, 20, "the canary products app", proc=canary)
    victim = f"127.0.0.1:{u2.inbound}"
    wait_until(lambda: _endpoint(topo, victim).get("health") == "healthy", 20, "users-2 to pass its health check")

    # ---- 90/10 split through the gateway ---------------------------------------------------
    topo.wait_endpoints(topo.gateway_admin, "products", 1)
    n = 1000
    by = Counter()
    for _ in range(n):
        status, headers, _ = http_get(topo.gateway_http, "/v1/products")
        assert status == 200
        by[headers.get("x-served-by")] += 1
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(by["canary"] - 0.1 * n) <= 5 * sd and by["canary"] + by["products-1"] == n, by

    # ---- kill under load ---------------------------------------------------------------------
    with Load(topo.gateway_grpc) as load:
        wait_until(lambda: load.served["users-2"] >= 50 and load.served["users-1"] >= 50, 30,
                   "load reaching both replicas")
        u2.sidecar.popen.kill()
        u2.app.popen.kill()
        u2.sidecar.popen.wait(10)
        u2.app.popen.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: _endpoint(topo, victim).get("health") in ("unhealthy", "ejected"), 15,
                   "the gateway to take the killed replica out")
        out_after = time.monotonic() - killed_at
        assert len(_endpoint(topo, victim)) > 0  # still in EDS: taken out by health, not by the registry
        served_before = load.served["users-2"]
        time.sleep(1.0)
        assert load.served["users-2"] == served_before  # nothing reaches it while it is down
        _restart(topo, u2)
        wait_until(lambda: http_ok(f"{u2.admin_url}/ready"), 30, "users-2 to be ready again", proc=u2.sidecar)
        wait_until(lambda: _endpoint(topo, victim).get("health") == "healthy", 30, "users-2 to be healthy again")
        wait_until(lambda: load.served["users-2"] >= served_before + 50, 30, "traffic to reach users-2 again")
    total = load.ok + len(load.failures)
    metrics = urlopen_text(f"http://127.0.0.1:{topo.gateway_admin}/metrics")
    print(f"kill under load: {total} calls, {len(load.failures)} failed, taken out after {out_after:.2f}s, "
          f"served {dict(load.served)}")
    assert load.failures == [], load.failures[:5]
    assert total >= 500
    assert 'protomesh_health_check_transitions_total{cluster="users",to="unhealthy"}' in metrics
    assert 'protomesh_retries_total{cluster="users"}' in metrics
    assert 'protomesh_upstream_unhealthy{cluster="users"} 0' in metrics  # back


def urlopen_text(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()
