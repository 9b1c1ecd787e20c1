"""mesh.yaml validation: every broken input names file, field and fix; good input parses."""
from pathlib import Path

import pytest

from control.errors import MeshError
from control.model import load_mesh

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"

GOOD = f"""
proto_paths: [{PROTO_ROOT}]
services:
  users:    {{ protocol: grpc, proto: demo/users/v1/users.proto }}
  orders:   {{ protocol: grpc, proto: demo/orders/v1/orders.proto, lb: least_request, timeout: 2s }}
  products: {{ protocol: http, endpoints: ["127.0.0.1:9000"] }}
gateway:
  http: 127.0.0.1:8080
  grpc: 127.0.0.1:8443
  routes:
    - {{ match: {{ path_prefix: /v1/products, headers: {{ x-env: {{ prefix: can }} }} }}, to: products, timeout: 250ms }}
    - {{ match: {{ grpc_service: demo.users.v1.Users, grpc_method: GetUser }}, to: users }}
telemetry: {{ otlp_endpoint: "http://127.0.0.1:4317", sampling: 0.5 }}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mesh.yaml"
    p.write_text(text)
    return p


def test_good_mesh_parses(tmp_path):
    mesh = load_mesh(write(tmp_path, GOOD))
    assert set(mesh.services) == {"users", "orders", "products"}
    assert mesh.services["orders"].timeout_s == 2.0
    assert mesh.services["products"].endpoints == (("127.0.0.1", 9000),)
    users = mesh.services["users"].grpc_services[0]
    assert users.full_name == "demo.users.v1.Users"
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in users.methods}
    assert (False, False) in kinds.values() and (True, True) in kinds.values()
    r0, r1 = mesh.gateway.routes
    assert (r0.path_kind, r0.path_value, r0.timeout_s) == ("prefix", "/v1/products", 0.25)
    assert r0.headers[0].kind == "prefix"
    assert (r1.path_kind, r1.path_value, r1.grpc) == ("path", "/demo.users.v1.Users/GetUser", True)
    assert mesh.telemetry.sampling == 0.5


@pytest.mark.parametrize("edit, field, fix_hint", [
    (("to: products, timeout", "to: nosuch, timeout"), "gateway.routes[0].to", "use one of"),
    (("protocol: http,", "protocol: smtp,"), "services.products.protocol", "protocol: grpc"),
    (("lb: least_request", "lb: fastest"), "services.orders.lb", "round_robin"),
    (("timeout: 2s", "timeout: soon"), "services.orders.timeout", "250ms"),
    (("127.0.0.1:9000", "localhost"), "services.products.endpoints[0]", "host:port"),
    (("grpc_method: GetUser", "grpc_method: Nope"), "gateway.routes[1].match.grpc_method", "GetUser"),
    (("grpc_service: demo.users.v1.Users", "grpc_service: x.Y"), "gateway.routes[1].match.grpc_service",
     "demo.users.v1.Users"),
    (("sampling: 0.5", "sampling: 2"), "telemetry.sampling", "0.1"),
    (("telemetry:", "telemetri:"), "telemetri", "one of"),
    (("path_prefix: /v1/products", "path_prefix: v1/products"), "gateway.routes[0].match.path_prefix", "/v1"),
])
def test_broken_mesh_names_field_and_fix(tmp_path, edit, field, fix_hint):
    old, new = edit
    assert old in GOOD
    with pytest.raises(MeshError) as info:
        load_mesh(write(tmp_path, GOOD.replace(old, new, 1)))
    err = info.value
    assert err.field == field
    assert fix_hint in err.fix or fix_hint in err.reason
    assert str(tmp_path / "mesh.yaml") in str(err)


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(MeshError) as info:
        load_mesh(write(tmp_path, "services:\n  users: { protocol: grpc\n  orders: x\n"))
    assert info.value.line is not None
    assert "YAML syntax error" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(MeshError, match="cannot read"):
        load_mesh(tmp_path / "absent.yaml")


def test_broken_proto_reports_file_and_line(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.proto").write_text('syntax = "proto3";\npackage b;\nservice S { rpc A(M) returns (M) }\nmessage M {}\n')
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("proto_paths: [p]\nservices:\n  b: { protocol: grpc, proto: bad.proto }\n")
    with pytest.raises(MeshError) as info:
        load_mesh(mesh)
    assert info.value.file.endswith("bad.proto")
    assert info.value.line == 3


def test_grpc_service_without_proto_is_rejected(tmp_path):
    with pytest.raises(MeshError) as info:
        load_mesh(write(tmp_path, "services:\n  users: { protocol: grpc }\n"))
    assert info.value.field == "services.users.proto"


TRAFFIC = f"""
proto_paths: [{PROTO_ROOT}]
services:
  users:
    protocol: grpc
    proto: demo/users/v1/users.proto
    lb: ring_hash
    hash: [ {{ header: x-user }}, {{ source_ip: true }} ]
    retries: {{ retry_on: [unavailable, connect-failure], attempts: 3, per_try_timeout: 200ms, backoff: {{ base: 10ms, max: 100ms }} }}
    outlier_detection: {{ consecutive_5xx: 3, interval: 1s, base_ejection_time: 5s, max_ejection_percent: 50 }}
    circuit_breakers: {{ max_requests: 100, budget_percent: 20, min_retry_concurrency: 2 }}
    panic_threshold: 30
    ring_hash: {{ minimum_ring_size: 2048 }}
  products: {{ protocol: http, retries: {{ status_codes: [409] }}, lb: maglev, maglev: {{ table_size: 5003 }} }}
"""


def test_traffic_fields_parse(tmp_path):
    mesh = load_mesh(write(tmp_path, TRAFFIC))
    t = mesh.services["users"].traffic
    assert t.retries.on == ("unavailable", "connect-failure") and t.retries.attempts == 3
    assert t.retries.per_try_timeout_s == 0.2 and t.retries.backoff_max_s == 0.1
    assert dict(t.outlier) == {"consecutive_5xx": 3, "interval": 1.0, "base_ejection_time": 5.0,
                               "max_ejection_percent": 50}
    assert dict(t.circuit_breakers)["budget_percent"] == 20
    assert t.hash == (("header", "x-user"), ("source_ip", "")) and t.panic_threshold == 30
    p = mesh.services["products"].traffic
    assert "retriable-status-codes" in p.retries.on and p.retries.status_codes == (409,)
    assert p.maglev_table_size == 5003


@pytest.mark.parametrize("service,field,fix", [
    ("{ protocol: http, retries: { retry_on: [teapot] } }", "services.p.retries.retry_on", "use some of"),
    ("{ protocol: http, retries: { backoff: { base: 1s, max: 10ms } } }", "services.p.retries.backoff", "base <= max"),
    ("{ protocol: http, hash: [ { header: x } ] }", "services.p.hash", "lb: ring_hash"),
    ("{ protocol: http, outlier_detection: { max_ejection_percent: 150 } }",
     "services.p.outlier_detection.max_ejection_percent", "<= 100"),
    ("{ protocol: http, circuit_breakers: { max_conns: 1 } }", "services.p.circuit_breakers.max_conns", "max_connections"),
    ("{ protocol: http, lb: ring_hash, ring_hash: { hash_function: md5 } }", "services.p.ring_hash.hash_function", "xx_hash"),
])
def test_traffic_errors_name_the_field(tmp_path, service, field, fix):
    with pytest.raises(MeshError) as info:
        load_mesh(write(tmp_path, f"services:\n  p: {service}\n"))
    text = str(info.value)
    assert field in text and fix in text, text
