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
from sidecar.accesslog import AccessLog, request_line
from sidecar.call import Call, Reply
from sidecar.config.model import Cluster, Endpoint, Route, RuntimeConfig, parse_query
from sidecar.filters import fault, ratelimit
from sidecar.spans import SpanRecorder
from sidecar.stats import Stats
from sidecar.upstream import breaker, retry
from sidecar.upstream.balance import Balancer
from sidecar.upstream.hashing import hash64
from sidecar.upstream.hosts import HostSet, host_set
from sidecar.upstream.outlier import OutlierDetector


@dataclass(slots=True)
class Target:
    """Where one request goes: the chosen route, cluster and endpoint, and the upstream path."""

    route: Route
    cluster: Cluster
    endpoint: Endpoint
    path: str
    timeout_s: float | None


class ClusterState:
    """The live side of one cluster, surviving config swaps: balancer, breaker counts, outlier
    detector, active health check verdicts, and the host set derived from them (recomputed only
    when endpoints or health change)."""

    __slots__ = ("balancer", "breaker", "outlier", "hc_unhealthy", "gen", "_hs_for", "_hs")

    def __init__(self, balancer: Balancer):
        self.balancer = balancer
        self.breaker = breaker.BreakerState()
        self.outlier: OutlierDetector | None = None
        self.hc_unhealthy: set[str] = set()  # failing active health checks (or never checked yet)
        self.gen = 0  # bumped on every health/ejection change
        self._hs_for: tuple | None = None  # (endpoints, gen, panic threshold) the host set was made for
        self._hs: HostSet | None = None

    def hosts(self, endpoints: tuple[Endpoint, ...], panic_threshold: float) -> HostSet:
        made_for = self._hs_for
        if made_for is None or made_for[0] is not endpoints or made_for[1:] != (self.gen, panic_threshold):
            unhealthy = self.hc_unhealthy if self.outlier is None else self.hc_unhealthy | self.outlier.ejected
            self._hs = host_set(endpoints, unhealthy, panic_threshold)
            self._hs_for = (endpoints, self.gen, panic_threshold)
        return self._hs

    def changed(self) -> None:
        self.gen += 1


