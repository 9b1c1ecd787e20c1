"""xDS v3 resources → frozen config.  Pure: raises ConfigError (the NACK text) or returns values.

We honour a documented subset of each Envoy message.  Any other field that is set is refused by
name, because silently ignoring a policy (a retry, a filter) would make the sidecar behave
differently from what the control server promised.
"""
from __future__ import annotations

import re
from typing import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from meshapi.v1 import grpc_methods_pb2
from protomesh import xdstypes
from sidecar.config.errors import ConfigError
from sidecar.config.model import (
    CircuitBreaker, Cluster, Endpoint, HashPolicy, HeaderMatch, HealthCheck, Listener,
    OutlierPolicy, PathMatch, RetryPolicy, Route, RouteTable, StringMatch, Tracing, VirtualHost,
    WeightedCluster,
)
from sidecar.upstream.retry import CONDITIONS as RETRY_CONDITIONS

KNOWN_HTTP_FILTERS = {xdstypes.ROUTER}
# Protobuf-first gateway filters (issue 5), parsed by sidecar/filters/{transcode,grpcweb,ratelimit}.py.
from sidecar.filters import grpcweb as _grpcweb, ratelimit as _ratelimit, transcode as _transcode  # noqa: E402
KNOWN_HTTP_FILTERS |= {_transcode.TYPE_URL, _grpcweb.TYPE_URL, _ratelimit.TYPE_URL}
from sidecar.filters import fault as _fault  # noqa: E402  (issue 4: fault injection, per route)
KNOWN_HTTP_FILTERS.add(_fault.TYPE_URL)


def unpack_any(anyv: any_pb2.Any, cls, where: str):
    """Any → message, or a ConfigError naming where (bytes that do not decode must NACK, not
    escape as DecodeError and end the xDS stream)."""
    msg = cls()
    try:
        ok = anyv.Unpack(msg)
    except DecodeError as exc:
        raise ConfigError(where, f"cannot decode {anyv.type_url}: {exc}") from None
    if not ok:
        raise ConfigError(where, f"expected {cls.DESCRIPTOR.full_name}, got {anyv.type_url or 'nothing'}")
    return msg


def enum_name(enum_type, value: int, where: str) -> str:
    """Proto3 enums are open: a newer control plane may send a number this build has no name for."""
    try:
        return enum_type.Name(value)
    except ValueError:
        raise ConfigError(where, f"unknown value {value}") from None


def _only(msg, allowed: set[str], where: str) -> None:
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ConfigError(f"{where}.{fd.name}", "is set but not supported by the protomesh sidecar")


