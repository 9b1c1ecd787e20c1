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

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from protomesh.telemetry import extract_context, inject_headers
from sidecar import call as calls
from sidecar.accesslog import AccessLog
from sidecar.call import Call, Reply
from sidecar.config.model import Cluster, Endpoint, Route, RuntimeConfig
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
        self.tracer = trace.get_tracer("protomesh.sidecar")

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
        parent = extract_context(call.headers)
        kind_attrs = _span_attrs(call)
        name = f"{call.grpc_service}/{call.grpc_method}" if call.protocol == "grpc" else \
            f"{call.method} {call.path.partition('?')[0]}"
        call.span = self.tracer.start_span(f"{call.listener} {name}", context=parent,
                                           kind=SpanKind.SERVER, attributes=kind_attrs)

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
        """Open the client span for the upstream attempt; return the trace headers to send."""
        server = call.span
        client = self.tracer.start_span(
            f"{call.listener} -> {call.cluster}", context=trace.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            attributes={"server.address": call.upstream.rsplit(":", 1)[0],
                        "server.port": int(call.upstream.rsplit(":", 1)[1]),
                        "protomesh.cluster": call.cluster})
        call.extra["client_span"] = client
        ctx = trace.set_span_in_context(client)
        token = otel_context.attach(ctx)
        try:
            return inject_headers()
        finally:
            otel_context.detach(token)

    def finish(self, call: Call, target: Target | None, status: int, reason: str = "",
               grpc_status: int | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Exactly once per request: release the endpoint, close spans, count, log."""
        elapsed_ms = (time.perf_counter() - call.start) * 1000.0
        if target is not None:
            b = self.balancers.get(target.cluster.name)
            if b is not None:
                b.release(target.endpoint)
        failed = status >= 500 if grpc_status is None else grpc_status not in (0,)
        for key in ("client_span", None):
            span = call.extra.pop(key, None) if key else call.span
            if span is None:
                continue
            if call.protocol == "grpc":
                span.set_attribute("rpc.grpc.status_code", grpc_status if grpc_status is not None else 2)
            else:
                span.set_attribute("http.response.status_code", status)
            if call.route_name:
                span.set_attribute("protomesh.route", call.route_name)
            if reason:
                span.set_attribute("protomesh.reason", reason)
            if failed:
                span.set_status(Status(StatusCode.ERROR, reason or None))
            span.end()
        code = str(grpc_status) if call.protocol == "grpc" else str(status)
        labels = (("listener", call.listener), ("route", call.route_name or "-"),
                  ("cluster", call.cluster or "-"), ("code", code))
        self.stats.inc("requests", labels)
        self.stats.observe_ms("request_duration", (("listener", call.listener),
                                                   ("cluster", call.cluster or "-")), elapsed_ms)
        if reason:
            self.stats.inc("local_replies", (("listener", call.listener), ("reason", reason)))
        trace_id = ""
        if call.span is not None:
            ctx = call.span.get_span_context()
            if ctx.is_valid:
                trace_id = format(ctx.trace_id, "032x")
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


def local_reply_reason(reply: Reply, call: Call) -> str:
    return reply.reason_value(call)