class Dataplane:
    def __init__(self, node_id: str, stats: Stats | None = None, access_log: AccessLog | None = None,
                 rand=random.random, clock=time.monotonic):
        self.node_id = node_id
        self.config = RuntimeConfig()
        self.stats = stats or Stats()
        self.access_log = access_log or AccessLog(None)
        self.clusters: dict[str, ClusterState] = {}
        self.rand = rand
        self.clock = clock
        self.spans = SpanRecorder()  # replaced by one that exports once tracing is configured
        self.on_swap = None  # set by the health checker: called with each new config
        self.buckets = ratelimit.Buckets()  # per-route token buckets; survive config swaps
        # (listener, route, cluster, code) -> the Stats keys of its counter and histogram, so a
        # request does not rebuild the label tuples; as many entries as the metrics have series.
        self._stat_keys: dict[tuple, tuple] = {}

    @property
    def balancers(self) -> dict[str, Balancer]:
        return {name: st.balancer for name, st in self.clusters.items()}

    # ---- config ---------------------------------------------------------------------------
    def swap(self, config: RuntimeConfig) -> None:
        """Replace the config whole; state of clusters still present survives."""
        states = {}
        for name, cluster in config.clusters.items():
            st = self.clusters.get(name)
            b = st.balancer if st is not None else None
            if b is None or b.policy != cluster.lb_policy or (b.ring_min, b.ring_max, b.maglev_size) != (
                    cluster.ring_min, cluster.ring_max, cluster.maglev_table):
                nb = Balancer(cluster.lb_policy, self.rand, ring_min=cluster.ring_min,
                              ring_max=cluster.ring_max, maglev_size=cluster.maglev_table)
                if b is not None:
                    nb.active, nb.served = b.active, b.served
                b = nb
            if st is None:
                st = ClusterState(b)
            st.balancer = b
            if cluster.outlier is None:
                st.outlier = None
            elif st.outlier is None or st.outlier.policy != cluster.outlier:
                old = st.outlier
                st.outlier = OutlierDetector(cluster.outlier, self.rand)
                if old is not None:
                    st.outlier.hosts, st.outlier.ejected = old.hosts, old.ejected
                st.outlier.next_sweep = self.clock() + cluster.outlier.interval_s
            if not cluster.health_checks and st.hc_unhealthy:
                st.hc_unhealthy = set()
            st.changed()
            states[name] = st
        self.clusters = states
        self.config = config
        if self.on_swap is not None:
            self.on_swap(config)

    # ---- per request ----------------------------------------------------------------------
    def begin(self, call: Call) -> None:
        """Start the server span, continuing the caller's trace.  Its name and attributes are
        filled in by `finish`, and only for a span that will be exported."""
        call.start = time.perf_counter()
        call.span = self.spans.start_server(call.headers.get("traceparent"), "", None)

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
        if route.fault is not None:  # issue 4: a fault.Hold (listener waits, routes again) or an abort
            injected = fault.inject(route.fault, call, self.rand, self.stats)
            if injected is not None:
                return injected
        bucket = route.rate_limit
        if bucket is not None and not self.buckets.take(route.name, bucket, self.clock()):
            self.stats.inc("rate_limited", (("listener", call.listener), ("route", route.name)))
            return ratelimit.limited(route.name, bucket)
        cluster_name = route.pick_cluster(self.rand())
        call.cluster = cluster_name
        cluster = config.clusters.get(cluster_name)
        if cluster is None:
            return calls.no_cluster(cluster_name)
        st = self.clusters[cluster_name]
        limit = breaker.admit_request(cluster.breaker, st.breaker)
        if limit is not None:
            return self._overflow(st, cluster_name, limit)
        endpoint = self._pick(st, cluster, route, call)
        if endpoint is None:
            return calls.no_healthy_upstream(cluster_name)
        st.breaker.requests += 1
        call.upstream = endpoint.address
        return Target(route, cluster, endpoint, route.rewrite(call.path), route.timeout_s)

    def _overflow(self, st: ClusterState, cluster: str, limit: str) -> Reply:
        breaker.note_overflow(st.breaker, limit)
        self.stats.inc("circuit_breaker_overflow", (("cluster", cluster), ("limit", limit)))
        return breaker.overflow_reply(cluster, limit)

    def _pick(self, st: ClusterState, cluster: Cluster, route: Route, call: Call,
              avoid: set | None = None, attempts: int = 1) -> Endpoint | None:
        outlier = st.outlier
        if outlier is not None:
            now = self.clock()
            if now >= outlier.next_sweep:
                self._sweep(st, cluster, now)
        hosts = st.hosts(self.config.endpoints_for(cluster), cluster.panic_threshold).pick_level(self.rand)
        b = st.balancer
        key = hash_key(route, call) if route.hash_policies and b.policy in ("ring_hash", "maglev") else None
        ep = b.pick(hosts, key)
        while avoid and ep is not None and ep.address in avoid and attempts > 0 and len(hosts) > 1:
            attempts -= 1
            b.release(ep)
            ep = b.pick(hosts, None if key is None else hash64(f"{key}:{attempts}"))
        return ep

    def _sweep(self, st: ClusterState, cluster: Cluster, now: float) -> None:
        if st.outlier.sweep(now, (e.address for e in self.config.endpoints_for(cluster))):
            st.changed()

    def sweep_all(self) -> None:
        """Outlier sweeps for clusters that saw no traffic lately (so /clusters stays true)."""
        now = self.clock()
        for name, st in self.clusters.items():
            cluster = self.config.clusters.get(name)
            if st.outlier is not None and cluster is not None and now >= st.outlier.next_sweep:
                self._sweep(st, cluster, now)

    def retarget(self, call: Call, target: Target, tried: set) -> Target | Reply:
        """A new endpoint of the same cluster for a retry (the previous one is released)."""
        st = self.clusters.get(target.cluster.name)
        if st is None:
            return calls.no_cluster(target.cluster.name)
        st.balancer.release(target.endpoint)
        policy = target.route.retry
        avoid = tried if policy is not None and policy.avoid_previous_hosts else None
        ep = self._pick(st, target.cluster, target.route, call, avoid,
                        policy.host_selection_attempts if policy is not None else 1)
        if ep is None:
            st.breaker.requests -= 1
            return calls.no_healthy_upstream(target.cluster.name)
        call.upstream = ep.address
        return Target(target.route, target.cluster, ep, target.path, target.timeout_s)

    def report(self, target: Target, status: int) -> None:
        """One attempt's result for passive health (local failures as 502/503/504)."""
        st = self.clusters.get(target.cluster.name)
        if st is None or st.outlier is None:
            return
        if st.outlier.record(target.endpoint.address, status, self.clock()):
            st.changed()
            self.stats.inc("outlier_ejections", (("cluster", target.cluster.name),))

    def admit_retry(self, target: Target) -> bool:
        st = self.clusters.get(target.cluster.name)
        if st is None:
            return False
        if breaker.admit_retry(target.cluster.breaker, st.breaker):
            st.breaker.retries += 1
            return True
        breaker.note_overflow(st.breaker, "retries")
        self.stats.inc("retry_overflow", (("cluster", target.cluster.name),))
        return False

    def may_retry_grpc(self, call: Call, target: Target, kind: str | None, code: int, attempts: int) -> bool:
        """The route's policy covers this failed gRPC attempt and the retry budget admits
        another (then it is counted as active); a refusal's reason goes to the access log."""
        why = retry.grpc_refusal(target.route.retry, kind, code, attempts, call.method, call.headers)
        if why is None and not self.admit_retry(target):
            why = "retry_budget_exhausted"
        if why:
            call.extra["retry_note"] = why
        return why is None

    def retry_done(self, target: Target) -> None:
        st = self.clusters.get(target.cluster.name)
        if st is not None and st.breaker.retries > 0:
            st.breaker.retries -= 1

    def upstream_headers(self, call: Call) -> list[tuple[str, str]]:
        """Open the client span for the upstream attempt; return the trace headers to send
        (our traceparent; the caller's tracestate and baggage unchanged).  A span that will not
        be exported is not made at all: the upstream only needs a fresh span id in traceparent."""
        spans, server = self.spans, call.span
        if spans.records and server.sampled:
            client = spans.start_client(server, "", None)
            call.extra["client_span"] = client
            traceparent = client.traceparent()
        else:
            traceparent = spans.child_traceparent(server)
        out = [("traceparent", traceparent)]
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
            st = self.clusters.get(target.cluster.name)
            if st is not None:
                st.balancer.release(target.endpoint)
                if st.breaker.requests > 0:
                    st.breaker.requests -= 1
        client = call.extra.pop("client_span", None)
        spans = self.spans
        if spans.records:
            failed = status >= 500 if grpc_status is None else grpc_status != 0
            for span in (client, call.span):
                if span is None:
                    continue
                if span.sampled:
                    _describe_span(span, span is client, call, status, grpc_status, reason, failed)
                spans.end(span)
        flat = (call.listener, call.route_name, call.cluster,
                grpc_status if call.protocol == "grpc" else status)
        keys = self._stat_keys.get(flat)
        if keys is None:
            keys = self._stat_keys[flat] = _request_stat_keys(*flat)
        stats = self.stats
        stats.inc_key(keys[0])
        stats.observe_key(keys[1], elapsed_ms)
        if reason:
            self.stats.inc("local_replies", (("listener", call.listener), ("reason", reason)))
        log = self.access_log
        if log.enabled:
            extra = call.extra
            log.write_line(request_line(
                call.listener, call.protocol, call.method, call.authority, call.path, call.peer,
                call.route_name, call.cluster, call.upstream, status, grpc_status, reason,
                elapsed_ms, bytes_in, bytes_out, call.span.trace_id_hex if call.span is not None else "",
                extra.get("attempts", 1), extra.get("retry_note", ""), time.time()))


