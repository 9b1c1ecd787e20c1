"""Small builders for the Envoy messages the translators emit (one place for the boilerplate)."""
from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from control.model import GatewayRoute, HeaderRule, Telemetry
from meshapi.v1 import grpc_methods_pb2
from protomesh import xdstypes


def pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def duration(seconds: float | None) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round((seconds or 0) * 1e9)))
    return d


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def tracing(telemetry: Telemetry, service_name: str) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    """Envoy's OpenTelemetry tracer config: the same message drives Envoy and our sidecar."""
    if not telemetry.otlp_endpoint:
        return None
    target = telemetry.otlp_endpoint.split("://", 1)[-1]
    otel = opentelemetry_pb2.OpenTelemetryConfig(
        service_name=service_name,
        grpc_service=grpc_service_pb2.GrpcService(
            google_grpc=grpc_service_pb2.GrpcService.GoogleGrpc(target_uri=target, stat_prefix="otlp")))
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=telemetry.sampling * 100.0),
        provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.opentelemetry", typed_config=pack(otel)))


GRPC_METHODS_KEY = "protomesh.grpc_methods"
_KINDS = {(False, False): grpc_methods_pb2.GrpcMethods.UNARY,
          (False, True): grpc_methods_pb2.GrpcMethods.SERVER_STREAMING,
          (True, False): grpc_methods_pb2.GrpcMethods.CLIENT_STREAMING,
          (True, True): grpc_methods_pb2.GrpcMethods.BIDI_STREAMING}


def grpc_methods(services) -> grpc_methods_pb2.GrpcMethods:
    """Call kinds of every rpc of the given GrpcService models, keyed by HTTP/2 path."""
    msg = grpc_methods_pb2.GrpcMethods()
    for g in services:
        for m in g.methods:
            msg.methods[f"/{g.full_name}/{m.name}"] = _KINDS[(m.client_streaming, m.server_streaming)]
    return msg


def listener(name: str, host: str, port: int, route_config: str, grpc: bool,
             direction: int = base_pb2.UNSPECIFIED, trace=None, methods=None,
             stream_idle_timeout_s: float | None = None) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.HTTP2 if grpc else hcm_pb2.HttpConnectionManager.HTTP1,
        rds=hcm_pb2.Rds(route_config_name=route_config, config_source=ads_source()),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                         typed_config=pack(router_pb2.Router()))],
    )
    if trace is not None:
        hcm.tracing.CopyFrom(trace)
    if stream_idle_timeout_s is not None:
        hcm.stream_idle_timeout.CopyFrom(duration(stream_idle_timeout_s))
    lst = listener_pb2.Listener(
        name=name, address=socket_address(host, port), traffic_direction=direction,
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                           typed_config=pack(hcm))])])
    if methods is not None and methods.methods:
        lst.metadata.typed_filter_metadata[GRPC_METHODS_KEY].CopyFrom(pack(methods))
    return lst


def cluster(name: str, lb: str, grpc: bool, connect_timeout_s: float,
            static: list[tuple[str, int]] | None = None) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=name,
        connect_timeout=duration(connect_timeout_s),
        lb_policy={"round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
                   "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
                   "random": cluster_pb2.Cluster.RANDOM,
                   "ring_hash": cluster_pb2.Cluster.RING_HASH,
                   "maglev": cluster_pb2.Cluster.MAGLEV}[lb],
    )
    if static is None:
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.eds_config.CopyFrom(ads_source())
    else:
        c.type = cluster_pb2.Cluster.STATIC
        c.load_assignment.CopyFrom(load_assignment(name, [(h, p, ()) for h, p in static]))
    if grpc:
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
        c.typed_extension_protocol_options[xdstypes.HTTP_PROTOCOL_OPTIONS_KEY].CopyFrom(pack(opts))
    return c


def load_assignment(name: str, endpoints: list[tuple[str, int, tuple]]) -> endpoint_pb2.ClusterLoadAssignment:
    lbs = []
    for host, port, labels in endpoints:
        ep = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port)),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1))
        if labels:
            meta = struct_pb2.Struct()
            meta.update(dict(labels))
            ep.metadata.filter_metadata["protomesh"].CopyFrom(meta)
        lbs.append(ep)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(
            lb_endpoints=lbs, load_balancing_weight=wrappers_pb2.UInt32Value(value=1))])


def route_config(name: str, vhosts: list[route_components_pb2.VirtualHost]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=vhosts)


def vhost(name: str, domains: list[str], routes: list) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(name=name, domains=domains, routes=routes)


