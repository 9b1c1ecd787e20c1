"""Policy declared only in a .proto is enforced by the running gateway: the rpc's timeout and its
rate limit, on gRPC and on the HTTP side (gRPC-Web); mesh.yaml `methods` overrides show in
`protomesh describe`."""
from __future__ import annotations

import http.client
import struct
import time
from concurrent import futures

import grpc
import pytest

from demo.topology import Topology
from protomesh.launch import http_ok, wait_until

PROTO = """syntax = "proto3";
package slowtest.v1;
import "meshapi/v1/options.proto";

service Slow {
  rpc Sleep(Nap) returns (Nap) {
    option (meshapi.v1.method) = { timeout: { nanos: 300000000 } };
  }
  rpc Limited(Nap) returns (Nap) {
    option (meshapi.v1.method) = { rate_limit: { requests: 3 per: { seconds: 60 } } };
  }
  rpc Watch(Nap) returns (stream Nap);
}
message Nap { int32 ms = 1; }
"""


class _App(grpc.GenericRpcHandler):
    """Sleeps for the `sleep-ms` metadata, then answers an empty Nap."""

    def service(self, details):
        def handle(request, context):
            ms = int(dict(context.invocation_metadata()).get("sleep-ms", "0"))
            time.sleep(ms / 1000)
            return b""
        return grpc.unary_unary_rpc_method_handler(handle)


def mesh_yaml(topo: Topology, app_port: int, extra: str = "") -> str:
    return (f"proto_paths: [{topo.workdir / 'protos'}]\n"
            "services:\n"
            f"  slow: {{ protocol: grpc, proto: slow/v1/slow.proto, timeout: 5s, endpoints: [\"127.0.0.1:{app_port}\"]"
            f"{extra} }}\n"
            "gateway:\n"
            f"  http: 127.0.0.1:{topo.gateway_http}\n"
            f"  grpc: 127.0.0.1:{topo.gateway_grpc}\n"
            "  routes:\n"
            "    - { name: slow, match: { grpc_service: slowtest.v1.Slow }, to: slow }\n")


@pytest.fixture(scope="module")
def policy_mesh(tmp_path_factory):
    topo = Topology(tmp_path_factory.mktemp("policy"))
    (topo.workdir / "protos" / "slow" / "v1").mkdir(parents=True)
    (topo.workdir / "protos" / "slow" / "v1" / "slow.proto").write_text(PROTO)
    app = grpc.server(futures.ThreadPoolExecutor(8))
    app.add_generic_rpc_handlers((_App(),))
    port = app.add_insecure_port("127.0.0.1:0")
    app.start()
    try:
        topo.write_mesh(mesh_yaml(topo, port))
        topo.start_control()
        topo.start_gateway()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{topo.gateway_admin}/ready"), 30, "the gateway to be ready",
                   proc=topo.gateway)
        topo.app_port = port
        yield topo
    finally:
        topo.stop_all()
        app.stop(None)


def _call(topo, method: str, sleep_ms: int = 0, timeout: float = 10.0):
    with grpc.insecure_channel(f"127.0.0.1:{topo.gateway_grpc}") as ch:
        fn = ch.unary_unary(f"/slowtest.v1.Slow/{method}")
        return fn.with_call(b"", metadata=(("sleep-ms", str(sleep_ms)),), timeout=timeout)


def test_timeout_declared_in_the_proto_cuts_the_call(policy_mesh):
    _call(policy_mesh, "Sleep", 10)  # fast enough
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        _call(policy_mesh, "Sleep", 2000)
    took = time.monotonic() - started
    err = info.value
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(err.trailing_metadata())["x-protomesh-reason"] == "upstream_timeout route=slow/Sleep"
    assert took < 1.5  # the proto's 300 ms, not the service's 5 s nor the caller's 10 s


def test_rate_limit_declared_in_the_proto_is_enforced_on_grpc_and_grpc_web(policy_mesh):
    for _ in range(3):
        _call(policy_mesh, "Limited")
    with pytest.raises(grpc.RpcError) as info:
        _call(policy_mesh, "Limited")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())["x-protomesh-reason"].startswith("rate_limited")
    # the HTTP listener's route for the same rpc shares the bucket (gRPC-Web here)
    conn = http.client.HTTPConnection("127.0.0.1", policy_mesh.gateway_http, timeout=10)
    try:
        conn.request("POST", "/slowtest.v1.Slow/Limited", body=struct.pack(">BI", 0, 0),
                     headers={"content-type": "application/grpc-web+proto"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.getheader("grpc-status") == "8", (resp.status, resp.getheaders(), body)
        assert resp.getheader("x-protomesh-reason").startswith("rate_limited")
    finally:
        conn.close()


def test_streaming_rpc_gets_no_route_timeout_and_methods_override_is_described(policy_mesh, capsys):
    import json
    dump = json.loads(http_get_text(policy_mesh.gateway_admin, "/config_dump"))
    text = json.dumps(dump)
    assert "slow/Watch" in text and "slow/Sleep" in text
    from protomesh.describe import main
    mesh = policy_mesh.workdir / "override.yaml"
    mesh.write_text(mesh_yaml(policy_mesh, policy_mesh.app_port, ", methods: { Sleep: { timeout: 2s } }"))
    assert main(str(mesh), "slow", False) == 0
    out = capsys.readouterr().out
    sleep = out.split("/slowtest.v1.Slow/Sleep")[1].split("\n\n")[0]
    assert "2s" in sleep and "mesh.yaml services.slow.methods.Sleep.timeout" in sleep
    limited = out.split("/slowtest.v1.Slow/Limited")[1].split("\n\n")[0]
    assert "rate_limit.requests" in limited and "slow.proto:10 (meshapi.v1.method)" in limited


def http_get_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()
