"""xDS → frozen config: what we honour parses; what we cannot honour is refused by name."""
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2

from control.model import HeaderRule
from control.translate import build
from protomesh import xdstypes
from sidecar.config.errors import ConfigError
from sidecar.config.parse import parse_cluster, parse_listener, parse_resources, parse_route_config


def table(*routes):
    return parse_route_config(build.route_config("rt", [build.vhost("vh", ["*"], list(routes))]))


def test_listener_roundtrip():
    lst = parse_listener(build.listener("out", "127.0.0.1", 15001, "rt", grpc=True))
    assert (lst.name, lst.host, lst.port, lst.protocol, lst.route_table) == ("out", "127.0.0.1", 15001, "grpc", "rt")
    assert lst.filters == (xdstypes.ROUTER,)


def test_unknown_http_filter_is_refused_by_name():
    msg = build.listener("out", "127.0.0.1", 15001, "rt", grpc=False)
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as h
    hcm = h.HttpConnectionManager()
    msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.http_filters.insert(0, h.HttpFilter(name="envoy.filters.http.cors", typed_config=build.pack(cors_pb2.Cors())))
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    with pytest.raises(ConfigError, match="envoy.filters.http.cors"):
        parse_listener(msg)
    hcm.http_filters[0].is_optional = True  # optional filters we don't know are skipped, like Envoy
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    assert parse_listener(msg).filters == (xdstypes.ROUTER,)


def test_unsupported_cluster_field_is_refused():
    c = build.cluster("c", "round_robin", False, 1.0)
    c.upstream_connection_options.tcp_keepalive.keepalive_probes.value = 3
    with pytest.raises(ConfigError) as info:
        parse_cluster(c)
    assert info.value.where == "Cluster c.upstream_connection_options"


def test_cluster_http2_and_policy():
    c = parse_cluster(build.cluster("c", "least_request", True, 0.25))
    assert (c.lb_policy, c.http2, c.connect_timeout_s, c.eds) == ("least_request", True, 0.25, True)
    c = build.cluster("c", "round_robin", False, 1.0)
    c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    with pytest.raises(ConfigError, match="CLUSTER_PROVIDED"):
        parse_cluster(c)


def test_all_or_nothing():
    good = build.pack(build.cluster("a", "round_robin", False, 1.0))
    bad_msg = build.cluster("b", "round_robin", False, 1.0)
    bad_msg.type = cluster_pb2.Cluster.LOGICAL_DNS
    with pytest.raises(ConfigError, match="LOGICAL_DNS"):
        parse_resources(xdstypes.CLUSTER, [good, build.pack(bad_msg)])


H = {"content-type": "application/json"}
G = {"content-type": "application/grpc"}


@pytest.mark.parametrize("route, path, headers, hit", [
    (build.route("p", prefix="/v1/products", split=(("x", 1),), timeout_s=1), "/v1/products/7?a=1", H, True),
    (build.route("p", prefix="/v1/products", split=(("x", 1),), timeout_s=1), "/v1/users", H, False),
    (build.route("e", path="/exact", split=(("x", 1),), timeout_s=1), "/exact?q", H, True),
    (build.route("e", path="/exact", split=(("x", 1),), timeout_s=1), "/exact/more", H, False),
    (build.route("r", regex=r"/v\d+/items", split=(("x", 1),), timeout_s=1), "/v2/items", H, True),
    (build.route("g", prefix="/pkg.S/", grpc=True, split=(("x", 1),), timeout_s=1), "/pkg.S/M", G, True),
    (build.route("g", prefix="/pkg.S/", grpc=True, split=(("x", 1),), timeout_s=1), "/pkg.S/M", H, False),
    (build.route("h", prefix="/", headers=(HeaderRule("x-env", "exact", "canary"),), split=(("x", 1),), timeout_s=1),
     "/", {"x-env": "canary"}, True),
    (build.route("h", prefix="/", headers=(HeaderRule("x-env", "exact", "canary"),), split=(("x", 1),), timeout_s=1),
     "/", {"x-env": "prod"}, False),
    (build.route("h", prefix="/", headers=(HeaderRule("x-env", "present", "True"),), split=(("x", 1),), timeout_s=1),
     "/", {}, False),
    (build.route("h", prefix="/", headers=(HeaderRule("x-v", "regex", "v[12]"),), split=(("x", 1),), timeout_s=1),
     "/", {"x-v": "v2"}, True),
    (build.route("q", prefix="/", query=(HeaderRule("debug", "exact", "1"),), split=(("x", 1),), timeout_s=1),
     "/a?x=2&debug=1", {}, True),
    (build.route("q", prefix="/", query=(HeaderRule("debug", "exact", "1"),), split=(("x", 1),), timeout_s=1),
     "/a?debug=0", {}, False),
])
def test_route_matching(route, path, headers, hit):
    rt = table(route)
    assert (rt.select("any", path, headers) is not None) == hit


def test_first_match_wins_and_virtual_hosts_by_authority():
    rt = parse_route_config(build.route_config("rt", [
        build.vhost("products", ["products", "products.mesh"], [
            build.route("a", prefix="/v1", split=(("p1", 1),), timeout_s=1),
            build.route("b", prefix="/", split=(("p2", 1),), timeout_s=1)]),
        build.vhost("wild", ["*.example.com"], [build.route("w", prefix="/", split=(("w", 1),), timeout_s=1)]),
        build.vhost("default", ["*"], [build.route("d", prefix="/", split=(("d", 1),), timeout_s=1)]),
    ]))
    assert rt.select("products", "/v1/x", {}).name == "a"
    assert rt.select("products:15001", "/other", {}).name == "b"
    assert rt.select("api.example.com", "/", {}).name == "w"
    assert rt.select("elsewhere", "/", {}).name == "d"