def route(name: str, *, prefix: str | None = None, path: str | None = None, regex: str | None = None,
          grpc: bool = False, headers=(), query=(), split: tuple[tuple[str, int], ...],
          timeout_s: float | None, rewrite_prefix: str | None = None) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch()
    if prefix is not None:
        match.prefix = prefix
    elif path is not None:
        match.path = path
    else:
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=regex))
    if grpc:
        match.grpc.SetInParent()
    match.headers.extend(header_matcher(h) for h in headers)
    match.query_parameters.extend(query_matcher(q) for q in query)
    action = route_components_pb2.RouteAction(timeout=duration(timeout_s))
    if len(split) == 1:
        action.cluster = split[0][0]
    else:
        action.weighted_clusters.clusters.extend(
            route_components_pb2.WeightedCluster.ClusterWeight(name=c, weight=wrappers_pb2.UInt32Value(value=w))
            for c, w in split)
    if rewrite_prefix is not None:
        action.prefix_rewrite = rewrite_prefix
    return route_components_pb2.Route(name=name, match=match, route=action)


def _string_matcher(rule: HeaderRule) -> string_pb2.StringMatcher:
    if rule.kind == "regex":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=rule.value))
    return string_pb2.StringMatcher(**{rule.kind: rule.value})


def header_matcher(rule: HeaderRule) -> route_components_pb2.HeaderMatcher:
    if rule.kind == "present":
        return route_components_pb2.HeaderMatcher(name=rule.name, present_match=rule.value == "True")
    return route_components_pb2.HeaderMatcher(name=rule.name, string_match=_string_matcher(rule))


def query_matcher(rule: HeaderRule) -> route_components_pb2.QueryParameterMatcher:
    if rule.kind == "present":
        return route_components_pb2.QueryParameterMatcher(name=rule.name, present_match=True)
    return route_components_pb2.QueryParameterMatcher(name=rule.name, string_match=_string_matcher(rule))


def gateway_route(r: GatewayRoute, default_timeout: float | None) -> route_components_pb2.Route:
    kw = {r.path_kind: r.path_value}
    return route(r.name, grpc=r.grpc, headers=r.headers, query=r.query, split=r.split,
                 timeout_s=r.timeout_s if r.timeout_s is not None else default_timeout,
                 rewrite_prefix=r.rewrite_prefix, **kw)


def with_locality(packed_assignment: any_pb2.Any, region: str, zone: str = "") -> any_pb2.Any:
    """A copy of a packed ClusterLoadAssignment whose localities are named.  grpc's xDS client
    refuses a locality without the `locality` field; our sidecar does not honour it."""
    cla = endpoint_pb2.ClusterLoadAssignment()
    packed_assignment.Unpack(cla)
    for group in cla.endpoints:
        group.locality.region = region
        group.locality.zone = zone
    return pack(cla)


# ---- traffic management (issue 4): Envoy's own fields, so Envoy and our sidecar do the same ----
_IDEMPOTENT_METHODS = "GET|HEAD|OPTIONS|PUT|DELETE|TRACE"


def retry_policy(r, http: bool) -> route_components_pb2.RetryPolicy:
    """A control.model.Retries as Envoy's RetryPolicy.  Unless `non_idempotent`, an HTTP service's
    retries are limited to idempotent methods through retriable_request_headers on `:method`."""
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
    rp = route_components_pb2.RetryPolicy(
        retry_on=",".join(r.on), num_retries=wrappers_pb2.UInt32Value(value=r.attempts),
        retriable_status_codes=list(r.status_codes), host_selection_retry_max_attempts=3,
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=duration(r.backoff_base_s), max_interval=duration(r.backoff_max_s)))
    rp.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts",
                                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()))
    if r.per_try_timeout_s:
        rp.per_try_timeout.CopyFrom(duration(r.per_try_timeout_s))
    if http and not r.non_idempotent:
        rp.retriable_request_headers.add(
            name=":method", string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=_IDEMPOTENT_METHODS)))
    return rp


def hash_policies(hashes) -> list:
    out = []
    for kind, name in hashes:
        hp = route_components_pb2.RouteAction.HashPolicy()
        if kind == "header":
            hp.header.header_name = name
        elif kind == "cookie":
            hp.cookie.name = name
        elif kind == "source_ip":
            hp.connection_properties.source_ip = True
        else:
            hp.query_parameter.name = name
        out.append(hp)
    return out


def apply_traffic_route(r: route_components_pb2.Route, traffic, http: bool) -> route_components_pb2.Route:
    """Add a service's retry and hash policies to a route that targets it (in place)."""
    if traffic.retries is not None:
        r.route.retry_policy.CopyFrom(retry_policy(traffic.retries, http))
    r.route.hash_policy.extend(hash_policies(traffic.hash))
    if traffic.fault is not None:
        r.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(fault_config(traffic.fault)))
    r.route.request_mirror_policies.extend(mirror_policy(m) for m in traffic.mirrors)
    return r