def _seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def _regex(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(where, f"invalid regex {pattern!r}: {exc}") from None


def parse_string_match(m, where: str) -> StringMatch:
    kind = m.WhichOneof("match_pattern")
    if kind in ("exact", "prefix", "suffix", "contains"):
        return StringMatch(kind, getattr(m, kind), m.ignore_case)
    if kind == "safe_regex":
        return StringMatch("regex", m.safe_regex.regex, False, _regex(m.safe_regex.regex, where))
    raise ConfigError(where, f"string matcher {kind or 'empty'} is not supported")


def parse_header_match(h: route_components_pb2.HeaderMatcher, where: str) -> HeaderMatch:
    kind = h.WhichOneof("header_match_specifier")
    name = h.name.lower()
    if not name:
        raise ConfigError(where + ".name", "header name is empty")
    if kind is None:
        return HeaderMatch(name, None, True, h.invert_match)
    if kind == "present_match":
        return HeaderMatch(name, None, h.present_match, h.invert_match)
    if kind == "string_match":
        return HeaderMatch(name, parse_string_match(h.string_match, where), True, h.invert_match)
    if kind in ("exact_match", "prefix_match", "suffix_match", "contains_match"):
        return HeaderMatch(name, StringMatch(kind.split("_")[0], getattr(h, kind)), True, h.invert_match)
    if kind == "safe_regex_match":
        rx = h.safe_regex_match.regex
        return HeaderMatch(name, StringMatch("regex", rx, False, _regex(rx, where)), True, h.invert_match)
    raise ConfigError(where, f"header matcher {kind} is not supported")


def parse_query_match(q: route_components_pb2.QueryParameterMatcher, where: str) -> HeaderMatch:
    kind = q.WhichOneof("query_parameter_match_specifier")
    if kind == "string_match":
        return HeaderMatch(q.name, parse_string_match(q.string_match, where))
    if kind == "present_match" or kind is None:
        return HeaderMatch(q.name, None, True)
    raise ConfigError(where, f"query matcher {kind} is not supported")


def parse_route(r: route_components_pb2.Route, where: str) -> Route:
    _only(r, {"name", "match", "route", "metadata", "decorator", "typed_per_filter_config"}, where)
    bucket = None
    fault = None
    for key, anyv in r.typed_per_filter_config.items():
        if key == _fault.FILTER_NAME:
            fault = _fault.parse(anyv, f"{where}.typed_per_filter_config[{key}]")
            continue
        if key != _ratelimit.FILTER_NAME:
            raise ConfigError(f"{where}.typed_per_filter_config[{key}]", "is not supported (local_ratelimit, fault)")
        bucket = _ratelimit.parse_route_config(anyv, f"{where}.typed_per_filter_config[{key}]")
    if not r.HasField("route"):
        raise ConfigError(where, "only 'route' actions are supported (not redirect/direct_response)")
    m = r.match
    _only(m, {"prefix", "path", "safe_regex", "case_sensitive", "headers", "query_parameters", "grpc"},
          where + ".match")
    kind = m.WhichOneof("path_specifier")
    case = m.case_sensitive.value if m.HasField("case_sensitive") else True
    if kind == "prefix":
        path = PathMatch("prefix", m.prefix, case)
    elif kind == "path":
        path = PathMatch("path", m.path, case)
    elif kind == "safe_regex":
        path = PathMatch("regex", m.safe_regex.regex, True, _regex(m.safe_regex.regex, where + ".match"))
    else:
        raise ConfigError(where + ".match", "needs prefix, path or safe_regex")
    a = r.route
    _only(a, {"cluster", "weighted_clusters", "timeout", "prefix_rewrite", "retry_policy", "hash_policy",
              "request_mirror_policies"},
          where + ".route")
    spec = a.WhichOneof("cluster_specifier")
    if spec == "cluster":
        clusters = (WeightedCluster(a.cluster, 1),)
    elif spec == "weighted_clusters":
        clusters = tuple(WeightedCluster(c.name, c.weight.value) for c in a.weighted_clusters.clusters)
        if not clusters or sum(c.weight for c in clusters) <= 0:
            raise ConfigError(where + ".route.weighted_clusters", "needs at least one positive weight")
    else:
        raise ConfigError(where + ".route", "needs cluster or weighted_clusters")
    timeout = 15.0
    if a.HasField("timeout"):
        timeout = _seconds(a.timeout) or None
    return Route(
        name=r.name or where,
        path=path,
        headers=tuple(parse_header_match(h, f"{where}.match.headers[{i}]") for i, h in enumerate(m.headers)),
        query=tuple(parse_query_match(q, f"{where}.match.query_parameters[{i}]")
                    for i, q in enumerate(m.query_parameters)),
        grpc_only=m.HasField("grpc"),
        clusters=clusters,
        timeout_s=timeout,
        prefix_rewrite=a.prefix_rewrite or None,
        retry=parse_retry_policy(a.retry_policy, where + ".route.retry_policy") if a.HasField("retry_policy") else None,
        hash_policies=tuple(parse_hash_policy(h, f"{where}.route.hash_policy[{i}]")
                            for i, h in enumerate(a.hash_policy)),
        rate_limit=bucket,
        fault=fault,
        mirrors=tuple(parse_mirror(mp, f"{where}.route.request_mirror_policies[{i}]")
                      for i, mp in enumerate(a.request_mirror_policies)),
    )


TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def parse_tcp_proxy(anyv, where: str):
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
    from sidecar.config.model import TcpProxy
    tp = unpack_any(anyv, tcp_proxy_pb2.TcpProxy, where)
    _only(tp, {"stat_prefix", "cluster", "idle_timeout", "max_connect_attempts"}, where)
    if not tp.cluster:
        raise ConfigError(where + ".cluster", "is required (weighted_clusters are not supported)")
    idle = _seconds(tp.idle_timeout) if tp.HasField("idle_timeout") else 3600.0
    attempts = tp.max_connect_attempts.value if tp.HasField("max_connect_attempts") else 1
    return TcpProxy(tp.cluster, idle or None, max(attempts, 1))


def parse_mirror(mp, where: str):
    """RouteAction.RequestMirrorPolicy: a cluster and the sampled share (runtime_fraction's
    default_value; no runtime here).  The copy's response is discarded."""
    from sidecar.config.model import Mirror
    _only(mp, {"cluster", "runtime_fraction"}, where)
    if not mp.cluster:
        raise ConfigError(where + ".cluster", "is required")
    fraction = 1.0
    if mp.HasField("runtime_fraction"):
        _only(mp.runtime_fraction, {"default_value"}, where + ".runtime_fraction")  # no runtime layer
        num, den = _fault._share(mp.runtime_fraction.default_value, where + ".runtime_fraction.default_value")
        fraction = num / den
    return Mirror(mp.cluster, fraction)


PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


def parse_retry_policy(rp: route_components_pb2.RetryPolicy, where: str) -> RetryPolicy:
    _only(rp, {"retry_on", "num_retries", "per_try_timeout", "retry_back_off", "retriable_status_codes",
               "retriable_request_headers", "retry_host_predicate", "host_selection_retry_max_attempts"}, where)
    on = frozenset(t.strip() for t in rp.retry_on.split(",") if t.strip())
    unknown = sorted(on - RETRY_CONDITIONS)
    if unknown:
        raise ConfigError(where + ".retry_on", f"{', '.join(unknown)} is not supported "
                          f"({', '.join(sorted(RETRY_CONDITIONS))})")
    avoid = False
    for i, pred in enumerate(rp.retry_host_predicate):
        if pred.typed_config.type_url != PREVIOUS_HOSTS:
            raise ConfigError(f"{where}.retry_host_predicate[{i}]",
                              f"{pred.name or pred.typed_config.type_url} is not supported (previous_hosts only)")
        avoid = True
    base, cap = 0.025, None
    if rp.HasField("retry_back_off"):
        _only(rp.retry_back_off, {"base_interval", "max_interval"}, where + ".retry_back_off")
        base = _seconds(rp.retry_back_off.base_interval)
        if base <= 0:
            raise ConfigError(where + ".retry_back_off.base_interval", "must be > 0")
        if rp.retry_back_off.HasField("max_interval"):
            cap = _seconds(rp.retry_back_off.max_interval)
            if cap < base:
                raise ConfigError(where + ".retry_back_off.max_interval", "must be >= base_interval")
    per_try = _seconds(rp.per_try_timeout) if rp.HasField("per_try_timeout") else None
    return RetryPolicy(
        retry_on=on,
        num_retries=rp.num_retries.value if rp.HasField("num_retries") else 1,
        per_try_timeout_s=per_try or None,
        base_interval_s=base,
        max_interval_s=cap if cap is not None else 10 * base,
        retriable_status_codes=frozenset(rp.retriable_status_codes),
        request_headers=tuple(parse_header_match(h, f"{where}.retriable_request_headers[{i}]")
                              for i, h in enumerate(rp.retriable_request_headers)),
        avoid_previous_hosts=avoid,
        host_selection_attempts=rp.host_selection_retry_max_attempts or 1,
    )


def parse_hash_policy(hp: route_components_pb2.RouteAction.HashPolicy, where: str) -> HashPolicy:
    kind = hp.WhichOneof("policy_specifier")
    if kind == "header":
        _only(hp.header, {"header_name"}, where + ".header")
        return HashPolicy("header", hp.header.header_name.lower(), hp.terminal)
    if kind == "cookie":
        _only(hp.cookie, {"name"}, where + ".cookie")  # ttl (generating cookies) is not supported
        return HashPolicy("cookie", hp.cookie.name, hp.terminal)
    if kind == "connection_properties":
        if not hp.connection_properties.source_ip:
            raise ConfigError(where + ".connection_properties", "only source_ip: true is supported")
        return HashPolicy("source_ip", "", hp.terminal)
    if kind == "query_parameter":
        return HashPolicy("query", hp.query_parameter.name, hp.terminal)
    raise ConfigError(where, f"{kind or 'empty'} hash policy is not supported (header, cookie, "
                      "connection_properties.source_ip, query_parameter)")


def parse_route_config(rc: route_pb2.RouteConfiguration) -> RouteTable:
    where = f"RouteConfiguration {rc.name}"
    _only(rc, {"name", "virtual_hosts", "validate_clusters"}, where)
    vhs = []
    for i, vh in enumerate(rc.virtual_hosts):
        vwhere = f"{where}.virtual_hosts[{i}]"
        _only(vh, {"name", "domains", "routes"}, vwhere)
        if not vh.domains:
            raise ConfigError(vwhere + ".domains", "needs at least one domain ('*' for any)")
        routes = tuple(parse_route(r, f"{vwhere}.routes[{j}]") for j, r in enumerate(vh.routes))
        vhs.append(VirtualHost(vh.name, tuple(vh.domains), routes))
    return RouteTable(rc.name, tuple(vhs))


def parse_listener(lst: listener_pb2.Listener) -> Listener:
    where = f"Listener {lst.name}"
    _only(lst, {"name", "address", "filter_chains", "traffic_direction", "metadata", "stat_prefix"}, where)
    sa = lst.address.socket_address
    if not sa.address or not sa.port_value:
        raise ConfigError(where + ".address", "needs a socket_address with address and port_value")
    if len(lst.filter_chains) != 1 or len(lst.filter_chains[0].filters) != 1:
        raise ConfigError(where + ".filter_chains", "exactly one chain with one HttpConnectionManager is supported")
    nf = lst.filter_chains[0].filters[0]
    if nf.typed_config.type_url == TCP_PROXY:  # issue 4: L4 proxy listener
        direction = enum_name(base_pb2.TrafficDirection, lst.traffic_direction, where + ".traffic_direction").lower()
        return Listener(lst.name, sa.address, sa.port_value, "tcp", direction, "",
                        tcp=parse_tcp_proxy(nf.typed_config, where + ".tcp_proxy"))
    if nf.typed_config.type_url != xdstypes.HCM:
        raise ConfigError(where + ".filter_chains[0].filters[0]",
                          f"network filter {nf.typed_config.type_url or nf.name} is not supported (only HttpConnectionManager)")
    hwhere = where + ".http_connection_manager"
    hcm = unpack_any(nf.typed_config, hcm_pb2.HttpConnectionManager, hwhere)
    _only(hcm, {"codec_type", "stat_prefix", "rds", "route_config", "http_filters", "tracing",
                "stream_idle_timeout"}, hwhere)
    codec = enum_name(hcm_pb2.HttpConnectionManager.CodecType, hcm.codec_type, hwhere + ".codec_type")
    protocol = {"HTTP2": "grpc", "HTTP1": "http", "AUTO": "http"}.get(codec)
    if protocol is None:
        raise ConfigError(hwhere + ".codec_type", f"{codec} is not supported (use HTTP1 or HTTP2)")
    filters = []
    gateway: dict = {}  # Listener fields set by the protobuf-first gateway filters
    for i, f in enumerate(hcm.http_filters):
        type_url = f.typed_config.type_url
        if type_url not in KNOWN_HTTP_FILTERS:
            if f.is_optional:
                continue
            raise ConfigError(f"{hwhere}.http_filters[{i}]",
                              f"http filter {f.name} ({type_url or 'no typed_config'}) is not supported")
        fwhere = f"{hwhere}.http_filters[{i}]"
        if type_url == _transcode.TYPE_URL:
            gateway["transcoder"] = _transcode.parse_filter(f.typed_config, fwhere)
        elif type_url == _grpcweb.TYPE_URL:
            gateway["grpc_web"] = True
        elif type_url == _ratelimit.TYPE_URL:
            _ratelimit.parse_listener_filter(f.typed_config, fwhere)
        elif type_url == _fault.TYPE_URL:
            _fault.parse_listener_level(f.typed_config, fwhere)
        filters.append(type_url)
    if not filters or filters[-1] != xdstypes.ROUTER:
        raise ConfigError(hwhere + ".http_filters", "the last http filter must be the router")
    inline = None
    if hcm.HasField("rds"):
        table = hcm.rds.route_config_name
        if not table:
            raise ConfigError(hwhere + ".rds.route_config_name", "is empty")
    elif hcm.HasField("route_config"):
        inline = parse_route_config(hcm.route_config)
        table = inline.name
    else:
        raise ConfigError(hwhere, "needs rds or route_config")
    direction = enum_name(base_pb2.TrafficDirection, lst.traffic_direction, where + ".traffic_direction").lower()
    tracing = parse_tracing(hcm.tracing, hwhere + ".tracing") if hcm.HasField("tracing") else None
    kinds = parse_grpc_methods(lst.metadata, where + ".metadata")
    descriptors = lst.metadata.typed_filter_metadata.get(DESCRIPTORS_KEY)
    if descriptors is not None:
        from google.protobuf import descriptor_pb2
        gateway["descriptor_set"] = unpack_any(descriptors, descriptor_pb2.FileDescriptorSet,
                                               f"{where}.metadata.typed_filter_metadata[{DESCRIPTORS_KEY}]"
                                               ).SerializeToString()
    idle = 300.0
    if hcm.HasField("stream_idle_timeout"):
        idle = _seconds(hcm.stream_idle_timeout) or None  # 0s disables, as in Envoy
    return Listener(lst.name, sa.address, sa.port_value, protocol, direction, table, inline, tuple(filters),
                    tracing, kinds, stream_idle_timeout_s=idle, **gateway)


DESCRIPTORS_KEY = "protomesh.descriptor_set"


GRPC_METHODS_KEY = "protomesh.grpc_methods"
_KIND_NAMES = {grpc_methods_pb2.GrpcMethods.UNARY: "unary",
               grpc_methods_pb2.GrpcMethods.SERVER_STREAMING: "server_stream",
               grpc_methods_pb2.GrpcMethods.CLIENT_STREAMING: "client_stream",
               grpc_methods_pb2.GrpcMethods.BIDI_STREAMING: "bidi_stream"}


def parse_grpc_methods(metadata, where: str) -> dict[str, str]:
    anyv = metadata.typed_filter_metadata.get(GRPC_METHODS_KEY)
    if anyv is None:
        return {}
    msg = unpack_any(anyv, grpc_methods_pb2.GrpcMethods, f"{where}.typed_filter_metadata[{GRPC_METHODS_KEY}]")
    return {path: _KIND_NAMES.get(kind, "bidi_stream") for path, kind in msg.methods.items()}


OTEL_TRACER = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


def parse_tracing(t, where: str) -> Tracing:
    """Envoy's OpenTelemetry tracer over gRPC is what we honour (the same config drives Envoy)."""
    _only(t, {"provider", "random_sampling"}, where)
    if t.provider.typed_config.type_url != OTEL_TRACER:
        raise ConfigError(where + ".provider", f"tracer {t.provider.name or t.provider.typed_config.type_url} "
                          "is not supported (use envoy.tracers.opentelemetry)")
    otel = unpack_any(t.provider.typed_config, opentelemetry_pb2.OpenTelemetryConfig, where + ".provider")
    target = otel.grpc_service.google_grpc.target_uri
    if not target:
        raise ConfigError(where + ".provider.grpc_service", "needs google_grpc.target_uri (the OTLP collector)")
    sampling = t.random_sampling.value / 100.0 if t.HasField("random_sampling") else 1.0
    if not 0.0 <= sampling <= 1.0:
        raise ConfigError(where + ".random_sampling", f"{t.random_sampling.value} is not a percentage")
    endpoint = target if "://" in target else f"http://{target}"
    return Tracing(endpoint, sampling)


_LB = {
    cluster_pb2.Cluster.ROUND_ROBIN: "round_robin",
    cluster_pb2.Cluster.LEAST_REQUEST: "least_request",
    cluster_pb2.Cluster.RANDOM: "random",
    cluster_pb2.Cluster.RING_HASH: "ring_hash",
    cluster_pb2.Cluster.MAGLEV: "maglev",
}


def parse_endpoints(cla: endpoint_pb2.ClusterLoadAssignment, where: str) -> tuple[Endpoint, ...]:
    out = []
    _only(cla, {"cluster_name", "endpoints"}, where)
    for i, locality in enumerate(cla.endpoints):
        _only(locality, {"locality", "lb_endpoints", "load_balancing_weight", "priority"},
              f"{where}.endpoints[{i}]")
        lw = locality.load_balancing_weight.value if locality.HasField("load_balancing_weight") else 1
        for j, lb in enumerate(locality.lb_endpoints):
            if lb.health_status in (health_check_pb2.UNHEALTHY, health_check_pb2.DRAINING,
                                    health_check_pb2.TIMEOUT):
                continue
            sa = lb.endpoint.address.socket_address
            if not sa.address or not sa.port_value:
                raise ConfigError(f"{where}.endpoints[{i}].lb_endpoints[{j}]", "needs address and port_value")
            weight = lb.load_balancing_weight.value if lb.HasField("load_balancing_weight") else 1
            labels = ()
            fm = lb.metadata.filter_metadata.get("protomesh")
            if fm is not None:
                labels = _labels(fm, f"{where}.endpoints[{i}].lb_endpoints[{j}].metadata")
            out.append(Endpoint(sa.address, sa.port_value, max(weight, 1), labels, locality.priority,
                                max(lw, 1)))
    return tuple(out)


def _labels(struct, where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for key, v in struct.fields.items():
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            out.append((key, v.string_value))
        elif kind == "number_value":
            out.append((key, f"{v.number_value:g}"))
        elif kind == "bool_value":
            out.append((key, "true" if v.bool_value else "false"))
        else:
            raise ConfigError(f"{where}.protomesh.{key}", f"label values must be strings, numbers or bools, not {kind or 'unset'}")
    return tuple(sorted(out))


def parse_cluster(c: cluster_pb2.Cluster) -> Cluster:
    where = f"Cluster {c.name}"
    _only(c, {"name", "type", "eds_cluster_config", "load_assignment", "lb_policy", "connect_timeout",
              "typed_extension_protocol_options", "metadata", "circuit_breakers", "outlier_detection",
              "common_lb_config", "ring_hash_lb_config", "maglev_lb_config", "health_checks"}, where)
    if len(c.health_checks) > 1:
        raise ConfigError(where + ".health_checks", "only one health check per cluster is supported")
    kind = enum_name(cluster_pb2.Cluster.DiscoveryType, c.type, where + ".type")
    if kind not in ("EDS", "STATIC"):
        raise ConfigError(where + ".type", f"{kind} is not supported (use EDS or STATIC)")
    if c.lb_policy not in _LB:
        raise ConfigError(where + ".lb_policy",
                          f"{enum_name(cluster_pb2.Cluster.LbPolicy, c.lb_policy, where + '.lb_policy')} is not supported "
                          "(ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)")
    http2 = False
    for key, anyv in c.typed_extension_protocol_options.items():
        if key != xdstypes.HTTP_PROTOCOL_OPTIONS_KEY:
            raise ConfigError(f"{where}.typed_extension_protocol_options[{key}]", "is not supported")
        opts = unpack_any(anyv, http_protocol_options_pb2.HttpProtocolOptions,
                          f"{where}.typed_extension_protocol_options[{key}]")
        http2 = opts.explicit_http_config.HasField("http2_protocol_options")
    static = ()
    if kind == "STATIC":
        static = parse_endpoints(c.load_assignment, where + ".load_assignment")
    timeout = _seconds(c.connect_timeout) if c.HasField("connect_timeout") else 5.0
    panic = 50.0
    if c.HasField("common_lb_config"):
        _only(c.common_lb_config, {"healthy_panic_threshold"}, where + ".common_lb_config")
        if c.common_lb_config.HasField("healthy_panic_threshold"):
            panic = c.common_lb_config.healthy_panic_threshold.value
    ring_min, ring_max, maglev = 1024, 8 << 20, 65537
    if c.HasField("ring_hash_lb_config"):
        rh = c.ring_hash_lb_config
        # hash_function is refused when set (MURMUR_HASH_2): our ring hashes with its own function.
        _only(rh, {"minimum_ring_size", "maximum_ring_size"}, where + ".ring_hash_lb_config")
        ring_min = rh.minimum_ring_size.value if rh.HasField("minimum_ring_size") else ring_min
        ring_max = rh.maximum_ring_size.value if rh.HasField("maximum_ring_size") else ring_max
        if ring_min > ring_max or ring_min <= 0:
            raise ConfigError(where + ".ring_hash_lb_config", "needs 0 < minimum_ring_size <= maximum_ring_size")
    if c.HasField("maglev_lb_config"):
        _only(c.maglev_lb_config, {"table_size"}, where + ".maglev_lb_config")
        if c.maglev_lb_config.HasField("table_size"):
            maglev = c.maglev_lb_config.table_size.value
            if maglev < 2 or any(maglev % d == 0 for d in range(2, int(maglev ** 0.5) + 1)):
                raise ConfigError(where + ".maglev_lb_config.table_size", f"{maglev} is not a prime")
    return Cluster(c.name, _LB[c.lb_policy], http2, timeout, kind == "EDS", static,
                   breaker=parse_circuit_breakers(c.circuit_breakers, where + ".circuit_breakers")
                   if c.HasField("circuit_breakers") else CircuitBreaker(),
                   outlier=parse_outlier(c.outlier_detection, where + ".outlier_detection")
                   if c.HasField("outlier_detection") else None,
                   health_checks=tuple(parse_health_check(h, f"{where}.health_checks[{i}]")
                                       for i, h in enumerate(c.health_checks)),
                   panic_threshold=panic, ring_min=ring_min, ring_max=ring_max, maglev_table=maglev)


def _u32(msg, name: str, default):
    return getattr(msg, name).value if msg.HasField(name) else default


def parse_circuit_breakers(cb, where: str) -> CircuitBreaker:
    _only(cb, {"thresholds"}, where)
    out = CircuitBreaker()
    for i, t in enumerate(cb.thresholds):
        twhere = f"{where}.thresholds[{i}]"
        _only(t, {"priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
                  "retry_budget", "track_remaining"}, twhere)
        if t.priority != base_pb2.DEFAULT:
            continue  # HIGH priority routes are not distinguished; their thresholds do not apply
        budget, min_conc = None, 3
        if t.HasField("retry_budget"):
            budget = t.retry_budget.budget_percent.value if t.retry_budget.HasField("budget_percent") else 20.0
            min_conc = _u32(t.retry_budget, "min_retry_concurrency", 3)
        out = CircuitBreaker(_u32(t, "max_connections", 1024), _u32(t, "max_pending_requests", 1024),
                             _u32(t, "max_requests", 1024), _u32(t, "max_retries", 3), budget, min_conc)
    return out


def parse_outlier(od, where: str) -> OutlierPolicy:
    _only(od, {"consecutive_5xx", "enforcing_consecutive_5xx", "consecutive_gateway_failure",
               "enforcing_consecutive_gateway_failure", "interval", "base_ejection_time", "max_ejection_time",
               "max_ejection_percent", "success_rate_minimum_hosts", "success_rate_request_volume",
               "success_rate_stdev_factor", "enforcing_success_rate", "failure_percentage_threshold",
               "failure_percentage_minimum_hosts", "failure_percentage_request_volume",
               "enforcing_failure_percentage"}, where)
    d = OutlierPolicy()

    def dur(name, default):
        return _seconds(getattr(od, name)) if od.HasField(name) else default
    return OutlierPolicy(
        consecutive_5xx=_u32(od, "consecutive_5xx", d.consecutive_5xx),
        enforcing_consecutive_5xx=_u32(od, "enforcing_consecutive_5xx", d.enforcing_consecutive_5xx),
        consecutive_gateway_failure=_u32(od, "consecutive_gateway_failure", d.consecutive_gateway_failure),
        enforcing_consecutive_gateway_failure=_u32(od, "enforcing_consecutive_gateway_failure",
                                                   d.enforcing_consecutive_gateway_failure),
        interval_s=dur("interval", d.interval_s) or d.interval_s,
        base_ejection_s=dur("base_ejection_time", d.base_ejection_s),
        max_ejection_s=dur("max_ejection_time", d.max_ejection_s),
        max_ejection_percent=_u32(od, "max_ejection_percent", d.max_ejection_percent),
        success_rate_minimum_hosts=_u32(od, "success_rate_minimum_hosts", d.success_rate_minimum_hosts),
        success_rate_request_volume=_u32(od, "success_rate_request_volume", d.success_rate_request_volume),
        success_rate_stdev_factor=_u32(od, "success_rate_stdev_factor", 1900) / 1000.0,
        enforcing_success_rate=_u32(od, "enforcing_success_rate", d.enforcing_success_rate),
        failure_percentage_threshold=_u32(od, "failure_percentage_threshold", d.failure_percentage_threshold),
        failure_percentage_minimum_hosts=_u32(od, "failure_percentage_minimum_hosts",
                                              d.failure_percentage_minimum_hosts),
        failure_percentage_request_volume=_u32(od, "failure_percentage_request_volume",
                                               d.failure_percentage_request_volume),
        enforcing_failure_percentage=_u32(od, "enforcing_failure_percentage", d.enforcing_failure_percentage),
    )


def parse_health_check(h, where: str) -> HealthCheck:
    _only(h, {"timeout", "interval", "initial_jitter", "interval_jitter", "interval_jitter_percent",
              "unhealthy_threshold", "healthy_threshold", "http_health_check", "tcp_health_check",
              "grpc_health_check", "no_traffic_interval"}, where)
    if h.HasField("no_traffic_interval") and h.no_traffic_interval != h.interval:
        raise ConfigError(where + ".no_traffic_interval", "must equal interval (the sidecar checks every "
                          "interval, with or without traffic)")
    for name in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if not h.HasField(name):
            raise ConfigError(f"{where}.{name}", "is required")
    kind = h.WhichOneof("health_checker")
    extra: dict = {}
    if kind == "http_health_check":
        hh = h.http_health_check
        _only(hh, {"path", "host", "expected_statuses"}, where + ".http_health_check")
        if not hh.path:
            raise ConfigError(where + ".http_health_check.path", "is required")
        extra = {"path": hh.path, "host": hh.host}
        if hh.expected_statuses:
            extra["expected_statuses"] = tuple((r.start, r.end) for r in hh.expected_statuses)
            if any(not 100 <= s < e <= 600 for s, e in extra["expected_statuses"]):
                raise ConfigError(where + ".http_health_check.expected_statuses",
                                  "each range needs 100 <= start < end <= 600")
        kind = "http"
    elif kind == "grpc_health_check":
        _only(h.grpc_health_check, {"service_name", "authority"}, where + ".grpc_health_check")
        extra = {"service_name": h.grpc_health_check.service_name,
                 "authority": h.grpc_health_check.authority}
        kind = "grpc"
    elif kind == "tcp_health_check":
        _only(h.tcp_health_check, set(), where + ".tcp_health_check")  # connect only, no payload
        kind = "tcp"
    else:
        raise ConfigError(where, f"{kind or 'no'} health checker is not supported (http, grpc, tcp)")
    interval = _seconds(h.interval)
    timeout = _seconds(h.timeout)
    if interval <= 0 or timeout <= 0:
        raise ConfigError(where, "interval and timeout must be > 0")
    return HealthCheck(kind, interval, timeout, max(h.unhealthy_threshold.value, 1),
                       max(h.healthy_threshold.value, 1),
                       interval_jitter_s=_seconds(h.interval_jitter),
                       interval_jitter_percent=h.interval_jitter_percent,
                       initial_jitter_s=_seconds(h.initial_jitter), **extra)


def _unpack(any_msg: any_pb2.Any, cls, type_url: str):
    if any_msg.type_url != type_url:
        raise ConfigError(any_msg.type_url or "resource", f"expected {type_url}")
    return unpack_any(any_msg, cls, "resource")


def parse_resources(type_url: str, resources: Iterable[any_pb2.Any]) -> dict:
    """All or nothing: every resource of one response parses, or the whole response is NACKed."""
    out: dict = {}
    for r in resources:
        if type_url == xdstypes.LISTENER:
            v = parse_listener(_unpack(r, listener_pb2.Listener, type_url))
        elif type_url == xdstypes.ROUTE:
            v = parse_route_config(_unpack(r, route_pb2.RouteConfiguration, type_url))
        elif type_url == xdstypes.CLUSTER:
            v = parse_cluster(_unpack(r, cluster_pb2.Cluster, type_url))
        elif type_url == xdstypes.ENDPOINT:
            cla = _unpack(r, endpoint_pb2.ClusterLoadAssignment, type_url)
            out[cla.cluster_name] = parse_endpoints(cla, f"ClusterLoadAssignment {cla.cluster_name}")
            continue
        else:
            raise ConfigError(type_url, "resource type is not supported")
        if v.name in out:
            raise ConfigError(f"{v.name}", "resource name appears twice in one response")
        out[v.name] = v
    return out
