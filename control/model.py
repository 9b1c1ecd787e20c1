"""mesh.yaml → a frozen, validated mesh description.

mesh.yaml holds deployment facts and mesh-wide policy; the control server compiles it (with
the services' .proto files and the live registrations) into xDS.  Validation is complete at
load: an unknown service in a route, a bad address or duration is reported with file, field and
the fix, and a broken edit leaves the previous mesh in force.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from control.errors import MeshError

PROTOCOLS = ("grpc", "http", "tcp")
LB_POLICIES = ("round_robin", "least_request", "random", "ring_hash", "maglev")
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes", "refused-stream",
            "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
HASH_FUNCTIONS = ("xx_hash", "murmur_hash_2")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class GrpcMethod:
    name: str
    client_streaming: bool
    server_streaming: bool


@dataclass(frozen=True)
class GrpcService:
    full_name: str  # e.g. demo.users.v1.Users
    methods: tuple[GrpcMethod, ...]
    file: str
    # The compiled FileDescriptorSet (with imports and source info) this service came from:
    # transcoding, reflection and per-rpc policy read it.  Empty when protos were not compiled.
    descriptor_set: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True)
class Retries:
    """services.<name>.retries → Envoy RouteAction.retry_policy on every route to the service."""

    on: tuple[str, ...] = ("connect-failure", "reset", "5xx")
    attempts: int = 2  # retries after the first try (Envoy num_retries)
    per_try_timeout_s: float | None = None
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    status_codes: tuple[int, ...] = ()
    non_idempotent: bool = False  # also retry POST/PATCH (HTTP services)


@dataclass(frozen=True)
class Traffic:
    """Per-service resilience settings; each value is an Envoy field name → value."""

    retries: Retries | None = None
    outlier: tuple[tuple[str, float], ...] = ()  # OutlierDetection fields (durations in seconds)
    circuit_breakers: tuple[tuple[str, float], ...] = ()  # Thresholds fields (+ budget_percent, min_retry_concurrency)
    hash: tuple[tuple[str, str], ...] = ()  # (header|cookie|source_ip|query, name)
    panic_threshold: float | None = None
    ring_hash: tuple[tuple[str, object], ...] = ()  # minimum_ring_size, maximum_ring_size, hash_function
    maglev_table_size: int | None = None
    health_check: "HealthCheckSpec | None" = None
    fault: "FaultSpec | None" = None
    mirrors: tuple["MirrorSpec", ...] = ()


@dataclass(frozen=True)
class HealthCheckSpec:
    """services.<name>.health_check → Envoy Cluster.health_checks[0]."""

    kind: str  # http | grpc | tcp
    interval_s: float = 5.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1
    interval_jitter_s: float = 0.0
    interval_jitter_percent: int = 0
    initial_jitter_s: float = 0.0
    path: str = "/healthz"
    host: str = ""
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)  # [start, end)
    service_name: str = ""


@dataclass(frozen=True)
class FaultSpec:
    """services.<name>.fault → Envoy's HTTPFault on every route to the service."""

    delay_s: float | None = None
    delay_percent: float = 100.0
    header_delay: bool = False
    abort_status: int | None = None  # HTTP status
    abort_grpc_status: int | None = None
    abort_percent: float = 100.0
    header_abort: bool = False


@dataclass(frozen=True)
class MirrorSpec:
    """services.<name>.mirror → RouteAction.request_mirror_policies entry."""

    to: str
    percent: float = 100.0


@dataclass(frozen=True)
class Service:
    name: str
    protocol: str
    lb: str = "round_robin"
    timeout_s: float | None = 15.0
    connect_timeout_s: float = 1.0
    endpoints: tuple[tuple[str, int], ...] = ()
    protos: tuple[str, ...] = ()
    grpc_services: tuple[GrpcService, ...] = ()
    traffic: Traffic = Traffic()
    # services.<name>.methods: ((rpc or "*", ((dotted field, options.Value), ...)), ...)
    method_overrides: tuple = ()


@dataclass(frozen=True)
class HeaderRule:
    name: str
    kind: str  # exact | prefix | regex | present
    value: str = ""


