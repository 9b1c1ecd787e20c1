"""The resource view for real Envoy nodes (sidecar or gateway).

Same mesh, same shape as our own sidecar's view (socket listeners with an HttpConnectionManager
whose routes come over RDS/ADS, EDS clusters over ADS, HTTP/2 upstream options for gRPC
services), with the protomesh-only parts left out: the `protomesh.grpc_methods` listener metadata
is an extension of ours that Envoy has no use for.

An Envoy gateway may run beside ours: its node metadata can move the gateway listeners
(`protomesh.gateway_http` / `protomesh.gateway_grpc`), see `listen_overrides`.
"""
from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from control.model import Mesh
from control.registry import Registration
from control.translate import build
from control.translate import protomesh as pm
from protomesh import xdstypes

META_GATEWAY_HTTP = "protomesh.gateway_http"
META_GATEWAY_GRPC = "protomesh.gateway_grpc"


def listen_overrides(node) -> tuple[tuple[str, tuple[str, int]], ...]:
    """Gateway listen addresses a node asks for instead of mesh.yaml's (hashable, for caching)."""
    if not node.HasField("metadata"):
        return ()
    meta = json_format.MessageToDict(node.metadata)
    out = []
    for key, listener in ((META_GATEWAY_HTTP, pm.GATEWAY_HTTP), (META_GATEWAY_GRPC, pm.GATEWAY_GRPC)):
        host, sep, port = str(meta.get(key, "")).rpartition(":")
        if sep and port.isdigit():
            out.append((listener, (host, int(port))))
    return tuple(out)


def _listener(name, addr, route_config, grpc, direction, trace):
    return build.pack(build.listener(name, *addr, route_config, grpc, direction, trace))


def sidecar_view(mesh: Mesh, reg: Registration, endpoints: dict, clusters: dict) -> dict[str, dict]:
    svc = mesh.services.get(reg.service)
    protocol = reg.protocol or (svc.protocol if svc else "http")
    listeners, routes = {}, {}
    clusters = dict(clusters)
    trace = build.tracing(mesh.telemetry, f"envoy.{reg.service}")
    if reg.app and reg.inbound:
        name = pm.inbound_cluster(reg.service)
        clusters[name] = build.pack(build.cluster(name, "round_robin", protocol == "grpc",
                                                  svc.connect_timeout_s if svc else 1.0, static=[reg.app]))
        listeners[pm.INBOUND_LISTENER] = _listener(pm.INBOUND_LISTENER, reg.inbound, name, protocol == "grpc",
                                                   base_pb2.INBOUND, trace)
        routes[name] = build.pack(build.route_config(name, [build.vhost("app", ["*"], [
            build.route(f"inbound-{reg.service}", prefix="/", split=((name, 1),),
                        timeout_s=svc.timeout_s if svc else 15.0)])]))
    if reg.outbound_http:
        listeners[pm.OUTBOUND_HTTP] = _listener(pm.OUTBOUND_HTTP, reg.outbound_http, pm.OUTBOUND_HTTP, False,
                                                base_pb2.OUTBOUND, trace)
        routes[pm.OUTBOUND_HTTP] = build.pack(pm.outbound_http_routes(mesh))
    if reg.outbound_grpc:
        listeners[pm.OUTBOUND_GRPC] = _listener(pm.OUTBOUND_GRPC, reg.outbound_grpc, pm.OUTBOUND_GRPC, True,
                                                base_pb2.OUTBOUND, trace)
        routes[pm.OUTBOUND_GRPC] = build.pack(pm.outbound_grpc_routes(mesh))
    return {xdstypes.CLUSTER: clusters, xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: routes}


def gateway_view(mesh: Mesh, endpoints: dict, clusters: dict, overrides=()) -> dict[str, dict]:
    listeners, routes = {}, {}
    gw = mesh.gateway
    moved = dict(overrides)
    if gw is not None:
        by_protocol = pm.gateway_routes(mesh)  # the same routes and policies as our gateway
        trace = build.tracing(mesh.telemetry, "envoy.gateway")
        for protocol, addr, name in (("http", gw.http, pm.GATEWAY_HTTP), ("grpc", gw.grpc, pm.GATEWAY_GRPC)):
            addr = moved.get(name, addr)
            if addr is None:
                continue
            listeners[name] = build.pack(build.with_http_filters(
                build.listener(name, *addr, name, protocol == "grpc", base_pb2.UNSPECIFIED, trace,
                               stream_idle_timeout_s=gw.stream_idle_timeout_s),
                pm.gateway_http_filters(mesh, protocol) + pm.fault_filters(mesh)))  # + fault (issue 4)
            routes[name] = build.pack(build.route_config(name, [build.vhost(name, ["*"], by_protocol[protocol])]))
    return {xdstypes.CLUSTER: clusters, xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: routes}