def test_weighted_clusters_and_rewrite_and_timeout():
    rt = table(build.route("s", prefix="/old", split=(("a", 90), ("b", 10)), timeout_s=0, rewrite_prefix="/new"))
    r = rt.select("h", "/old/x", {})
    assert r.pick_cluster(0.0) == "a" and r.pick_cluster(0.899) == "a" and r.pick_cluster(0.95) == "b"
    assert r.rewrite("/old/x?y=1") == "/new/x?y=1"
    assert r.timeout_s is None  # 0s means no timeout, as in Envoy


def test_tracing_config_from_mesh_telemetry():
    from control.model import Telemetry
    trace = build.tracing(Telemetry("http://127.0.0.1:4317", 0.25), "sidecar.users")
    lst = parse_listener(build.listener("in", "127.0.0.1", 1, "rt", grpc=False, trace=trace))
    assert lst.tracing.otlp_endpoint == "http://127.0.0.1:4317"
    assert lst.tracing.sampling == 0.25
    assert build.tracing(Telemetry(None, 1.0), "x") is None


def test_grpc_method_kinds_ride_on_the_listener():
    from control.model import GrpcMethod, GrpcService
    svc = GrpcService("pkg.S", (GrpcMethod("A", False, False), GrpcMethod("B", False, True),
                                GrpcMethod("C", True, False), GrpcMethod("D", True, True)), "s.proto")
    lst = parse_listener(build.listener("g", "127.0.0.1", 1, "rt", grpc=True, methods=build.grpc_methods([svc])))
    assert lst.grpc_kinds == {"/pkg.S/A": "unary", "/pkg.S/B": "server_stream",
                              "/pkg.S/C": "client_stream", "/pkg.S/D": "bidi_stream"}


def test_mesh_traffic_round_trips_into_sidecar_config(tmp_path):
    """mesh.yaml → control translation (Envoy fields) → sidecar parse: the same policy."""
    from control.model import load_mesh
    from control.translate import protomesh as pm
    from sidecar.config.parse import parse_route_config
    from sidecar.config.model import HeaderMatch
    (tmp_path / "mesh.yaml").write_text("""
services:
  products:
    protocol: http
    lb: ring_hash
    hash: [ { cookie: session } ]
    retries: { retry_on: [5xx, reset], attempts: 3, per_try_timeout: 300ms, backoff: { base: 10ms, max: 80ms } }
    outlier_detection: { consecutive_5xx: 2, interval: 2s, base_ejection_time: 4s, max_ejection_percent: 50 }
    circuit_breakers: { max_requests: 7, max_retries: 2 }
    panic_threshold: 25
""")
    mesh = load_mesh(tmp_path / "mesh.yaml")
    from envoy.config.cluster.v3 import cluster_pb2 as cpb
    raw = cpb.Cluster()
    pm.shared_clusters(mesh)["products"].Unpack(raw)
    c = parse_cluster(raw)
    assert c.lb_policy == "ring_hash" and c.panic_threshold == 25
    assert (c.outlier.consecutive_5xx, c.outlier.interval_s, c.outlier.base_ejection_s,
            c.outlier.max_ejection_percent) == (2, 2.0, 4.0, 50)
    assert (c.breaker.max_requests, c.breaker.max_retries) == (7, 2)
    route = parse_route_config(pm.outbound_http_routes(mesh)).virtual_hosts[0].routes[0]
    r = route.retry
    assert r.retry_on == {"5xx", "reset"} and r.num_retries == 3 and r.per_try_timeout_s == 0.3
    assert (r.base_interval_s, r.max_interval_s, r.avoid_previous_hosts) == (0.01, 0.08, True)
    assert isinstance(r.request_headers[0], HeaderMatch) and r.request_headers[0].matches("GET")
    assert not r.request_headers[0].matches("POST")  # idempotent methods only
    assert route.hash_policies[0].kind == "cookie" and route.hash_policies[0].name == "session"


def test_ring_hash_function_and_incomplete_health_checks_are_refused_by_name():
    c = build.cluster("c", "ring_hash", False, 1.0)
    c.ring_hash_lb_config.hash_function = cluster_pb2.Cluster.RingHashLbConfig.MURMUR_HASH_2
    with pytest.raises(ConfigError) as info:
        parse_cluster(c)
    assert info.value.where == "Cluster c.ring_hash_lb_config.hash_function"
    c = build.cluster("c", "round_robin", False, 1.0)
    c.health_checks.add().interval.seconds = 1
    with pytest.raises(ConfigError) as info:
        parse_cluster(c)
    assert info.value.where == "Cluster c.health_checks[0].timeout"  # required, like in Envoy


def test_stream_idle_timeout_defaults_like_envoy_and_zero_disables():
    assert parse_listener(build.listener("l", "127.0.0.1", 1, "rt", grpc=False)).stream_idle_timeout_s == 300.0
    assert parse_listener(build.listener("l", "127.0.0.1", 1, "rt", grpc=False,
                                         stream_idle_timeout_s=4)).stream_idle_timeout_s == 4.0
    assert parse_listener(build.listener("l", "127.0.0.1", 1, "rt", grpc=False,
                                         stream_idle_timeout_s=0)).stream_idle_timeout_s is None