def apply_traffic_cluster(c: cluster_pb2.Cluster, traffic) -> cluster_pb2.Cluster:
    """Add a service's outlier detection, circuit breakers and balancer settings (in place)."""
    from envoy.config.cluster.v3 import circuit_breaker_pb2, outlier_detection_pb2
    if traffic.outlier:
        od = outlier_detection_pb2.OutlierDetection()
        for k, v in traffic.outlier:
            if k in ("interval", "base_ejection_time", "max_ejection_time"):
                getattr(od, k).CopyFrom(duration(v))
            elif k == "success_rate_stdev_factor":
                od.success_rate_stdev_factor.value = int(round(v * 1000))
            else:
                getattr(od, k).value = int(v)
        c.outlier_detection.CopyFrom(od)
    if traffic.circuit_breakers:
        t = circuit_breaker_pb2.CircuitBreakers.Thresholds()
        for k, v in traffic.circuit_breakers:
            if k == "budget_percent":
                t.retry_budget.budget_percent.value = float(v)
            elif k == "min_retry_concurrency":
                t.retry_budget.min_retry_concurrency.value = int(v)
            else:
                getattr(t, k).value = int(v)
        c.circuit_breakers.thresholds.append(t)
    if traffic.panic_threshold is not None:
        c.common_lb_config.healthy_panic_threshold.value = float(traffic.panic_threshold)
    for k, v in traffic.ring_hash:
        if k == "hash_function":
            c.ring_hash_lb_config.hash_function = cluster_pb2.Cluster.RingHashLbConfig.HashFunction.Value(str(v).upper())
        else:
            getattr(c.ring_hash_lb_config, k).value = int(v)
    if traffic.maglev_table_size is not None:
        c.maglev_lb_config.table_size.value = int(traffic.maglev_table_size)
    if traffic.health_check is not None:
        c.health_checks.append(health_check(traffic.health_check))
    return c


def health_check(spec):
    """A control.model.HealthCheckSpec as Envoy's HealthCheck.  no_traffic_interval is set to the
    interval, so an Envoy checks as often as our sidecar does (Envoy's default is 60 s while a
    cluster has no traffic)."""
    from envoy.config.core.v3 import health_check_pb2
    from envoy.type.v3 import range_pb2
    hc = health_check_pb2.HealthCheck(
        interval=duration(spec.interval_s), timeout=duration(spec.timeout_s),
        no_traffic_interval=duration(spec.interval_s),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=spec.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=spec.healthy_threshold),
        interval_jitter_percent=spec.interval_jitter_percent)
    if spec.interval_jitter_s:
        hc.interval_jitter.CopyFrom(duration(spec.interval_jitter_s))
    if spec.initial_jitter_s:
        hc.initial_jitter.CopyFrom(duration(spec.initial_jitter_s))
    if spec.kind == "http":
        hc.http_health_check.path = spec.path
        hc.http_health_check.host = spec.host
        hc.http_health_check.expected_statuses.extend(
            range_pb2.Int64Range(start=s, end=e) for s, e in spec.expected_statuses)
    elif spec.kind == "grpc":
        hc.grpc_health_check.service_name = spec.service_name
    else:
        hc.tcp_health_check.SetInParent()
    return hc


FAULT_FILTER = "envoy.filters.http.fault"


def _fraction(percent: float):
    return percent_pb2.FractionalPercent(numerator=int(round(percent * 10000)),
                                         denominator=percent_pb2.FractionalPercent.MILLION)


def fault_config(spec):
    """A control.model.FaultSpec as Envoy's HTTPFault (the per-route config of the fault filter)."""
    from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    cfg = fault_pb2.HTTPFault()
    if spec.delay_s is not None or spec.header_delay:
        cfg.delay.percentage.CopyFrom(_fraction(spec.delay_percent))
        if spec.header_delay:
            cfg.delay.header_delay.CopyFrom(common.FaultDelay.HeaderDelay())
        else:
            cfg.delay.fixed_delay.CopyFrom(duration(spec.delay_s))
    if spec.abort_status is not None or spec.abort_grpc_status is not None or spec.header_abort:
        cfg.abort.percentage.CopyFrom(_fraction(spec.abort_percent))
        if spec.header_abort:
            cfg.abort.header_abort.SetInParent()
        elif spec.abort_grpc_status is not None:
            cfg.abort.grpc_status = spec.abort_grpc_status
        else:
            cfg.abort.http_status = spec.abort_status
    return cfg


def fault_filter() -> hcm_pb2.HttpFilter:
    """The listener-level fault filter injects nothing; routes carry their faults in
    typed_per_filter_config (Envoy's per-route override)."""
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    return hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault()))


