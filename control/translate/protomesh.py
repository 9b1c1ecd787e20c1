"""The resource view for protomesh sidecars and the protomesh gateway.

A sidecar of service S gets: a cluster per mesh service (EDS) plus `inbound|S` (STATIC, the
local app); an `inbound` listener on its announced inbound address routing to the app; and
outbound listeners for HTTP (virtual host per HTTP service, by Host) and gRPC (a route per gRPC
service, by `/pkg.Service/` path).  The gateway gets the gateway routes of mesh.yaml, each on
the listener that speaks its target's protocol.
"""
from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from control.model import Mesh
from control.registry import Registration, Registry
from control.translate import build
from protomesh import xdstypes

INBOUND_LISTENER = "inbound"
OUTBOUND_HTTP = "outbound_http"
OUTBOUND_GRPC = "outbound_grpc"
GATEWAY_HTTP = "gateway_http"
GATEWAY_GRPC = "gateway_grpc"


def inbound_cluster(service: str) -> str:
    return f"inbound|{service}"


def endpoints_view(mesh: Mesh, registry: Registry) -> dict:
    """ClusterLoadAssignments for every mesh service: static endpoints plus live registrations."""
    out = {}
    for name, svc in sorted(mesh.services.items()):
        eps = [(h, p, (("source", "static"),)) for h, p in svc.endpoints]
        for reg in registry.endpoints(name):
            eps.append((reg.advertise[0], reg.advertise[1], (("node", reg.node_id),) + reg.labels))
        out[name] = build.pack(build.load_assignment(name, eps))
    return out


def shared_clusters(mesh: Mesh) -> dict:
    return {name: build.pack(build.apply_traffic_cluster(
                build.cluster(name, s.lb, s.protocol == "grpc", s.connect_timeout_s), s.traffic))
            for name, s in sorted(mesh.services.items())}


def sidecar_view(mesh: Mesh, reg: Registration, endpoints: dict, clusters: dict) -> dict[str, dict]:
    svc = mesh.services.get(reg.service)
    protocol = reg.protocol or (svc.protocol if svc else "http")
    listeners, routes = {}, {}
    clusters = dict(clusters)
    trace = build.tracing(mesh.telemetry, f"sidecar.{reg.service}")
    methods = mesh_grpc_methods(mesh)
    if reg.app and reg.inbound:
        name = inbound_cluster(reg.service)
        clusters[name] = build.pack(build.cluster(name, "round_robin", protocol == "grpc",
                                                  svc.connect_timeout_s if svc else 1.0, static=[reg.app]))
        listeners[INBOUND_LISTENER] = build.pack(build.listener(
            INBOUND_LISTENER, *reg.inbound, name, protocol == "grpc", base_pb2.INBOUND, trace, methods))
        routes[name] = build.pack(build.route_config(name, [build.vhost("app", ["*"], [
            build.route(f"inbound-{reg.service}", prefix="/", split=((name, 1),),
                        timeout_s=svc.timeout_s if svc else 15.0)])]))
    if reg.outbound_http:
        listeners[OUTBOUND_HTTP] = build.pack(build.listener(
            OUTBOUND_HTTP, *reg.outbound_http, OUTBOUND_HTTP, False, base_pb2.OUTBOUND, trace))
        routes[OUTBOUND_HTTP] = build.pack(outbound_http_routes(mesh))
    if reg.outbound_grpc:
        listeners[OUTBOUND_GRPC] = build.pack(build.listener(
            OUTBOUND_GRPC, *reg.outbound_grpc, OUTBOUND_GRPC, True, base_pb2.OUTBOUND, trace, methods))
        routes[OUTBOUND_GRPC] = build.pack(outbound_grpc_routes(mesh))
    return {xdstypes.CLUSTER: clusters, xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: routes}


def mesh_grpc_methods(mesh: Mesh):
    return build.grpc_methods(g for s in mesh.services.values() for g in s.grpc_services)


def outbound_http_routes(mesh: Mesh):
    vhosts = [build.vhost(name, [name, f"{name}.mesh"], [build.apply_traffic_route(
        build.route(f"outbound-{name}", prefix="/", split=((name, 1),), timeout_s=s.timeout_s), s.traffic, True)])
        for name, s in sorted(mesh.services.items()) if s.protocol == "http"]
    return build.route_config(OUTBOUND_HTTP, vhosts)


def outbound_grpc_routes(mesh: Mesh):
    routes = [build.apply_traffic_route(build.route(f"outbound-{g.full_name}", prefix=f"/{g.full_name}/", grpc=True,
                                                    split=((name, 1),), timeout_s=s.timeout_s), s.traffic, False)
              for name, s in sorted(mesh.services.items()) for g in s.grpc_services]
    return build.route_config(OUTBOUND_GRPC, [build.vhost("grpc", ["*"], routes)])


def gateway_routes(mesh: Mesh) -> dict[str, list]:
    """mesh.yaml's gateway routes by the protocol of their target, with the target service's
    retry and hash policies (a split's targets may differ in policy: none is applied)."""
    by_protocol: dict[str, list] = {"http": [], "grpc": []}
    for r in mesh.gateway.routes:
        svc = mesh.services[r.split[0][0]]
        route = build.gateway_route(r, svc.timeout_s)
        if len(r.split) == 1:
            build.apply_traffic_route(route, svc.traffic, svc.protocol == "http")
        by_protocol[svc.protocol].append(route)
    return by_protocol


def gateway_view(mesh: Mesh, endpoints: dict, clusters: dict) -> dict[str, dict]:
    listeners, routes = {}, {}
    gw = mesh.gateway
    if gw is not None:
        by_protocol = gateway_routes(mesh)
        for protocol, addr, name in (("http", gw.http, GATEWAY_HTTP), ("grpc", gw.grpc, GATEWAY_GRPC)):
            if addr is None:
                continue
            listeners[name] = build.pack(build.listener(name, *addr, name, protocol == "grpc",
                                                        trace=build.tracing(mesh.telemetry, "sidecar.gateway"),
                                                        methods=mesh_grpc_methods(mesh)))
            routes[name] = build.pack(build.route_config(name, [build.vhost(name, ["*"], by_protocol[protocol])]))
    return {xdstypes.CLUSTER: clusters, xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: routes}
