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
from control.sources.options import rate_limit, route_timeout, rpc_retries, service_policies
from control.translate import build
from protomesh import xdstypes

INBOUND_LISTENER = "inbound"
OUTBOUND_HTTP = "outbound_http"
OUTBOUND_GRPC = "outbound_grpc"
GATEWAY_HTTP = "gateway_http"
GATEWAY_GRPC = "gateway_grpc"


def inbound_cluster(service: str) -> str:
    return f"inbound|{service}"


def endpoints_view(mesh: Mesh, registry: Registry, previous: dict | None = None,
                   services: set[str] | None = None) -> dict:
    """ClusterLoadAssignments for every mesh service: static endpoints plus live registrations.
    With `previous` and `services`, only those services are rebuilt and every other assignment is
    the previous object (so its digest stays cached and nothing new is serialized for it)."""
    out = {}
    for name, svc in sorted(mesh.services.items()):
        if previous is not None and services is not None and name not in services and name in previous:
            out[name] = previous[name]
            continue
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
            *(rpc_timeout_routes(svc, "inbound", name, traffic=False) if svc else ()),
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
    routes = []
    for name, s in sorted(mesh.services.items()):
        routes.extend(rpc_timeout_routes(s, "outbound", name))
        routes.extend(build.apply_traffic_route(build.route(f"outbound-{g.full_name}", prefix=f"/{g.full_name}/",
                                                            grpc=True, split=((name, 1),), timeout_s=s.timeout_s),
                                                s.traffic, False) for g in s.grpc_services)
    return build.route_config(OUTBOUND_GRPC, [build.vhost("grpc", ["*"], routes)])


def gateway_routes(mesh: Mesh) -> dict[str, list]:
    """mesh.yaml's gateway routes by the protocol of their target, with the target service's
    retry and hash policies (a split's targets may differ in policy: none is applied)."""
    by_protocol: dict[str, list] = {"http": [], "grpc": []}
    for r in mesh.gateway.routes:
        svc = mesh.services[r.split[0][0]]
        if r.grpc:  # per-rpc routes first: the rpc's timeout and rate limit (from its proto)
            for http in (False, True):
                by_protocol["http" if http else "grpc"].extend(gateway_rpc_routes(r, svc, http))
        route = build.gateway_route(r, svc.timeout_s)
        if len(r.split) == 1:
            build.apply_traffic_route(route, svc.traffic, svc.protocol == "http")
        by_protocol[svc.protocol].append(route)
    return by_protocol


def gateway_rpc_routes(r, svc, http: bool) -> list:
    """One route per rpc a gRPC gateway route covers (`path: /pkg.Service/Method`), with the rpc's
    effective timeout (an explicit `timeout` on the gateway route wins) and its rate limit.  On the
    HTTP listener the same routes carry transcoded and gRPC-Web requests to the gRPC cluster."""
    from dataclasses import replace
    policies = service_policies(svc)
    out = []
    for path, pol in policies.items():
        if not (path == r.path_value if r.path_kind == "path" else path.startswith(r.path_value)):
            continue
        timeout = r.timeout_s if r.timeout_s is not None else route_timeout(pol)
        rr = replace(r, name=f"{r.name}/{path.rsplit('/', 1)[1]}", path_kind="path", path_value=path,
                     timeout_s=timeout if timeout is not None else 0.0, rewrite_prefix=None)
        route = build.gateway_route(rr, None)
        if len(r.split) == 1:
            rpc_traffic(route, svc, pol)
        limit = rate_limit(pol)
        if limit is not None:
            build.route_rate_limit(route, *limit, grpc=not http)
        out.append(route)
    return out


