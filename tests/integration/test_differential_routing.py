"""Differential routing: one route table (mesh.yaml gateway routes) pushed to our gateway and to
a real Envoy gateway; one table of requests sent to both; every request must land on the same
cluster (weighted splits: the same share within a tolerance).

Each "cluster" is a mesh service with one static endpoint: a products app whose `--replica` is
the service's name, so the `x-served-by` answer header says which cluster was chosen.
"""
from __future__ import annotations

import pytest

from demo.topology import Topology
from protomesh import envoy
from protomesh.launch import free_port, tcp_open, wait_until
from tests.integration.helpers import http_get

CLUSTERS = ("alpha", "beta", "gamma", "delta")

ROUTES = """\
    - { name: exact,    match: { path: /v1/exact }, to: alpha }
    - { name: tenant,   match: { path_prefix: /v1/api, headers: { x-tenant: { prefix: acme } } }, to: beta }
    - { name: debug,    match: { path_prefix: /v1/api, query: { debug: "1" } }, to: gamma }
    - { name: regex,    match: { path_regex: "/v1/items/[0-9]+" }, to: delta }
    - { name: hdr-re,   match: { path_prefix: /v1/api, headers: { x-user: { regex: "u-[a-c].*" } } }, to: delta }
    - { name: canary,   match: { path_prefix: /v1/api, headers: { x-canary: { present: true } } },
        split: [ { to: alpha, weight: 30 }, { to: beta, weight: 70 } ] }
    - { name: q-prefix, match: { path_prefix: /v1/api, query: { v: { prefix: "2" } } }, to: gamma }
    - { name: api,      match: { path_prefix: /v1/api }, to: alpha }
    - { name: rest,     match: { path_prefix: / }, to: gamma }
"""

# (path, headers) → both gateways must agree; `expect` pins the intended answer too.
REQUESTS = [
    ("/v1/exact", {}, "alpha"),
    ("/v1/exact/more", {}, "gamma"),  # exact does not match a longer path
    ("/v1/api/x", {"x-tenant": "acme-corp"}, "beta"),
    ("/v1/api/x", {"x-tenant": "other"}, "alpha"),
    ("/v1/api/x?debug=1", {}, "gamma"),
    ("/v1/api/x?debug=10", {}, "alpha"),  # exact query value
    ("/v1/api/x?debug=1", {"x-tenant": "acme"}, "beta"),  # first match wins
    ("/v1/items/42", {}, "delta"),
    ("/v1/items/42x", {}, "gamma"),  # the regex must match the whole path
    ("/v1/items/", {}, "gamma"),
    ("/v1/api/y", {"x-user": "u-bob"}, "delta"),
    ("/v1/api/y", {"x-user": "u-zed"}, "alpha"),
    ("/v1/api/z?v=21", {}, "gamma"),
    ("/v1/api/z?v=12", {}, "alpha"),
    ("/v1/apis", {}, "alpha"),  # a path prefix is a string prefix, as in Envoy
    ("/other", {}, "gamma"),
]


def mesh_text(topo: Topology, ports: dict[str, int]) -> str:
    services = "".join(f"  {c}: {{ protocol: http, endpoints: [\"127.0.0.1:{ports[c]}\"], timeout: 5s }}\n"
                       for c in CLUSTERS)
    return (f"services:\n{services}"
            f"gateway:\n  http: 127.0.0.1:{topo.gateway_http}\n  routes:\n{ROUTES}")


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    envoy.binary()  # fails with "run make envoy-venv" when Envoy is not installed
    topo = Topology(tmp_path_factory.mktemp("diff"))
    try:
        ports = {c: free_port() for c in CLUSTERS}
        for c in CLUSTERS:
            proc = topo.launcher.start(c, ["service", "products", "--listen", f"127.0.0.1:{ports[c]}",
                                           "--replica", c])
            wait_until(lambda: tcp_open("127.0.0.1", ports[c]), 20, f"upstream {c}", proc=proc)
        topo.write_mesh(mesh_text(topo, ports))
        topo.start_control(warmup_s=0)
        topo.start_gateway()
        ev = topo.start_envoy_gateway("envoy-gw", delta=True)
        topo.wait_ready()
        # The upstreams answer 404 for these paths (with x-served-by): routing is what is compared.
        wait_until(lambda: chosen(ev["http"], "/v1/exact", {}) == "alpha", 20, "the Envoy gateway", proc=ev["proc"])
        wait_until(lambda: chosen(topo.gateway_http, "/v1/exact", {}) == "alpha", 20, "our gateway")
        yield {"protomesh": topo.gateway_http, "envoy": ev["http"]}
    finally:
        topo.stop_all()


def chosen(port: int, path: str, headers: dict) -> str:
    _, resp_headers, _ = http_get(port, path, headers=headers)
    return resp_headers.get("x-served-by", "-")


def test_same_cluster_for_every_request(gateways):
    table = [(path, headers, expect, chosen(gateways["protomesh"], path, headers), chosen(gateways["envoy"], path, headers))
             for path, headers, expect in REQUESTS]
    differ = [row for row in table if row[3] != row[4]]
    assert differ == [], "protomesh and Envoy chose differently (path, headers, expected, ours, envoy):\n" + \
        "\n".join(map(str, differ))
    wrong = [row for row in table if row[3] != row[2]]
    assert wrong == [], wrong


def test_weighted_split_matches_within_tolerance(gateways):
    n = 300
    shares = {}
    for name, port in gateways.items():
        counts = {}
        for _ in range(n):
            who = chosen(port, "/v1/api/w", {"x-canary": "yes"})
            counts[who] = counts.get(who, 0) + 1
        assert set(counts) == {"alpha", "beta"}, (name, counts)
        shares[name] = counts["alpha"] / n
    # 30/70 split: each within ±0.09 of 0.3 (≈3.4 standard deviations at n=300), and of each other.
    assert all(abs(s - 0.3) < 0.09 for s in shares.values()), shares
    assert abs(shares["protomesh"] - shares["envoy"]) < 0.12, shares