def tcp_listener(name: str, host: str, port: int, cluster_name: str, idle_timeout_s: float | None,
                 connect_attempts: int) -> listener_pb2.Listener:
    """A listener whose one network filter is Envoy's TcpProxy to `cluster_name`."""
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster_name, idle_timeout=duration(idle_timeout_s),
                                max_connect_attempts=wrappers_pb2.UInt32Value(value=connect_attempts))
    return listener_pb2.Listener(
        name=name, address=socket_address(host, port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(tp))])])


def mirror_policy(spec):
    from envoy.config.core.v3 import base_pb2 as core
    return route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=spec.to, runtime_fraction=core.RuntimeFractionalPercent(default_value=_fraction(spec.percent)))


# ---- protobuf-first gateway (issue 5): Envoy's own filter messages, honoured by our sidecar too ----
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
GRPC_WEB_FILTER = "envoy.filters.http.grpc_web"
RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
DESCRIPTORS_KEY = "protomesh.descriptor_set"
MAX_TRANSCODE_BODY = 4 << 20


def transcoder_filter(descriptor_set: bytes, services: list[str]) -> hcm_pb2.HttpFilter:
    """HTTP/JSON ↔ gRPC from the services' google.api.http rules.  Unknown query parameters are
    refused (400), `+` in a query means a space, and a gRPC error becomes a google.rpc.Status body."""
    from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2 as t
    cfg = t.GrpcJsonTranscoder(
        proto_descriptor_bin=descriptor_set, services=sorted(services), convert_grpc_status=True,
        query_param_unescape_plus=True,
        print_options=t.GrpcJsonTranscoder.PrintOptions(always_print_primitive_fields=False),
        request_validation_options=t.GrpcJsonTranscoder.RequestValidationOptions(reject_unknown_query_parameters=True),
        max_request_body_size=wrappers_pb2.UInt32Value(value=MAX_TRANSCODE_BODY),
        max_response_body_size=wrappers_pb2.UInt32Value(value=MAX_TRANSCODE_BODY))
    return hcm_pb2.HttpFilter(name=TRANSCODER_FILTER, typed_config=pack(cfg))


def grpc_web_filter() -> hcm_pb2.HttpFilter:
    from envoy.extensions.filters.http.grpc_web.v3 import grpc_web_pb2
    return hcm_pb2.HttpFilter(name=GRPC_WEB_FILTER, typed_config=pack(grpc_web_pb2.GrpcWeb()))


def ratelimit_filter() -> hcm_pb2.HttpFilter:
    """Listener-level LocalRateLimit without a bucket: only routes with a per-route bucket
    (`typed_per_filter_config`) are limited."""
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as l
    return hcm_pb2.HttpFilter(name=RATELIMIT_FILTER, typed_config=pack(l.LocalRateLimit(stat_prefix="rpc_ratelimit")))


def route_rate_limit(route: route_components_pb2.Route, requests: int, per_s: float, burst: int,
                     grpc: bool) -> route_components_pb2.Route:
    """A token bucket on one route (in place): `requests` per `per_s`, `burst` more at once."""
    from envoy.config.core.v3 import base_pb2 as core
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as l
    from envoy.type.v3 import token_bucket_pb2
    always = core.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED),
        runtime_key="protomesh_rpc_ratelimit")
    cfg = l.LocalRateLimit(
        stat_prefix="rpc_ratelimit",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=requests + burst, tokens_per_fill=wrappers_pb2.UInt32Value(value=requests),
            fill_interval=duration(per_s)),
        filter_enabled=always, filter_enforced=always, rate_limited_as_resource_exhausted=grpc)
    route.typed_per_filter_config[RATELIMIT_FILTER].CopyFrom(pack(cfg))
    return route


def with_http_filters(lst: listener_pb2.Listener, filters: list) -> listener_pb2.Listener:
    """Insert HTTP filters before the router of a listener's HttpConnectionManager (in place)."""
    if not filters:
        return lst
    f = lst.filter_chains[0].filters[0]
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    router = list(hcm.http_filters)
    del hcm.http_filters[:]
    hcm.http_filters.extend(list(filters) + router)
    f.typed_config.CopyFrom(pack(hcm))
    return lst


def with_descriptors(lst: listener_pb2.Listener, descriptor_set: bytes) -> listener_pb2.Listener:
    """The mesh's FileDescriptorSet as listener metadata: a protomesh gateway answers gRPC server
    reflection from it (Envoy ignores the key)."""
    from google.protobuf import descriptor_pb2
    if descriptor_set:
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        lst.metadata.typed_filter_metadata[DESCRIPTORS_KEY].CopyFrom(pack(fds))
    return lst
