"""Each rpc's effective policy, layered from four places, with the source of every value.

Layers, later wins: protomesh's defaults (and the service's `timeout` in mesh.yaml), the
service-level `(meshapi.v1.defaults)` option, the rpc's `(meshapi.v1.method)` option, then
explicit overrides in mesh.yaml (`services.<name>.methods.<Rpc|*>`).  Values are flattened to
dotted names (`retry.attempts`) so layering is per field: an rpc that sets only its timeout
keeps the service's retry policy.  Pure: a FileDescriptorSet in, plain values out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from google.protobuf import descriptor_pb2

from control.errors import MeshError
from meshapi.v1 import options_pb2

log = logging.getLogger("protomesh.control")

DURATION_FIELDS = {"timeout", "retry.per_try_timeout", "rate_limit.per", "cache_ttl"}
FIELDS = ("timeout", "idempotent", "retry.attempts", "retry.per_try_timeout", "retry.on",
          "auth.required", "auth.scopes", "rate_limit.requests", "rate_limit.per", "rate_limit.burst",
          "cache_ttl", "validate")
DEFAULTS = {"timeout": 15.0, "idempotent": False, "retry.attempts": 1, "auth.required": False,
            "validate": False}

# FileDescriptorProto field numbers used to find an option's line in source_code_info.
_SERVICE, _METHOD, _SERVICE_OPTIONS, _METHOD_OPTIONS = 6, 2, 3, 4


@dataclass(frozen=True)
class Value:
    value: object
    source: str


@dataclass(frozen=True)
class RpcPolicy:
    path: str  # /pkg.Service/Method
    client_streaming: bool
    server_streaming: bool
    values: dict  # dotted field -> Value

    def get(self, name: str, default=None):
        v = self.values.get(name)
        return default if v is None else v.value


def flatten(msg, prefix: str = "") -> dict:
    """Explicitly set fields of a MethodPolicy, as dotted names; durations as float seconds."""
    out = {}
    for fd, value in msg.ListFields():
        name = prefix + fd.name
        if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Duration":
            out[name] = value.seconds + value.nanos / 1e9
        elif fd.message_type is not None:
            out.update(flatten(value, name + "."))
        elif fd.is_repeated:
            out[name] = tuple(value)
        else:
            out[name] = value
    return out


def _line(fd: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    for loc in fd.source_code_info.location:
        if list(loc.path) == path:
            return f"{fd.name}:{loc.span[0] + 1}"
    return fd.name


def flatten_override(doc: dict, file: str, where: str, parse_duration) -> dict:
    """mesh.yaml override mapping (nested like the proto message) → dotted values, validated."""
    out = {}

    def walk(d, prefix):
        if not isinstance(d, dict):
            raise MeshError(file, where + (f".{prefix[:-1]}" if prefix else ""), "expected a mapping")
        for key, value in d.items():
            name = prefix + str(key)
            if isinstance(value, dict):
                walk(value, name + ".")
                continue
            if name not in FIELDS:
                raise MeshError(file, f"{where}.{name}", "unknown policy field",
                                f"use one of: {', '.join(FIELDS)}")
            if name in DURATION_FIELDS:
                value = parse_duration(value, file, f"{where}.{name}")
            elif name in ("retry.on", "auth.scopes"):
                value = tuple(value) if isinstance(value, list) else (str(value),)
            out[name] = value
    walk(doc, "")
    return out


def rpc_policies(fds_bytes: bytes, services: list[str], mesh_defaults: dict | None = None,
                 overrides: dict | None = None) -> dict[str, RpcPolicy]:
    """`mesh_defaults`: dotted values from mesh.yaml's service block (source already named in
    the Value); `overrides`: {"Rpc" or "*": {dotted: Value}} explicit mesh.yaml overrides."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_bytes)
    out: dict[str, RpcPolicy] = {}
    wanted = set(services)
    for fd in fds.file:
        for si, svc in enumerate(fd.service):
            full = f"{fd.package}.{svc.name}" if fd.package else svc.name
            if full not in wanted:
                continue
            service_opts = {}
            if svc.options.HasExtension(options_pb2.defaults):
                src = f"proto {_line(fd, [_SERVICE, si, _SERVICE_OPTIONS])} (meshapi.v1.defaults)"
                service_opts = {k: Value(v, src) for k, v in flatten(svc.options.Extensions[options_pb2.defaults]).items()}
            for mi, m in enumerate(svc.method):
                values = {k: Value(v, "default") for k, v in DEFAULTS.items()}
                values.update(mesh_defaults or {})
                values.update(service_opts)
                if m.options.HasExtension(options_pb2.method):
                    src = f"proto {_line(fd, [_SERVICE, si, _METHOD, mi, _METHOD_OPTIONS])} (meshapi.v1.method)"
                    values.update({k: Value(v, src) for k, v in flatten(m.options.Extensions[options_pb2.method]).items()})
                for key in ("*", m.name):
                    values.update((overrides or {}).get(key, {}))
                path = f"/{full}/{m.name}"
                out[path] = RpcPolicy(path, m.client_streaming, m.server_streaming, values)
    return out