def transcoded_services(mesh: Mesh) -> tuple[bytes, list[str]]:
    """The descriptor set and gRPC service names the gateway exposes (those its gRPC routes name)."""
    from control.sources.protos import merge_descriptor_sets
    names, sets = set(), []
    for r in (mesh.gateway.routes if mesh.gateway else ()):
        if not r.grpc:
            continue
        full = r.path_value.strip("/").split("/")[0]
        for s in mesh.services.values():
            for g in s.grpc_services:
                if g.full_name == full and g.descriptor_set:
                    names.add(full)
                    sets.append(g.descriptor_set)
    return (merge_descriptor_sets(sets) if sets else b""), sorted(names)


def gateway_http_filters(mesh: Mesh, protocol: str) -> list:
    """HTTP filters (before the router) of the gateway's listeners, for Envoy and our sidecar alike:
    gRPC-Web and JSON transcoding on the HTTP listener, per-rpc local rate limits on both."""
    fds, names = transcoded_services(mesh)
    if not names:
        return []
    out = [build.grpc_web_filter(), build.transcoder_filter(fds, names)] if protocol == "http" else []
    return out + [build.ratelimit_filter()]


def fault_filters(mesh: Mesh) -> list:
    """Envoy's fault filter (injecting nothing itself) when some service has `fault`: routes
    carry their faults in typed_per_filter_config, which Envoy applies only with it in the chain."""
    return [build.fault_filter()] if any(s.traffic.fault for s in mesh.services.values()) else []


def gateway_view(mesh: Mesh, endpoints: dict, clusters: dict) -> dict[str, dict]:
    listeners, routes = {}, {}
    gw = mesh.gateway
    if gw is not None:
        by_protocol = gateway_routes(mesh)
        for protocol, addr, name in (("http", gw.http, GATEWAY_HTTP), ("grpc", gw.grpc, GATEWAY_GRPC)):
            if addr is None:
                continue
            lst = build.with_http_filters(build.listener(name, *addr, name, protocol == "grpc",
                                                         trace=build.tracing(mesh.telemetry, "sidecar.gateway"),
                                                         methods=mesh_grpc_methods(mesh),
                                                         stream_idle_timeout_s=gw.stream_idle_timeout_s),
                                          gateway_http_filters(mesh, protocol))
            if protocol == "grpc":
                build.with_descriptors(lst, transcoded_services(mesh)[0])
            build.with_http_filters(lst, fault_filters(mesh))  # issue 4: per-route faults need it in the chain
            listeners[name] = build.pack(lst)
            routes[name] = build.pack(build.route_config(name, [build.vhost(name, ["*"], by_protocol[protocol])]))
        for t in gw.tcp:  # issue 4: L4 listeners (Envoy's TcpProxy)
            listeners[t.name] = build.pack(build.tcp_listener(t.name, *t.listen, t.to, t.idle_timeout_s,
                                                              t.connect_attempts))
    return {xdstypes.CLUSTER: clusters, xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: routes}


def rpc_timeout_routes(svc, prefix: str, cluster: str, traffic: bool = True) -> list:
    """`path: /pkg.Service/Method` routes for the rpcs whose effective timeout or retry policy
    differs from the service's (a proto option, a mesh.yaml methods override, a stream that must
    not be cut, an rpc that is not safe to retry)."""
    out = []
    for path, pol in service_policies(svc).items():
        timeout = route_timeout(pol)
        if timeout == svc.timeout_s and (not traffic or rpc_retries(pol, svc.traffic.retries) == svc.traffic.retries):
            continue
        route = build.route(f"{prefix}-{path.strip('/')}", path=path, grpc=True, split=((cluster, 1),),
                            timeout_s=timeout)
        out.append(rpc_traffic(route, svc, pol) if traffic else route)
    return out


def rpc_traffic(route, svc, pol):
    """The service's hash policies and the rpc's own retry policy (see `rpc_retries`: only
    what is safe for that rpc) on its per-rpc route."""
    from dataclasses import replace
    return build.apply_traffic_route(route, replace(svc.traffic, retries=rpc_retries(pol, svc.traffic.retries)), False)
