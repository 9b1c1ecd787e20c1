"""The gateway of the running demo mesh speaks JSON, NDJSON/SSE, gRPC-Web, reflection and health
for the mesh's gRPC services, all from the services' .proto files (no hand-written routes)."""
from __future__ import annotations

import base64
import http.client
import json
import struct

import grpc
import pytest

from demo.users.v1 import users_pb2
from tests.integration.helpers import http_get


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_unary_get_with_path_variable(mesh):
    status, headers, body = http_get(mesh.gateway_http, "/v1/users/1")
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    user = json.loads(body)
    assert user["id"] == "1" and user["servedBy"].startswith("users-")


def test_post_with_json_body_fans_out(mesh):
    status, _, body = request(mesh.gateway_http, "POST", "/v1/orders",
                              json.dumps({"userId": "2", "productId": "p1", "quantity": 2}).encode(),
                              {"content-type": "application/json"})
    assert status == 200, body
    order = json.loads(body)
    assert order["user"]["id"] == "2" and order["quantity"] == 2


def test_errors_are_google_rpc_status_with_http_codes(mesh):
    status, _, body = http_get(mesh.gateway_http, "/v1/users/42")
    assert status == 404
    err = json.loads(body)
    assert err["code"] == 5 and err["message"]
    # an unknown query parameter is refused by the mesh itself, and it says so
    status, headers, body = http_get(mesh.gateway_http, "/v1/users/1?nope=1")
    assert status == 400 and headers["x-protomesh-reason"].startswith("invalid_query")
    assert json.loads(body)["code"] == 3


def test_server_stream_as_ndjson_and_sse(mesh):
    status, headers, body = http_get(mesh.gateway_http, "/v1/users?pageSize=3")
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in body.splitlines() if x.strip()]
    assert [u["id"] for u in lines] == ["1", "2", "3"]
    status, headers, body = http_get(mesh.gateway_http, "/v1/users?pageSize=2",
                                     headers={"Accept": "text/event-stream"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(x[len(b"data: "):]) for x in body.splitlines() if x.startswith(b"data: ")]
    assert [u["id"] for u in events] == ["1", "2"]


def test_transcoded_requests_are_routed_and_logged_like_any_other(mesh):
    status, _, _ = http_get(mesh.gateway_http, "/v1/users/3")
    assert status == 200
    log = (mesh.workdir / "logs" / "gateway.access.jsonl")
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        hits = [e for e in entries if e["path"] == "/v1/users/3" and e["cluster"] == "users"]
        if hits:
            break
        time.sleep(0.2)
    assert hits and hits[-1]["route"] == "users/GetUser" and hits[-1]["status"] == 200


def test_openapi_document_is_served_and_valid(mesh):
    from openapi_spec_validator import validate
    status, headers, body = http_get(mesh.gateway_http, "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    validate(doc)
    assert "/v1/users/{id}" in doc["paths"] and "post" in doc["paths"]["/v1/orders"]


def _grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(body):
        flag, size = body[i], struct.unpack_from(">I", body, i + 1)[0]
        out.append((flag, body[i + 5:i + 5 + size]))
        i += 5 + size
    return out


@pytest.mark.parametrize("text", [False, True])
def test_grpc_web_round_trip(mesh, text):
    msg = users_pb2.GetUserRequest(id="2").SerializeToString()
    body = struct.pack(">BI", 0, len(msg)) + msg
    ctype = "application/grpc-web-text" if text else "application/grpc-web+proto"
    status, headers, raw = request(mesh.gateway_http, "POST", "/demo.users.v1.Users/GetUser",
                                   base64.b64encode(body) if text else body,
                                   {"content-type": ctype, "x-grpc-web": "1", "origin": "http://example.test"})
    assert status == 200
    assert headers["content-type"].startswith("application/grpc-web-text" if text else "application/grpc-web")
    assert headers["access-control-allow-origin"] == "http://example.test"
    frames = _grpc_web_frames(base64.b64decode(raw) if text else raw)
    assert frames[0][0] == 0 and users_pb2.User.FromString(frames[0][1]).id == "2"
    assert frames[-1][0] == 0x80 and b"grpc-status:0" in frames[-1][1]


def test_grpc_web_error_and_cors_preflight(mesh):
    msg = users_pb2.GetUserRequest(id="42").SerializeToString()
    status, headers, _ = request(mesh.gateway_http, "POST", "/demo.users.v1.Users/GetUser",
                                 struct.pack(">BI", 0, len(msg)) + msg, {"content-type": "application/grpc-web+proto"})
    assert status == 200 and headers["grpc-status"] == "5"
    status, headers, _ = request(mesh.gateway_http, "OPTIONS", "/demo.users.v1.Users/GetUser", None, {
        "origin": "http://example.test", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web"})
    assert status == 204 and headers["access-control-allow-origin"] == "http://example.test"
    assert "POST" in headers["access-control-allow-methods"]


@pytest.mark.parametrize("frame, why", [
    (struct.pack(">BI", 0, 1000) + b"short", "truncated frame"),  # length prefix larger than the data
    (struct.pack(">BI", 1, 3) + b"abc", "compressed"),  # compressed flag, no codec negotiated
    (b"\x00\x00", "truncated frame header"),
])
def test_invalid_grpc_framing_is_refused_with_a_reason(mesh, frame, why):
    status, headers, _ = request(mesh.gateway_http, "POST", "/demo.users.v1.Users/GetUser", frame,
                                 {"content-type": "application/grpc-web+proto"})
    assert status == 200 and headers["grpc-status"] == "3"  # INVALID_ARGUMENT, trailers-only
    assert why in headers["grpc-message"] and headers["x-protomesh-reason"].startswith("bad_request")
    ok = users_pb2.GetUserRequest(id="2").SerializeToString()
    status, headers, _ = request(mesh.gateway_http, "POST", "/demo.users.v1.Users/GetUser",
                                 struct.pack(">BI", 0, len(ok)) + ok, {"content-type": "application/grpc-web+proto"})
    assert status == 200 and headers.get("grpc-status", "0") == "0"  # still serving


def test_reflection_lists_the_demo_services_and_health_answers(mesh):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{mesh.gateway_grpc}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="demo.users.v1.Users"),
        ]), timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"demo.users.v1.Users", "demo.orders.v1.Orders"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto
        health = health_pb2_grpc.HealthStub(ch)
        ok = health.Check(health_pb2.HealthCheckRequest(service="demo.users.v1.Users"), timeout=5)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
