"""The gateway view carries each rpc's policy from the protos: per-rpc routes with their timeout
and rate limit, the transcoder / gRPC-Web / rate-limit filters, and our sidecar parses it all."""
from pathlib import Path

from control.model import load_mesh
from control.translate import protomesh as pm
from protomesh import xdstypes
from sidecar.config.parse import parse_resources

REPO = Path(__file__).resolve().parents[2]


def _mesh(tmp_path):
    p = tmp_path / "mesh.yaml"
    p.write_text(f"proto_paths: [{REPO / 'proto'}]\n"
                 "services:\n"
                 "  users: { protocol: grpc, proto: demo/users/v1/users.proto, timeout: 5s,\n"
                 "           methods: { ListUsers: { timeout: 30s } } }\n"
                 "  orders: { protocol: grpc, proto: demo/orders/v1/orders.proto }\n"
                 "gateway: { http: 127.0.0.1:8080, grpc: 127.0.0.1:8443, routes: [\n"
                 "  { name: users, match: { grpc_service: demo.users.v1.Users }, to: users },\n"
                 "  { name: orders, match: { grpc_service: demo.orders.v1.Orders }, to: orders } ] }\n")
    return load_mesh(p)


def test_gateway_routes_and_filters_from_the_protos(tmp_path):
    view = pm.gateway_view(_mesh(tmp_path), {}, {})
    listeners = parse_resources(xdstypes.LISTENER, view[xdstypes.LISTENER].values())
    http, grpc = listeners[pm.GATEWAY_HTTP], listeners[pm.GATEWAY_GRPC]
    assert http.transcoder is not None and http.grpc_web and grpc.descriptor_set
    assert set(http.transcoder.services) == {"demo.users.v1.Users", "demo.orders.v1.Orders"}
    tables = parse_resources(xdstypes.ROUTE, view[xdstypes.ROUTE].values())
    routes = {r.name: r for vh in tables[pm.GATEWAY_GRPC].virtual_hosts for r in vh.routes}
    assert routes["users/GetUser"].timeout_s == 2.0            # proto option
    assert routes["users/ListUsers"].timeout_s == 30.0         # mesh.yaml methods override
    assert routes["users/Chat"].timeout_s is None              # a stream: no route timeout by default
    assert routes["users/CreateUsers"].timeout_s is None
    assert routes["orders/CreateOrder"].timeout_s == 4.0
    limit = routes["orders/GetOrder"].rate_limit
    assert (limit.max_tokens, limit.tokens_per_fill, limit.fill_interval_s, limit.resource_exhausted) == (120, 100, 1.0, True)
    http_routes = {r.name: r for vh in tables[pm.GATEWAY_HTTP].virtual_hosts for r in vh.routes}
    assert http_routes["orders/GetOrder"].rate_limit.resource_exhausted is False


def test_outbound_routes_carry_rpc_timeouts(tmp_path):
    table = pm.outbound_grpc_routes(_mesh(tmp_path))
    routes = {r.name: r for vh in table.virtual_hosts for r in vh.routes}
    assert routes["outbound-demo.users.v1.Users/GetUser"].route.timeout.seconds == 2
    assert not routes["outbound-demo.users.v1.Users/Chat"].route.HasField("timeout") or \
        routes["outbound-demo.users.v1.Users/Chat"].route.timeout.ToNanoseconds() == 0
