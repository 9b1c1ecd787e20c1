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

    def __post_init__(self) -> None:
        for vh in self.virtual_hosts:
            for d in vh.domains:
                self._exact.setdefault(d.lower(), vh)

    def virtual_host(self, authority: str) -> VirtualHost | None:
        host = authority.lower()
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        bare = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
        vh = self._exact.get(bare)
        if vh is not None:
            return vh
        best, best_len = None, -1
        for candidate in self.virtual_hosts:
            for d in candidate.domains:
                if d.startswith("*") and d != "*" and bare.endswith(d[1:]) and len(d) > best_len:
                    best, best_len = candidate, len(d)
                elif d.endswith("*") and d != "*" and bare.startswith(d[:-1]) and len(d) > best_len:
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
class Endpoint:
    host: str
    port: int
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    lb_policy: str  # round_robin | least_request | random
    http2: bool  # upstream speaks HTTP/2 (gRPC)
    connect_timeout_s: float
    eds: bool  # endpoints arrive as a ClusterLoadAssignment
    static_endpoints: tuple[Endpoint, ...] = ()


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
            if lst.inline_routes is None and lst.route_table not in self.route_tables:
                out.append(f"RouteConfiguration {lst.route_table}")
        for c in self.clusters.values():
            if c.eds and c.name not in self.assignments:
                out.append(f"ClusterLoadAssignment {c.name}")
        return out