@dataclass(frozen=True)
class GatewayRoute:
    name: str
    path_kind: str  # prefix | path | regex
    path_value: str
    headers: tuple[HeaderRule, ...] = ()
    query: tuple[HeaderRule, ...] = ()
    grpc: bool = False
    split: tuple[tuple[str, int], ...] = ()  # (service, weight)
    timeout_s: float | None = None  # None: the service's timeout
    rewrite_prefix: str | None = None


@dataclass(frozen=True)
class Gateway:
    http: tuple[str, int] | None
    grpc: tuple[str, int] | None
    routes: tuple[GatewayRoute, ...]
    tcp: tuple["TcpRoute", ...] = ()
    stream_idle_timeout_s: float | None = None  # None: the data plane's default (Envoy's: 5 min)


@dataclass(frozen=True)
class TcpRoute:
    """gateway.tcp[] → a listener with Envoy's TcpProxy network filter to one `protocol: tcp` service."""

    name: str
    listen: tuple[str, int]
    to: str
    idle_timeout_s: float | None = 3600.0
    connect_attempts: int = 3


# Share of new traces a sidecar samples when mesh.yaml does not say: 1 %, as Istio and Kong
# default to.  Exporting every request's spans costs a sidecar about as much CPU as proxying the
# request (see the README's performance section); a caller's sampled decision is always followed.
DEFAULT_SAMPLING = 0.01


@dataclass(frozen=True)
class Telemetry:
    otlp_endpoint: str | None = None
    sampling: float = DEFAULT_SAMPLING


@dataclass(frozen=True)
class Mesh:
    source: str
    services: dict[str, Service] = field(default_factory=dict)
    gateway: Gateway | None = None
    telemetry: Telemetry = Telemetry()
    proto_paths: tuple[str, ...] = ()

    def service_for_grpc(self, full_name: str) -> Service | None:
        for s in self.services.values():
            if any(g.full_name == full_name for g in s.grpc_services):
                return s
        return None


def parse_duration(value, file: str, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value).strip())
    if not m:
        raise MeshError(file, where, f"{value!r} is not a duration", "write e.g. 250ms, 5s or 1m")
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def parse_address(value, file: str, where: str) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError(file, where, f"{value!r} is not host:port", "write e.g. 127.0.0.1:8080")
    return host, int(port)


