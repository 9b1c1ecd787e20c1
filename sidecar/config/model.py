"""Frozen, already-validated config the data path reads without further checks.

Matching lives here as pure methods so it is tested with tables and shared by both listeners.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Envoy's StringMatcher subset: exact, prefix, suffix, contains, regex (full match)."""

    kind: str  # exact | prefix | suffix | contains | regex
    value: str
    ignore_case: bool = False
    regex: re.Pattern | None = None

    def matches(self, text: str) -> bool:
        if self.kind == "regex":
            return self.regex.fullmatch(text) is not None
        if self.ignore_case:
            text, value = text.lower(), self.value.lower()
        else:
            value = self.value
        if self.kind == "exact":
            return text == value
        if self.kind == "prefix":
            return text.startswith(value)
        if self.kind == "suffix":
            return text.endswith(value)
        return value in text


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header (or query parameter) condition; `string` None means "present"."""

    name: str
    string: StringMatch | None = None
    present: bool = True
    invert: bool = False

    def matches(self, value: str | None) -> bool:
        if self.string is None:
            result = (value is not None) == self.present
        else:
            result = value is not None and self.string.matches(value)
        return result != self.invert


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str  # prefix | path | regex
    value: str
    case_sensitive: bool = True
    regex: re.Pattern | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "regex":
            return self.regex.fullmatch(path) is not None
        if not self.case_sensitive:
            path, value = path.lower(), self.value.lower()
        else:
            value = self.value
        if self.kind == "prefix":
            return path.startswith(value)
        return path == value


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """One route: a match and where it goes.  `clusters` has one entry unless traffic is split."""

    name: str
    path: PathMatch
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[HeaderMatch, ...] = ()
    grpc_only: bool = False
    clusters: tuple[WeightedCluster, ...] = ()
    timeout_s: float | None = 15.0  # None disables the route timeout (Envoy's timeout: 0s)
    prefix_rewrite: str | None = None
    retry: "RetryPolicy | None" = None
    hash_policies: tuple["HashPolicy", ...] = ()
    mirrors: tuple["Mirror", ...] = ()
    rate_limit: "TokenBucket | None" = None  # typed_per_filter_config[envoy.filters.http.local_ratelimit]
    fault: object = None  # sidecar.filters.fault.FaultPolicy, typed_per_filter_config[envoy.filters.http.fault]

    def matches(self, path: str, headers: Mapping[str, str]) -> bool:
        bare, _, query = path.partition("?")
        if not self.path.matches(bare):
            return False
        if self.grpc_only and not headers.get("content-type", "").startswith("application/grpc"):
            return False
        for h in self.headers:
            if not h.matches(headers.get(h.name)):
                return False
        if self.query:
            params = parse_query(query)
            for q in self.query:
                if not q.matches(params.get(q.name)):
                    return False
        return True

    def pick_cluster(self, roll: float) -> str:
        """`roll` in [0, 1) chooses among weighted clusters; a single cluster ignores it."""
        if len(self.clusters) == 1:
            return self.clusters[0].name
        total = sum(c.weight for c in self.clusters)
        point = roll * total
        for c in self.clusters:
            point -= c.weight
            if point < 0:
                return c.name
        return self.clusters[-1].name

    def rewrite(self, path: str) -> str:
        if self.prefix_rewrite is None or self.path.kind != "prefix":
            return path
        return self.prefix_rewrite + path[len(self.path.value):]


def parse_query(query: str) -> dict[str, str]:
    """First value wins, like Envoy's query parameter matcher; no decoding beyond '+'."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        params.setdefault(key, value.replace("+", " "))
    return params


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class RouteTable:
    """A RouteConfiguration: pick the virtual host by authority, then the first matching route."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    _exact: dict = field(default_factory=dict, compare=False, repr=False)
    # authority as received -> its virtual host (or None): most requests repeat a few authorities.
    # Bounded, since the Host header is the client's choice.
    _seen: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for vh in self.virtual_hosts:
            for d in vh.domains:
                self._exact.setdefault(d.lower(), vh)

    def virtual_host(self, authority: str) -> VirtualHost | None:
        seen = self._seen
        try:
            return seen[authority]
        except KeyError:
            pass
        vh = self._find_virtual_host(authority)
        if len(seen) >= 4096:
            seen.clear()
        seen[authority] = vh
        return vh

    def _find_virtual_host(self, authority: str) -> VirtualHost | None:
        host = authority.lower()
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        bare = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
        vh = self._exact.get(bare)
        if vh is not None:
            return vh
        # Like Envoy: the longest suffix wildcard (`*.example.com`), else the longest prefix
        # wildcard (`api.*`), else `*`.
        for suffix in (True, False):
            best, best_len = None, -1
            for candidate in self.virtual_hosts:
                for d in candidate.domains:
                    if d == "*" or len(d) <= best_len:
                        continue
                    if suffix and d.startswith("*") and bare.endswith(d[1:]):
                        best, best_len = candidate, len(d)
                    elif not suffix and d.endswith("*") and bare.startswith(d[:-1]):
                        best, best_len = candidate, len(d)
            if best is not None:
                return best
        return self._exact.get("*")

    def select(self, authority: str, path: str, headers: Mapping[str, str]) -> Route | None:
        vh = self.virtual_host(authority)
        if vh is None:
            return None
        for route in vh.routes:
            if route.matches(path, headers):
                return route
        return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy's RouteAction.retry_policy subset.  `retry_on` holds Envoy's condition names
    (5xx, gateway-error, reset, connect-failure, retriable-status-codes, and the gRPC ones:
    cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)."""

    retry_on: frozenset[str]
    num_retries: int = 1
    per_try_timeout_s: float | None = None
    base_interval_s: float = 0.025
    max_interval_s: float = 0.25
    retriable_status_codes: frozenset[int] = frozenset()
    request_headers: tuple[HeaderMatch, ...] = ()  # retriable_request_headers; ':method' is the method
    avoid_previous_hosts: bool = False  # retry_host_predicate previous_hosts
    host_selection_attempts: int = 1


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One RouteAction.hash_policy entry: the request property a consistent-hash balancer keys on."""

    kind: str  # header | cookie | source_ip | query
    name: str = ""
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class Mirror:
    """RouteAction.request_mirror_policies entry: copy a sampled share of requests to a cluster."""

    cluster: str
    fraction: float = 1.0  # of requests, in [0, 1]


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Cluster.circuit_breakers default-priority thresholds (Envoy's defaults)."""

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    budget_percent: float | None = None  # retry_budget: retries <= this % of active requests
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Cluster.outlier_detection with Envoy's defaults."""

    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 10
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9
    enforcing_success_rate: int = 100
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: int = 0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One Cluster.health_checks entry."""

    kind: str  # http | grpc | tcp
    interval_s: float
    timeout_s: float
    unhealthy_threshold: int
    healthy_threshold: int
    path: str = "/"
    host: str = ""
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)  # [start, end) ranges
    service_name: str = ""  # gRPC health service name
    authority: str = ""  # gRPC health check :authority (default: the endpoint address)
    interval_jitter_s: float = 0.0
    interval_jitter_percent: int = 0
    initial_jitter_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    priority: int = 0  # EDS locality priority: 0 is used first
    locality_weight: int = 1
    # "host:port", made once: balancers, pools and logs key by it on every request.
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    lb_policy: str  # round_robin | least_request | random | ring_hash | maglev
    http2: bool  # upstream speaks HTTP/2 (gRPC)
    connect_timeout_s: float
    eds: bool  # endpoints arrive as a ClusterLoadAssignment
    static_endpoints: tuple[Endpoint, ...] = ()
    breaker: CircuitBreaker = CircuitBreaker()
    outlier: OutlierPolicy | None = None
    health_checks: tuple[HealthCheck, ...] = ()
    panic_threshold: float = 50.0  # common_lb_config.healthy_panic_threshold, percent
    ring_min: int = 1024  # ring_hash_lb_config.minimum_ring_size
    ring_max: int = 8 * 1024 * 1024
    maglev_table: int = 65537  # maglev_lb_config.table_size (prime)


@dataclass(frozen=True, slots=True)
class Tracing:
    """Where spans go (an OTLP/gRPC endpoint) and the share of new traces to sample."""

    otlp_endpoint: str
    sampling: float


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    protocol: str  # http | grpc
    direction: str  # inbound | outbound | unspecified
    route_table: str  # RDS name (or the inline table's name)
    inline_routes: RouteTable | None = None
    filters: tuple[str, ...] = ()  # http filter type names in order (router last)
    tracing: "Tracing | None" = None
    grpc_kinds: Mapping[str, str] = field(default_factory=dict)  # "/pkg.S/M" -> unary | server_stream | …
    tcp: "TcpProxy | None" = None  # protocol "tcp": the TcpProxy network filter (issue 4)
    # HCM stream_idle_timeout: a request/response with no bytes either way for this long is ended
    # (Envoy's default is 5 minutes; None disables).  Without it a stalled upload holds two
    # connections for as long as the upstream does.
    stream_idle_timeout_s: float | None = 300.0
    # Protobuf-first gateway (sidecar/filters/): a built sidecar.transcode.Transcoder from the
    # grpc_json_transcoder filter, gRPC-Web on, and the descriptor set served by reflection.
    transcoder: object = field(default=None, compare=False, repr=False)
    grpc_web: bool = False
    descriptor_set: bytes = field(default=b"", compare=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the data path needs, as one immutable value swapped whole."""

    listeners: Mapping[str, Listener] = field(default_factory=dict)
    route_tables: Mapping[str, RouteTable] = field(default_factory=dict)
    clusters: Mapping[str, Cluster] = field(default_factory=dict)
    assignments: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    def routes_for(self, listener: Listener) -> RouteTable | None:
        if listener.inline_routes is not None:
            return listener.inline_routes
        return self.route_tables.get(listener.route_table)

    def endpoints_for(self, cluster: Cluster) -> tuple[Endpoint, ...]:
        if cluster.eds:
            return self.assignments.get(cluster.name, ())
        return cluster.static_endpoints

    def missing(self) -> list[str]:
        """Resources referenced but not yet received (warming); empty when complete."""
        out = []
        for lst in self.listeners.values():
            if lst.tcp is None and lst.inline_routes is None and lst.route_table not in self.route_tables:
                out.append(f"RouteConfiguration {lst.route_table}")
        for c in self.clusters.values():
            if c.eds and c.name not in self.assignments:
                out.append(f"ClusterLoadAssignment {c.name}")
        return out


@dataclass(frozen=True, slots=True)
class TcpProxy:
    """Envoy's TcpProxy network filter subset: connections to one cluster."""

    cluster: str
    idle_timeout_s: float | None = 3600.0  # Envoy's default; None disables
    max_connect_attempts: int = 1


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A route's LocalRateLimit token bucket: `max_tokens` at most, `tokens_per_fill` added every
    `fill_interval_s` (refilled continuously here, in steps in Envoy)."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float
    resource_exhausted: bool = False  # gRPC callers get RESOURCE_EXHAUSTED (Envoy's rate_limited_as_resource_exhausted)
