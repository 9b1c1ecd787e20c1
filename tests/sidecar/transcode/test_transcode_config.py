"""Rules that cannot be served are refused when the config is built, naming file, rpc and reason."""
from __future__ import annotations

import pytest

from sidecar.transcode import Transcoder, TranscodeConfigError
from tests.sidecar.transcode.protoset import compile_set

HEADER = """syntax = "proto3";
package bad.v1;
import "google/api/annotations.proto";
message Req { string id = 1; repeated string tags = 2; Inner inner = 3; map<string, string> m = 4; }
message Inner { string x = 1; }
message Resp { string id = 1; }
"""


def build(tmp_path, rpcs: str, services=("bad.v1.S",), **options):
    (tmp_path / "bad.proto").write_text(HEADER + "service S {\n" + rpcs + "\n}\n")
    return Transcoder.from_descriptor_set(compile_set(["bad.proto"], [tmp_path]), list(services), **options)


@pytest.mark.parametrize("rpc, fragment", [
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{id" }; }', "expected '=' or '}'"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{nope}" }; }', "'nope' does not name a field"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{tags}" }; }', "singular primitive"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{inner}" }; }', "singular primitive"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{m}" }; }', "singular primitive"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{inner.y}" }; }', "inner.y"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { post: "/v1/a" body: "inner.x" }; }', "top-level field"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { post: "/v1/a" body: "zzz" }; }', "body 'zzz'"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/a" response_body: "zzz" }; }', "response_body"),
    ('rpc A(stream Req) returns (Resp) { option (google.api.http) = { post: "/v1/a" }; }', "client-streaming"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { body: "*" }; }', "sets no pattern"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/a" additional_bindings { get: "/v1/b" '
     'additional_bindings { get: "/v1/c" } } }; }', "may not nest"),
    ('rpc A(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{id}" }; }\n'
     'rpc B(Req) returns (Resp) { option (google.api.http) = { get: "/v1/{inner.x}" }; }', "ambiguous with bad.v1.S.A"),
])
def test_bad_rules(tmp_path, rpc, fragment):
    with pytest.raises(TranscodeConfigError) as err:
        build(tmp_path, rpc)
    assert fragment in err.value.reason
    assert err.value.where.startswith("bad.proto: bad.v1.S.")


def test_unknown_service_and_garbage(tmp_path):
    with pytest.raises(TranscodeConfigError, match="'bad.v1.Nope' is not in the descriptor set.*bad.v1.S"):
        build(tmp_path, "", services=["bad.v1.Nope"])
    with pytest.raises(TranscodeConfigError, match="FileDescriptorSet"):
        Transcoder.from_descriptor_set(b"\xff\xff\xff", ["x"])


def test_auto_mapping(tmp_path):
    rpcs = 'rpc A(Req) returns (Resp);\nrpc B(Req) returns (Resp) { option (google.api.http) = { get: "/v1/b/{id}" }; }'
    assert [str(b) for b in build(tmp_path, rpcs).bindings] == ["GET /v1/b/{id} → /bad.v1.S/B"]
    t = build(tmp_path, rpcs, auto_mapping=True)
    m = t.match("POST", "/bad.v1.S/A")
    assert m.grpc_path == "/bad.v1.S/A"
    assert t.request_message(m, "", b'{"id": "7"}', "application/json") == b"\n\x017"
