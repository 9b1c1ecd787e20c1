"""The resource view for proxyless gRPC clients (grpcio's `xds:///<target>` resolver).

A grpc client resolving `xds:///users` asks LDS for a listener named exactly `users`; that
listener is an *API listener* (no socket) whose HttpConnectionManager carries the routes inline.
Clusters are EDS over ADS.  Every locality carries a `load_balancing_weight` (see
`build.load_assignment`): grpc's weighted-target balancer gives a locality without one no
traffic, silently.  grpc also refuses a locality without its `locality` name (NACK), which our
sidecar would refuse if present, so the proxyless view names it.  Envoy ignores API listeners, which is why Envoy and grpc get different
listener views from one mesh.
"""
from __future__ import annotations

from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from control.model import Mesh
from control.translate import build
from protomesh import xdstypes


def api_listener(name: str, cluster: str, timeout_s: float | None) -> listener_pb2.Listener:
    routes = build.route_config(name, [build.vhost(name, ["*"], [
        build.route(f"proxyless-{name}", prefix="/", split=((cluster, 1),), timeout_s=timeout_s)])])
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name, route_config=routes,
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                         typed_config=build.pack(router_pb2.Router()))])
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=build.pack(hcm)))


def clusters(mesh: Mesh) -> dict:
    """EDS clusters without Envoy's upstream-protocol options (grpc always speaks HTTP/2)."""
    return {name: build.pack(build.cluster(name, s.lb, False, s.connect_timeout_s))
            for name, s in sorted(mesh.services.items())}


LOCALITY = "protomesh"


def endpoints(shared_endpoints: dict) -> dict:
    return {name: build.with_locality(cla, LOCALITY) for name, cla in shared_endpoints.items()}


def client_view(mesh: Mesh, endpoints: dict) -> dict[str, dict]:
    """`endpoints`: from `endpoints(...)` (localities named)."""
    listeners = {name: build.pack(api_listener(name, name, s.timeout_s))
                 for name, s in sorted(mesh.services.items()) if s.protocol == "grpc"}
    return {xdstypes.CLUSTER: clusters(mesh), xdstypes.ENDPOINT: endpoints,
            xdstypes.LISTENER: listeners, xdstypes.ROUTE: {}}