def _mapping(value, file: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MeshError(file, where, f"expected a mapping, got {type(value).__name__}")
    return value


def _known(d: dict, allowed: set[str], file: str, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise MeshError(file, f"{where}.{key}" if where else str(key), "unknown field",
                            f"use one of: {', '.join(sorted(allowed))}")


def load_mesh(path: str | Path, compile_protos=None) -> Mesh:
    """Read and validate mesh.yaml.  `compile_protos(files, include_paths, mesh_file)` returns the
    gRPC services of each proto file (control.sources.protos.compile_protos by default)."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MeshError(file, "", f"cannot read: {exc.strerror}", "check the --mesh path") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise MeshError(file, "", f"YAML syntax error: {exc.problem}", "fix the indentation or quoting",
                        line=line) from None
    except yaml.YAMLError as exc:
        raise MeshError(file, "", f"YAML error: {exc}") from None
    return parse_mesh(_mapping(doc, file, "(top level)"), file, path.parent, compile_protos)


def parse_mesh(doc: dict, file: str, base: Path, compile_protos=None) -> Mesh:
    _known(doc, {"services", "gateway", "telemetry", "proto_paths"}, file, "")
    raw_paths = doc.get("proto_paths") or []
    if not isinstance(raw_paths, list) or not all(isinstance(p, str) and p for p in raw_paths):
        raise MeshError(file, "proto_paths", "must be a list of directories", "write e.g. proto_paths: [../proto]")
    proto_paths = tuple(str((base / p).resolve()) for p in raw_paths)
    services_doc = _mapping(doc.get("services"), file, "services")
    if not services_doc:
        raise MeshError(file, "services", "no services defined", "add at least one service")
    services = {}
    for name, sdoc in services_doc.items():
        services[name] = _parse_service(str(name), _mapping(sdoc, file, f"services.{name}"), file,
                                        base, proto_paths, compile_protos)
    _check_grpc_services_unique(services, file)
    _check_mirrors(services, file)
    mesh = Mesh(file, services, None, _parse_telemetry(doc.get("telemetry"), file), proto_paths)
    gateway = _parse_gateway(doc.get("gateway"), file, mesh) if doc.get("gateway") is not None else None
    return Mesh(file, services, gateway, mesh.telemetry, proto_paths)


def _parse_service(name: str, d: dict, file: str, base: Path, proto_paths, compile_protos) -> Service:
    where = f"services.{name}"
    _known(d, {"protocol", "lb", "timeout", "connect_timeout", "endpoints", "proto", "retries", "outlier_detection",
               "circuit_breakers", "hash", "panic_threshold", "ring_hash", "maglev", "methods",
               "health_check", "fault", "mirror"}, file, where)
    if not _NAME.match(name):
        raise MeshError(file, where, f"service name {name!r} is not a DNS label",
                        "use lower case letters, digits and '-'")
    protocol = d.get("protocol")
    if protocol not in PROTOCOLS:
        raise MeshError(file, f"{where}.protocol", f"must be one of {PROTOCOLS}, got {protocol!r}",
                        "set protocol: grpc or protocol: http")
    lb = d.get("lb", "round_robin")
    if lb not in LB_POLICIES:
        raise MeshError(file, f"{where}.lb", f"unknown policy {lb!r}", f"use one of {', '.join(LB_POLICIES)}")
    timeout = parse_duration(d["timeout"], file, f"{where}.timeout") if "timeout" in d else 15.0
    connect = parse_duration(d.get("connect_timeout", 1.0), file, f"{where}.connect_timeout")
    eps = d.get("endpoints") or []
    if not isinstance(eps, list):
        raise MeshError(file, f"{where}.endpoints", "must be a list of host:port")
    endpoints = tuple(parse_address(e, file, f"{where}.endpoints[{i}]") for i, e in enumerate(eps))
    protos = d.get("proto") or []
    protos = [protos] if isinstance(protos, str) else protos
    if not isinstance(protos, list) or not all(isinstance(p, str) and p for p in protos):
        raise MeshError(file, f"{where}.proto", "must be a .proto path or a list of them",
                        "write e.g. proto: demo/users/v1/users.proto")
    grpc_services: tuple = ()
    if protos:
        if protocol != "grpc":
            raise MeshError(file, f"{where}.proto", "only grpc services take a proto", "remove proto or set protocol: grpc")
        if compile_protos is None:
            from control.sources.protos import compile_protos
        found = compile_protos(protos, proto_paths or (str(base),), file)
        grpc_services = tuple(g for p in protos for g in found[p])
        if not grpc_services:
            raise MeshError(file, f"{where}.proto", f"{', '.join(protos)} defines no service",
                            "point proto at the file that declares the service")
    elif protocol == "grpc":
        raise MeshError(file, f"{where}.proto", "a grpc service needs its .proto",
                        "add proto: path/to/service.proto (relative to proto_paths)")
    traffic = _parse_traffic(d, lb, file, where)
    overrides = _parse_method_overrides(d.get("methods"), grpc_services, file, where)
    service = Service(name, protocol, lb, timeout or None, connect, endpoints, tuple(protos), grpc_services, traffic,
                      overrides)
    from control.sources.options import check_policies
    check_policies(service, file)  # policy declared in the protos is validated at load, like mesh.yaml
    return service


def _parse_method_overrides(value, grpc_services, file: str, where: str) -> tuple:
    """services.<name>.methods: { <Rpc or "*">: { timeout: 2s, rate_limit: {...}, ... } } — explicit
    per-rpc overrides of the policy declared in the .proto (see control/sources/options.py)."""
    from control.sources.options import Value, flatten_override
    d = _mapping(value, file, f"{where}.methods")
    if d and not grpc_services:
        raise MeshError(file, f"{where}.methods", "only grpc services have rpcs", "remove methods")
    known = {m.name for g in grpc_services for m in g.methods}
    out = []
    for rpc, spec in d.items():
        rpc = str(rpc)
        w = f"{where}.methods.{rpc}"
        if rpc != "*" and rpc not in known:
            raise MeshError(file, w, f"no rpc {rpc!r} in this service", f"use \"*\" or one of: {', '.join(sorted(known))}")
        flat = flatten_override(_mapping(spec, file, w), file, w, parse_duration)
        out.append((rpc, tuple((k, Value(v, f"mesh.yaml {w}.{k}")) for k, v in sorted(flat.items()))))
    return tuple(out)


_OUTLIER_COUNTS = ("consecutive_5xx", "consecutive_gateway_failure", "max_ejection_percent",
                   "enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                   "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor",
                   "enforcing_success_rate", "failure_percentage_threshold", "failure_percentage_minimum_hosts",
                   "failure_percentage_request_volume", "enforcing_failure_percentage")
_OUTLIER_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time")
_BREAKER_COUNTS = ("max_connections", "max_pending_requests", "max_requests", "max_retries",
                   "budget_percent", "min_retry_concurrency")


def _count(v, file: str, where: str, top: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (top is not None and v > top):
        raise MeshError(file, where, f"{v!r} is not a number in range", f"write a number >= 0{'' if top is None else f' and <= {top:g}'}")
    return v


def _parse_traffic(d: dict, lb: str, file: str, where: str) -> Traffic:
    retries = None
    if d.get("retries") is not None:
        r = _mapping(d["retries"], file, f"{where}.retries")
        rw = f"{where}.retries"
        _known(r, {"retry_on", "attempts", "per_try_timeout", "backoff", "status_codes", "non_idempotent"}, file, rw)
        on = r.get("retry_on", list(Retries.on))
        on = [on] if isinstance(on, str) else on
        if not isinstance(on, list) or not on or any(c not in RETRY_ON for c in on):
            raise MeshError(file, f"{rw}.retry_on", f"{on!r} is not a list of retry conditions", f"use some of: {', '.join(RETRY_ON)}")
        backoff = _mapping(r.get("backoff"), file, f"{rw}.backoff")
        _known(backoff, {"base", "max"}, file, f"{rw}.backoff")
        base = parse_duration(backoff.get("base", "25ms"), file, f"{rw}.backoff.base")
        cap = parse_duration(backoff["max"], file, f"{rw}.backoff.max") if "max" in backoff else 10 * base
        if base <= 0 or cap < base:
            raise MeshError(file, f"{rw}.backoff", "needs 0 < base <= max", "e.g. backoff: { base: 25ms, max: 250ms }")
        codes = r.get("status_codes") or []
        if not isinstance(codes, list) or any(not isinstance(c, int) or not 100 <= c <= 599 for c in codes):
            raise MeshError(file, f"{rw}.status_codes", "must be a list of HTTP status codes")
        if codes and "retriable-status-codes" not in on:
            on = list(on) + ["retriable-status-codes"]
        per_try = parse_duration(r["per_try_timeout"], file, f"{rw}.per_try_timeout") if "per_try_timeout" in r else None
        retries = Retries(tuple(on), int(_count(r.get("attempts", 2), file, f"{rw}.attempts", 10)), per_try or None,
                          base, cap, tuple(codes), bool(r.get("non_idempotent", False)))
    outlier = []
    od = _mapping(d.get("outlier_detection"), file, f"{where}.outlier_detection")
    _known(od, set(_OUTLIER_COUNTS + _OUTLIER_DURATIONS), file, f"{where}.outlier_detection")
    for k, v in od.items():
        w = f"{where}.outlier_detection.{k}"
        outlier.append((k, parse_duration(v, file, w) if k in _OUTLIER_DURATIONS
                        else _count(v, file, w, 100 if ("percent" in k or k.startswith("enforcing")) else None)))
    cb = _mapping(d.get("circuit_breakers"), file, f"{where}.circuit_breakers")
    _known(cb, set(_BREAKER_COUNTS), file, f"{where}.circuit_breakers")
    breakers = tuple((k, _count(v, file, f"{where}.circuit_breakers.{k}", 100 if k == "budget_percent" else None))
                     for k, v in cb.items())
    hashes = []
    hl = d.get("hash") or []
    if not isinstance(hl, list):
        raise MeshError(file, f"{where}.hash", "must be a list", "e.g. hash: [ { header: x-user } ]")
    for i, h in enumerate(hl):
        h = _mapping(h, file, f"{where}.hash[{i}]")
        _known(h, {"header", "cookie", "source_ip", "query"}, file, f"{where}.hash[{i}]")
        if len(h) != 1:
            raise MeshError(file, f"{where}.hash[{i}]", "needs exactly one of header, cookie, source_ip, query")
        k, v = next(iter(h.items()))
        hashes.append((k, "" if k == "source_ip" else str(v)))
    if hashes and lb not in ("ring_hash", "maglev"):
        raise MeshError(file, f"{where}.hash", f"only consistent-hash balancers use it (lb is {lb})",
                        "set lb: ring_hash or lb: maglev")
    panic = d.get("panic_threshold")
    if panic is not None:
        panic = _count(panic, file, f"{where}.panic_threshold", 100)
    ring = _mapping(d.get("ring_hash"), file, f"{where}.ring_hash")
    _known(ring, {"minimum_ring_size", "maximum_ring_size", "hash_function"}, file, f"{where}.ring_hash")
    if ring.get("hash_function", "xx_hash") not in HASH_FUNCTIONS:
        raise MeshError(file, f"{where}.ring_hash.hash_function", f"{ring['hash_function']!r} is unknown",
                        f"use one of {', '.join(HASH_FUNCTIONS)}")
    maglev = _mapping(d.get("maglev"), file, f"{where}.maglev")
    _known(maglev, {"table_size"}, file, f"{where}.maglev")
    return Traffic(retries, tuple(outlier), breakers, tuple(hashes), panic, tuple(ring.items()),
                   maglev.get("table_size"), _parse_health_check(d.get("health_check"), file, where),
                   _parse_fault(d.get("fault"), file, where), _parse_mirrors(d.get("mirror"), file, where))


def _percent(v, file: str, where: str) -> float:
    return float(_count(v, file, where, 100))


def _parse_health_check(value, file: str, where: str) -> HealthCheckSpec | None:
    if value is None:
        return None
    w = f"{where}.health_check"
    d = _mapping(value, file, w)
    kinds = ("http", "grpc", "tcp")
    _known(d, set(kinds) | {"interval", "timeout", "unhealthy_threshold", "healthy_threshold",
                            "interval_jitter", "interval_jitter_percent", "initial_jitter"}, file, w)
    chosen = [k for k in kinds if k in d]
    if len(chosen) != 1:
        raise MeshError(file, w, "needs exactly one of http, grpc, tcp",
                        "e.g. health_check: { http: { path: /healthz }, interval: 5s }")
    kind = chosen[0]
    spec = _mapping(d[kind], file, f"{w}.{kind}")
    extra: dict = {}
    if kind == "http":
        _known(spec, {"path", "host", "expected_statuses"}, file, f"{w}.http")
        path = str(spec.get("path", "/healthz"))
        if not path.startswith("/"):
            raise MeshError(file, f"{w}.http.path", f"{path!r} must start with /", f"write /{path}")
        ranges = []
        for i, s in enumerate(spec.get("expected_statuses") or [200]):
            if isinstance(s, int) and not isinstance(s, bool) and 100 <= s < 600:
                ranges.append((s, s + 1))
            elif isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s) and 100 <= s[0] <= s[1] < 600:
                ranges.append((s[0], s[1] + 1))
            else:
                raise MeshError(file, f"{w}.http.expected_statuses[{i}]", f"{s!r} is not a status or [first, last]",
                                "e.g. expected_statuses: [200, [200, 299]]")
        extra = {"path": path, "host": str(spec.get("host", "")), "expected_statuses": tuple(ranges)}
    elif kind == "grpc":
        _known(spec, {"service_name"}, file, f"{w}.grpc")
        extra = {"service_name": str(spec.get("service_name", ""))}
    else:
        _known(spec, set(), file, f"{w}.tcp")

    def dur(key, default):
        return parse_duration(d[key], file, f"{w}.{key}") if key in d else default

    def count(key, default, top=None):
        return int(_count(d[key], file, f"{w}.{key}", top)) if key in d else default
    interval, timeout = dur("interval", 5.0), dur("timeout", 1.0)
    if interval <= 0 or timeout <= 0:
        raise MeshError(file, w, "interval and timeout must be > 0", "e.g. interval: 5s, timeout: 1s")
    return HealthCheckSpec(kind, interval, timeout, max(count("unhealthy_threshold", 3), 1),
                           max(count("healthy_threshold", 1), 1), dur("interval_jitter", 0.0),
                           count("interval_jitter_percent", 0, 100), dur("initial_jitter", 0.0), **extra)


def _parse_fault(value, file: str, where: str) -> FaultSpec | None:
    if value is None:
        return None
    w = f"{where}.fault"
    d = _mapping(value, file, w)
    _known(d, {"delay", "abort"}, file, w)
    if not d:
        raise MeshError(file, w, "needs delay or abort", "e.g. fault: { abort: { status: 503, percent: 5 } }")
    kw: dict = {}
    if d.get("delay") is not None:
        dd = _mapping(d["delay"], file, f"{w}.delay")
        _known(dd, {"fixed", "percent", "header"}, file, f"{w}.delay")
        if ("fixed" in dd) == bool(dd.get("header")):
            raise MeshError(file, f"{w}.delay", "needs exactly one of fixed or header: true",
                            "e.g. delay: { fixed: 100ms, percent: 10 }")
        if "fixed" in dd:
            kw["delay_s"] = parse_duration(dd["fixed"], file, f"{w}.delay.fixed")
        kw["header_delay"] = bool(dd.get("header"))
        kw["delay_percent"] = _percent(dd.get("percent", 100), file, f"{w}.delay.percent")
    if d.get("abort") is not None:
        ad = _mapping(d["abort"], file, f"{w}.abort")
        _known(ad, {"status", "grpc_status", "percent", "header"}, file, f"{w}.abort")
        given = [k for k in ("status", "grpc_status") if k in ad] + (["header"] if ad.get("header") else [])
        if len(given) != 1:
            raise MeshError(file, f"{w}.abort", "needs exactly one of status, grpc_status or header: true",
                            "e.g. abort: { status: 503, percent: 5 }")
        status = ad.get("status")
        if status is not None and (not isinstance(status, int) or not 200 <= status < 600):
            raise MeshError(file, f"{w}.abort.status", f"{status!r} is not an HTTP status in [200, 600)")
        gstatus = ad.get("grpc_status")
        if gstatus is not None and (not isinstance(gstatus, int) or not 0 < gstatus <= 16):
            raise MeshError(file, f"{w}.abort.grpc_status", f"{gstatus!r} is not a gRPC status code 1..16")
        kw.update(abort_status=status, abort_grpc_status=gstatus, header_abort=bool(ad.get("header")),
                  abort_percent=_percent(ad.get("percent", 100), file, f"{w}.abort.percent"))
    return FaultSpec(**kw)


def _parse_mirrors(value, file: str, where: str) -> tuple[MirrorSpec, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        w = f"{where}.mirror" + (f"[{i}]" if isinstance(value, list) else "")
        m = _mapping(item, file, w)
        _known(m, {"to", "percent"}, file, w)
        if not isinstance(m.get("to"), str):
            raise MeshError(file, f"{w}.to", "names the service that receives the copies", "e.g. mirror: { to: users-shadow, percent: 10 }")
        out.append(MirrorSpec(m["to"], _percent(m.get("percent", 100), file, f"{w}.percent")))
    return tuple(out)


def _check_mirrors(services: dict[str, Service], file: str) -> None:
    for s in services.values():
        if s.protocol == "tcp":
            t = s.traffic
            for key, value in (("retries", t.retries), ("hash", t.hash), ("fault", t.fault), ("mirror", t.mirrors)):
                if value:
                    raise MeshError(file, f"services.{s.name}.{key}", "is HTTP/gRPC policy; a tcp service has none",
                                    f"remove {key}")
        for i, m in enumerate(s.traffic.mirrors):
            target = services.get(m.to)
            where = f"services.{s.name}.mirror" + (f"[{i}]" if len(s.traffic.mirrors) > 1 else "") + ".to"
            if target is None:
                raise MeshError(file, where, f"unknown service {m.to!r}", f"use one of: {', '.join(sorted(services))}")
            if target.protocol != s.protocol or m.to == s.name:
                raise MeshError(file, where, f"{m.to!r} cannot shadow {s.name}",
                                "mirror to another service of the same protocol")


def _check_grpc_services_unique(services: dict[str, Service], file: str) -> None:
    owner: dict[str, str] = {}
    for s in services.values():
        for g in s.grpc_services:
            if g.full_name in owner:
                raise MeshError(file, f"services.{s.name}.proto",
                                f"gRPC service {g.full_name} is already served by {owner[g.full_name]}",
                                "each gRPC service belongs to one mesh service")
            owner[g.full_name] = s.name


def _parse_telemetry(value, file: str) -> Telemetry:
    d = _mapping(value, file, "telemetry")
    _known(d, {"otlp_endpoint", "sampling"}, file, "telemetry")
    sampling = d.get("sampling", DEFAULT_SAMPLING)
    if not isinstance(sampling, (int, float)) or not 0 <= sampling <= 1:
        raise MeshError(file, "telemetry.sampling", f"{sampling!r} is not in [0, 1]", "write e.g. 0.1 for 10%")
    return Telemetry(d.get("otlp_endpoint"), float(sampling))


def _parse_gateway(value, file: str, mesh: Mesh) -> Gateway:
    d = _mapping(value, file, "gateway")
    _known(d, {"http", "grpc", "routes", "tcp", "stream_idle_timeout"}, file, "gateway")
    http = parse_address(d["http"], file, "gateway.http") if d.get("http") else None
    grpc = parse_address(d["grpc"], file, "gateway.grpc") if d.get("grpc") else None
    tcp = _parse_tcp_routes(d.get("tcp"), file, mesh)
    if http is None and grpc is None and not tcp:
        raise MeshError(file, "gateway", "needs an http, grpc or tcp listen address", "add http: 0.0.0.0:8080")
    routes_doc = d.get("routes") or []
    if not isinstance(routes_doc, list):
        raise MeshError(file, "gateway.routes", "must be a list")
    routes = tuple(_parse_route(_mapping(r, file, f"gateway.routes[{i}]"), i, file, mesh)
                   for i, r in enumerate(routes_doc))
    for r in routes:
        for target, _ in r.split:
            if mesh.services[target].protocol == "tcp":
                raise MeshError(file, f"gateway.routes[{routes.index(r)}]", f"{target} is a tcp service",
                                "reach tcp services through gateway.tcp")
    idle = parse_duration(d["stream_idle_timeout"], file, "gateway.stream_idle_timeout") \
        if d.get("stream_idle_timeout") is not None else None
    return Gateway(http, grpc, routes, tcp, idle)


def _parse_tcp_routes(value, file: str, mesh: Mesh) -> tuple[TcpRoute, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MeshError(file, "gateway.tcp", "must be a list", "e.g. tcp: [ { listen: 0.0.0.0:6379, to: cache } ]")
    out = []
    for i, item in enumerate(value):
        w = f"gateway.tcp[{i}]"
        t = _mapping(item, file, w)
        _known(t, {"name", "listen", "to", "idle_timeout", "connect_attempts"}, file, w)
        to = _service_ref(t.get("to"), file, f"{w}.to", mesh)
        if mesh.services[to].protocol != "tcp":
            raise MeshError(file, f"{w}.to", f"{to} is not a tcp service", "set protocol: tcp on it")
        idle = parse_duration(t["idle_timeout"], file, f"{w}.idle_timeout") if "idle_timeout" in t else 3600.0
        attempts = int(_count(t.get("connect_attempts", 3), file, f"{w}.connect_attempts", 10))
        out.append(TcpRoute(str(t.get("name") or f"gateway_tcp_{i}"),
                            parse_address(t.get("listen"), file, f"{w}.listen"), to, idle or None, max(attempts, 1)))
    return tuple(out)


def _parse_route(d: dict, i: int, file: str, mesh: Mesh) -> GatewayRoute:
    where = f"gateway.routes[{i}]"
    _known(d, {"name", "match", "to", "split", "timeout", "rewrite_prefix"}, file, where)
    m = _mapping(d.get("match"), file, f"{where}.match")
    _known(m, {"path_prefix", "path", "path_regex", "headers", "query", "grpc_service", "grpc_method"},
           file, f"{where}.match")
    grpc = False
    kinds = [k for k in ("path_prefix", "path", "path_regex", "grpc_service") if k in m]
    if len(kinds) != 1:
        raise MeshError(file, f"{where}.match", "needs exactly one of path_prefix, path, path_regex, grpc_service",
                        "e.g. match: { path_prefix: /v1/products }")
    if "grpc_service" in m:
        svc = str(m["grpc_service"])
        owner = mesh.service_for_grpc(svc)
        if owner is None:
            known = sorted(g.full_name for s in mesh.services.values() for g in s.grpc_services)
            raise MeshError(file, f"{where}.match.grpc_service", f"no service's proto declares {svc}",
                            f"use one of: {', '.join(known) or '(none)'}")
        grpc = True
        if "grpc_method" in m:
            method = str(m["grpc_method"])
            gs = next(g for g in owner.grpc_services if g.full_name == svc)
            if method not in {x.name for x in gs.methods}:
                raise MeshError(file, f"{where}.match.grpc_method", f"{svc} has no method {method}",
                                f"use one of: {', '.join(x.name for x in gs.methods)}")
            kind, value = "path", f"/{svc}/{method}"
        else:
            kind, value = "prefix", f"/{svc}/"
    else:
        kind = {"path_prefix": "prefix", "path": "path", "path_regex": "regex"}[kinds[0]]
        value = str(m[kinds[0]])
        if kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                raise MeshError(file, f"{where}.match.path_regex", f"invalid regex: {exc}") from None
        elif not value.startswith("/"):
            raise MeshError(file, f"{where}.match.{kinds[0]}", f"{value!r} must start with /", f"write /{value}")
    headers = _header_rules(m.get("headers"), file, f"{where}.match.headers")
    query = _header_rules(m.get("query"), file, f"{where}.match.query")
    if ("to" in d) == ("split" in d):
        raise MeshError(file, where, "needs exactly one of to or split", "e.g. to: products")
    if "to" in d:
        split = ((_service_ref(d["to"], file, f"{where}.to", mesh), 1),)
    else:
        items = d["split"]
        if not isinstance(items, list) or not items:
            raise MeshError(file, f"{where}.split", "must be a non-empty list of {to, weight}")
        split = []
        for j, item in enumerate(items):
            item = _mapping(item, file, f"{where}.split[{j}]")
            w = item.get("weight")
            if not isinstance(w, int) or w < 0:
                raise MeshError(file, f"{where}.split[{j}].weight", f"{w!r} is not a non-negative integer")
            split.append((_service_ref(item.get("to"), file, f"{where}.split[{j}].to", mesh), w))
        protocols = {mesh.services[t].protocol for t, _ in split}
        if len(protocols) > 1:
            raise MeshError(file, f"{where}.split", "mixes grpc and http services",
                            "split only between services of one protocol")
        if sum(w for _, w in split) == 0:
            raise MeshError(file, f"{where}.split", "all weights are 0", "give at least one target a weight")
        split = tuple(split)
    timeout = parse_duration(d["timeout"], file, f"{where}.timeout") if "timeout" in d else None
    name = str(d.get("name") or f"gateway-{i}-{split[0][0]}")
    rewrite = d.get("rewrite_prefix")
    if rewrite is not None and kind != "prefix":
        raise MeshError(file, f"{where}.rewrite_prefix", "only applies to path_prefix routes")
    return GatewayRoute(name, kind, value, headers, query, grpc, split, timeout, rewrite)


def _service_ref(value, file: str, where: str, mesh: Mesh) -> str:
    if not isinstance(value, str) or value not in mesh.services:
        raise MeshError(file, where, f"unknown service {value!r}",
                        f"use one of: {', '.join(sorted(mesh.services))}")
    return str(value)


def _header_rules(value, file: str, where: str) -> tuple[HeaderRule, ...]:
    d = _mapping(value, file, where)
    rules = []
    for name, spec in d.items():
        if isinstance(spec, dict):
            _known(spec, {"exact", "prefix", "regex", "present"}, file, f"{where}.{name}")
            if len(spec) != 1:
                raise MeshError(file, f"{where}.{name}", "needs exactly one of exact, prefix, regex, present")
            kind, v = next(iter(spec.items()))
            if kind == "regex":
                try:
                    re.compile(str(v))
                except re.error as exc:
                    raise MeshError(file, f"{where}.{name}.regex", f"invalid regex: {exc}") from None
            rules.append(HeaderRule(str(name).lower(), kind, str(v) if kind != "present" else str(bool(v))))
        else:
            rules.append(HeaderRule(str(name).lower(), "exact", str(spec)))
    return tuple(rules)
