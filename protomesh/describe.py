"""`protomesh describe <service>[/<Rpc>]`: each rpc's effective policy and where every value
came from (proto option with file:line, mesh.yaml field, or default).  Reads mesh.yaml and the
protos it names locally, like the control server does, so it works without a running mesh."""
from __future__ import annotations

import json
import sys

from control.errors import MeshError
from control.model import load_mesh
from control.sources.options import FIELDS, NOT_ENFORCED, Value, declared, rpc_policies
from control.sources.protos import compile_descriptor_set

KINDS = {(False, False): "unary", (False, True): "server streaming", (True, False): "client streaming",
         (True, True): "bidi streaming"}


def effective(mesh_path: str, target: str) -> dict:
    mesh = load_mesh(mesh_path)
    service, _, rpc = target.partition("/")
    svc = mesh.services.get(service)
    if svc is None:
        raise MeshError(mesh_path, "", f"no service {service!r}", f"use one of: {', '.join(sorted(mesh.services))}")
    if svc.protocol != "grpc":
        raise MeshError(mesh_path, f"services.{service}", "is an http service: it has no rpcs to describe")
    fds = compile_descriptor_set(list(svc.protos), mesh.proto_paths, mesh_path)
    mesh_defaults = {"timeout": Value(svc.timeout_s, f"mesh.yaml services.{service}.timeout (or its default)")}
    overrides = {rpc: dict(values) for rpc, values in svc.method_overrides}
    policies = rpc_policies(fds, [g.full_name for g in svc.grpc_services], mesh_defaults, overrides)
    for pol in policies.values():  # what the routes carry: a stream is not cut unless declared
        if (pol.client_streaming or pol.server_streaming) and not declared(pol.values.get("timeout")):
            pol.values["timeout"] = Value(None, "streams get no route timeout unless the proto or methods sets one")
    if rpc:
        policies = {p: v for p, v in policies.items() if p.rsplit("/", 1)[1] == rpc}
        if not policies:
            raise MeshError(mesh_path, "", f"service {service} has no rpc {rpc!r}")
    return policies


def render(policies: dict) -> str:
    lines = []
    for path, pol in policies.items():
        lines.append(f"{path}  ({KINDS[(pol.client_streaming, pol.server_streaming)]})")
        for name in FIELDS:
            v = pol.values.get(name)
            if v is None:
                continue
            shown = _show(name, v.value)
            note = "  (shown, not enforced by this version)" if name in NOT_ENFORCED and v.value else ""
            lines.append(f"  {name:22} {shown:18} {v.source}{note}")
        lines.append("")
    return "\n".join(lines)


def _show(name: str, value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and name in ("timeout", "retry.per_try_timeout", "rate_limit.per", "cache_ttl"):
        return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
    if isinstance(value, tuple):
        return ",".join(value) or "-"
    return str(value)


def main(mesh_path: str, target: str, as_json: bool) -> int:
    try:
        policies = effective(mesh_path, target)
    except MeshError as exc:
        print(f"protomesh describe: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({p: {k: {"value": v.value, "source": v.source} for k, v in pol.values.items()}
                          for p, pol in policies.items()}, indent=2))
    else:
        print(render(policies), end="")
    return 0