# ---- what the translators need from a mesh service (issue 5) ----------------------------------
def service_policies(svc) -> dict[str, RpcPolicy]:
    """Effective policy of every rpc of a control.model.Service (empty when its protos were not
    compiled into a descriptor set, e.g. in unit tests with a stub compiler)."""
    sets = {g.descriptor_set for g in svc.grpc_services if g.descriptor_set}
    if not sets:
        return {}
    return _cached_policies(tuple(sorted(sets)), tuple(g.full_name for g in svc.grpc_services),
                            svc.name, svc.timeout_s, svc.method_overrides)


def mesh_default_values(service: str, timeout_s) -> dict:
    return {"timeout": Value(timeout_s, f"mesh.yaml services.{service}.timeout (or its default)")}


_cache: dict = {}


def _cached_policies(sets: tuple, names: tuple, service: str, timeout_s, overrides: tuple) -> dict:
    key = (sets, names, service, timeout_s, overrides)
    hit = _cache.get(key)
    if hit is None:
        out: dict = {}
        over = {rpc: dict(values) for rpc, values in overrides}
        for raw in sets:
            out.update(rpc_policies(raw, list(names), mesh_default_values(service, timeout_s), over))
        if len(_cache) > 256:
            _cache.clear()
        hit = _cache[key] = out
    return hit


def declared(value: Value | None) -> bool:
    """Set on purpose for this rpc: by a proto option or an explicit mesh.yaml methods override."""
    return value is not None and (value.source.startswith("proto ") or ".methods." in value.source)


def route_timeout(policy: RpcPolicy) -> float | None:
    """The route timeout of an rpc (None: no timeout).  A streaming rpc gets none unless its proto
    or a mesh.yaml methods override sets one: a route timeout bounds the whole stream."""
    value = policy.values.get("timeout")
    if policy.client_streaming or policy.server_streaming:
        if not declared(value):
            return None
    t = value.value if value is not None else None
    return t or None


def rate_limit(policy: RpcPolicy) -> tuple[int, float, int] | None:
    """(requests, per seconds, burst) when the rpc declares a rate limit, else None."""
    requests = policy.get("rate_limit.requests")
    if not requests:
        return None
    return int(requests), float(policy.get("rate_limit.per") or 1.0), int(policy.get("rate_limit.burst") or 0)


# gRPC status names a proto's `retry.on` may list → Envoy's retry_on conditions for gRPC.
GRPC_RETRY_ON = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline-exceeded", "INTERNAL": "internal",
                 "RESOURCE_EXHAUSTED": "resource-exhausted", "UNAVAILABLE": "unavailable"}
# Conditions under which the request never reached the app: safe to retry any rpc.
SAFE_RETRY_ON = ("connect-failure", "refused-stream")


# Options this version parses and shows but cannot enforce yet.  `auth` fails closed: a service
# that declares required credentials must not run open because the mesh cannot check them.
NOT_ENFORCED = ("cache_ttl", "validate")


def check_policies(service, file: str) -> None:
    """Refuse, at load, policy the mesh cannot honour; warn about policy it only displays."""
    for pol in service_policies(service).values():
        for code in pol.get("retry.on", ()) or ():
            if code not in GRPC_RETRY_ON:
                raise MeshError(file, f"{pol.path} retry.on", f"{code!r} is not a retriable gRPC status "
                                f"(from {pol.values['retry.on'].source})", f"use some of: {', '.join(GRPC_RETRY_ON)}")
        for name in ("auth.required", "auth.scopes"):
            v = pol.values.get(name)
            if declared(v) and v.value:
                raise MeshError(file, f"{pol.path} {name}", f"authentication is declared ({v.source}) but this "
                                "version of protomesh cannot enforce it, and will not serve the rpc open",
                                "remove the auth option until the mesh's authentication filter is configured")
        for name in NOT_ENFORCED:
            v = pol.values.get(name)
            if declared(v) and v.value:
                log.warning("%s: %s %s is declared (%s) but not enforced by this version of protomesh",
                            file, pol.path, name, v.source)


def rpc_retries(policy: RpcPolicy, service_retries):
    """The retry policy of one rpc's route (a control.model.Retries, or None).

    Retry only what is safe: an rpc whose proto (or a mesh.yaml methods override) declares
    `retry` gets exactly that; an rpc marked `idempotent` gets the service's mesh.yaml retries;
    any other rpc is retried only when the request provably never reached the app (connect
    failure, refused stream) — a retry after the app saw it could run it twice."""
    from dataclasses import replace

    from control.model import Retries
    attempts = policy.values.get("retry.attempts")
    if declared(attempts) and attempts.value > 1:
        on = tuple(GRPC_RETRY_ON[c] for c in (policy.get("retry.on") or ("UNAVAILABLE",)))
        return Retries(on=SAFE_RETRY_ON + on, attempts=int(attempts.value) - 1,
                       per_try_timeout_s=policy.get("retry.per_try_timeout") or None)
    if service_retries is None:
        return None
    if policy.get("idempotent"):
        return service_retries
    return replace(service_retries, on=SAFE_RETRY_ON, status_codes=())