def _request_stat_keys(listener: str, route: str, cluster: str, code) -> tuple:
    """The Stats keys of one request series: `requests` by listener/route/cluster/code and
    `request_duration` by listener/cluster."""
    cluster = cluster or "-"
    return (("requests", (("listener", listener), ("route", route or "-"), ("cluster", cluster),
                          ("code", str(code)))),
            ("request_duration", (("listener", listener), ("cluster", cluster))))


def hash_key(route: Route, call: Call) -> int | None:
    """The request's hash for ring_hash / maglev from the route's hash policies (Envoy: each
    present value is folded in; a terminal policy that produced a value stops the walk)."""
    h = None
    for hp in route.hash_policies:
        if hp.kind == "header":
            value = call.headers.get(hp.name)
        elif hp.kind == "cookie":
            value = _cookie(call.headers.get("cookie"), hp.name)
        elif hp.kind == "source_ip":
            value = call.peer.rpartition(":")[0] or None
        else:
            value = parse_query(call.path.partition("?")[2]).get(hp.name)
        if value is None:
            continue
        v = hash64(value)
        h = v if h is None else (((h << 1) | (h >> 63)) & 0xFFFFFFFFFFFFFFFF) ^ v
        if hp.terminal:
            break
    return h


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def _describe_span(span, client: bool, call: Call, status: int, grpc_status: int | None,
                   reason: str, failed: bool) -> None:
    """Name and attributes of a span about to be exported (semantic conventions), made at the
    end so unsampled or unexported spans never pay for them."""
    if client:
        span.name = f"{call.listener} -> {call.cluster}"
        host, _, port = call.upstream.rpartition(":")
        attrs = {"server.address": host, "protomesh.cluster": call.cluster}
        if port.isdigit():
            attrs["server.port"] = int(port)
    else:
        name = f"{call.grpc_service}/{call.grpc_method}" if call.protocol == "grpc" else \
            f"{call.method} {call.path.partition('?')[0]}"
        span.name = f"{call.listener} {name}"
        attrs = _span_attrs(call)
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
    span.attributes = attrs


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
