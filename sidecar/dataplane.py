"""What a listener needs from the rest of the sidecar: route, pick, trace, count, log.

Listeners call, per request: `begin(call)` → `route(call)` (a `Target` or a local `Reply`) →
`upstream_headers(call)` when they forward → `finish(...)` exactly once.  The config is read
once per request (`self.config` is replaced whole on updates), so a request in flight finishes
on the config it started with.  Balancer state is keyed by cluster name and survives swaps.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sidecar import call as calls
from sidecar.accesslog import AccessLog
from sidecar.call import Call, Reply
from sidecar.config.model import Cluster, Endpoint, Route, RuntimeConfig
from sidecar.spans import SpanRecorder
from sidecar.stats import Stats
from sidecar.upstream.balance import Balancer


@dataclass(slots=True)
class Target:
    """Where one request goes: the chosen route, cluster and endpoint, and the upstream path."""

    route: Route
    cluster: Cluster
    endpoint: Endpoint
    path: str
    timeout_s: float | None


class Dataplane:
    def __init__(self, node_id: str, stats: Stats | None = None, access_log: AccessLog | None = None,
                 rand=random.random):
        self.node_id = node_id
        self.config = RuntimeConfig()
        self.stats = stats or Stats()
        self.access_log = access_log or AccessLog(None)
        self.balancers: dict[str, Balancer] = {}
        self.rand = rand
        self.spans = SpanRecorder()  # replaced by one that exports once tracing is configured

    # ---- config ---------------------------------------------------------------------------
    def swap(self, config: RuntimeConfig) -> None:
        """Replace the config whole; balancers of clusters still present keep their state."""
        balancers = {}
        for name, cluster in config.clusters.items():
            b = self.balancers.get(name)
            if b is None or b.policy != cluster.lb_policy:
                b = Balancer(cluster.lb_policy, self.rand)
                if name in self.balancers:
                    b.active = self.balancers[name].active
            balancers[name] = b
        self.balancers = balancers
        self.config = config

    # ---- per request ----------------------------------------------------------------------
    def begin(self, call: Call) -> None:
        """Start the server span, continuing the caller's trace."""
        call.start = time.perf_counter()
        name = f"{call.grpc_service}/{call.grpc_method}" if call.protocol == "grpc" else \
            f"{call.method} {call.path.partition('?')[0]}"
        call.span = self.spans.start_server(call.headers.get("traceparent"), f"{call.listener} {name}",
                                            _span_attrs(call))

    def route(self, call: Call) -> Target | Reply:
        config = self.config
        listener = config.listeners.get(call.listener)
        if listener is None:
            return calls.no_config(call.listener)
        table = config.routes_for(listener)
        if table is None:
            return calls.no_config(call.listener)
        route = table.select(call.authority, call.path, call.headers)
        if route is None:
            return calls.no_route(call)
        call.route_name = route.name
        cluster_name = route.pick_cluster(self.rand())
        call.cluster = cluster_name
        cluster = config.clusters.get(cluster_name)
        if cluster is None:
            return calls.no_cluster(cluster_name)
        endpoint = self.balancers[cluster_name].pick(config.endpoints_for(cluster))
        if endpoint is None:
            return calls.no_healthy_upstream(cluster_name)
        call.upstream = endpoint.address
        return Target(route, cluster, endpoint, route.rewrite(call.path), route.timeout_s)

    def upstream_headers(self, call: Call) -> list[tuple[str, str]]:
        """Open the client span for the upstream attempt; return the trace headers to send
        (our traceparent; the caller's tracestate and baggage unchanged)."""
        host, _, port = call.upstream.rpartition(":")
        client = self.spans.start_client(call.span, f"{call.listener} -> {call.cluster}", {
            "server.address": host, "server.port": int(port), "protomesh.cluster": call.cluster})
        call.extra["client_span"] = client
        out = [("traceparent", client.traceparent())]
        for key in ("tracestate", "baggage"):
            value = call.headers.get(key)
            if value:
                out.append((key, value))
        return out

    def finish(self, call: Call, target: Target | None, status: int, reason: str = "",
               grpc_status: int | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Exactly once per request: release the endpoint, close spans, count, log."""
        elapsed_ms = (time.perf_counter() - call.start) * 1000.0
        if target is not None:
            b = self.balancers.get(target.cluster.name)
            if b is not None:
                b.release(target.endpoint)
        failed = status >= 500 if grpc_status is None else grpc_status != 0
        for span in (call.extra.pop("client_span", None), call.span):
            if span is None:
                continue
            if span.sampled:
                attrs = span.attributes
                if call.protocol == "grpc":
                    attrs["rpc.grpc.status_code"] = grpc_status if grpc_status is not None else 2
                else:
                    attrs["http.response.status_code"] = status
                if call.route_name:
                    attrs["protomesh.route"] = call.route_name
                if reason:
                    attrs["protomesh.reason"] = reason
                if failed:
                    span.error = True
                    span.message = reason
            self.spans.end(span)
        code = str(grpc_status) if call.protocol == "grpc" else str(status)
        labels = (("listener", call.listener), ("route", call.route_name or "-"),
                  ("cluster", call.cluster or "-"), ("code", code))
        self.stats.inc("requests", labels)
        self.stats.observe_ms("request_duration", (("listener", call.listener),
                                                   ("cluster", call.cluster or "-")), elapsed_ms)
        if reason:
            self.stats.inc("local_replies", (("listener", call.listener), ("reason", reason)))
        trace_id = call.span.trace_id_hex if call.span is not None else ""
        self.access_log.write({
            "listener": call.listener, "protocol": call.protocol, "method": call.method,
            "authority": call.authority, "path": call.path, "peer": call.peer,
            "route": call.route_name, "cluster": call.cluster, "upstream": call.upstream,
            "status": status, "grpc_status": grpc_status, "reason": reason,
            "duration_ms": round(elapsed_ms, 3), "bytes_in": bytes_in, "bytes_out": bytes_out,
            "trace_id": trace_id,
        })


def _span_attrs(call: Call) -> dict:
    host, _, port = call.peer.rpartition(":")
    attrs = {"client.address": host, "protomesh.listener": call.listener}
    if port.isdigit():
        attrs["client.port"] = int(port)
    if call.protocol == "grpc":
        attrs.update({"rpc.system": "grpc", "rpc.service": call.grpc_service,
                      "rpc.method": call.grpc_method})
    else:
        attrs.update({"http.request.method": call.method, "url.path": call.path.partition("?")[0],
                      "server.address": call.authority})
    return attrs
