"""google.api.http rules → bindings, read from a FileDescriptorSet (``protoc --include_imports``).

Everything that can be wrong with a rule is found here, at config time, and reported as a
``TranscodeConfigError`` naming the proto file, the rpc and the reason, so the xDS resource
carrying the descriptor set is NACKed instead of failing requests later.
"""
from __future__ import annotations

from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError

from sidecar.transcode.errors import TranscodeConfigError
from sidecar.transcode.fields import check_path_variable
from sidecar.transcode.template import PathTemplate

_PATTERNS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Binding:
    """One (HTTP method, path template) → rpc mapping; an rpc has one per (additional) binding."""
    service: str              # demo.users.v1.Users
    method: str               # GetUser
    http_method: str          # GET, POST, ... or a custom kind as written (upper-cased)
    template: PathTemplate
    body: str                 # "" (none), "*" or a top-level request field name
    response_body: str        # "" or a top-level response field name
    input_type: str           # full message names
    output_type: str
    client_streaming: bool
    server_streaming: bool
    proto_file: str
    index: int = 0            # 0 = the rule itself, 1.. = additional_bindings in order

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def pattern(self) -> str:
        return self.template.text

    def __str__(self) -> str:
        return f"{self.http_method} {self.template.text} → {self.grpc_path}"


def build_pool(fds_bytes: bytes):
    """(pool, FileDescriptorSet). The pool is private and also holds google.rpc.Status and the
    standard error details, so error bodies can print those even when the set lacks them."""
    try:
        fds = descriptor_pb2.FileDescriptorSet.FromString(fds_bytes)
    except DecodeError as exc:
        raise TranscodeConfigError("descriptor set", f"not a serialized FileDescriptorSet ({exc})") from None
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        try:
            pool.AddSerializedFile(fd.SerializeToString())
        except Exception as exc:  # upb raises TypeError, the python runtime others
            raise TranscodeConfigError(fd.name, f"cannot load into a descriptor pool ({exc}); was the set "
                                                "built with --include_imports?") from None
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    for mod in (any_pb2, duration_pb2, status_pb2, error_details_pb2):
        try:
            pool.FindFileByName(mod.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
    return pool, fds


def load_bindings(fds_bytes: bytes, services: list[str], *, auto_mapping: bool = False):
    """(pool, bindings) for ``services``. ``auto_mapping`` also exposes every rpc without an
    http rule as ``POST /pkg.Service/Method`` with the whole body as the request (like Envoy)."""
    pool, fds = build_pool(fds_bytes)
    protos = {(f"{fd.package}.{s.name}" if fd.package else s.name): (fd, s) for fd in fds.file for s in fd.service}
    bindings: list[Binding] = []
    for name in services:
        if name not in protos:
            raise TranscodeConfigError("services", f"service {name!r} is not in the descriptor set "
                                                   f"(it has: {', '.join(sorted(protos)) or 'none'})")
        fd, svc = protos[name]
        service = pool.FindServiceByName(name)
        for mproto in svc.method:
            method = service.methods_by_name[mproto.name]
            where = f"{fd.name}: {name}.{mproto.name}"
            if mproto.options.HasExtension(annotations_pb2.http):
                rule = mproto.options.Extensions[annotations_pb2.http]
                rules = [rule, *rule.additional_bindings]
                for i, r in enumerate(rules):
                    if i and r.additional_bindings:
                        raise TranscodeConfigError(where, "additional_bindings may not nest")
                    bindings.append(_binding(r, i, method, fd.name, where))
            elif auto_mapping:
                auto = http_pb2.HttpRule(post=f"/{name}/{mproto.name}", body="*")
                bindings.append(_binding(auto, 0, method, fd.name, where))
    _check_ambiguous(bindings)
    return pool, tuple(bindings)


def _binding(rule, index: int, method, proto_file: str, where: str) -> Binding:
    where = where + (f" additional_bindings[{index - 1}]" if index else "")
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise TranscodeConfigError(where, "google.api.http rule sets no pattern (get/put/post/delete/patch/custom)")
    if kind == "custom":
        http_method, text = rule.custom.kind.upper(), rule.custom.path
        if not http_method:
            raise TranscodeConfigError(where, "custom pattern has an empty kind")
    else:
        http_method, text = kind.upper(), getattr(rule, kind)
    template = PathTemplate.parse(text, where)
    req, resp = method.input_type, method.output_type
    for var in template.variables:
        check_path_variable(req, var.field_path, where)
    if rule.body not in ("", "*"):
        field = req.fields_by_name.get(rule.body)
        if field is None:
            raise TranscodeConfigError(where, f"body {rule.body!r} is not a top-level field of {req.full_name}")
    if rule.response_body and rule.response_body not in resp.fields_by_name:
        raise TranscodeConfigError(where, f"response_body {rule.response_body!r} is not a top-level field of "
                                          f"{resp.full_name}")
    if method.client_streaming and rule.body != "*":
        raise TranscodeConfigError(where, "a client-streaming rpc needs body: \"*\" (each JSON array element "
                                          "is one request message)")
    return Binding(method.containing_service.full_name, method.name, http_method, template, rule.body,
                   rule.response_body, req.full_name, resp.full_name, method.client_streaming,
                   method.server_streaming, proto_file, index)


def _check_ambiguous(bindings: list[Binding]) -> None:
    seen: dict[tuple[str, str], Binding] = {}
    for b in bindings:
        key = (b.http_method, b.template.shape())
        other = seen.get(key)
        if other is not None:
            raise TranscodeConfigError(f"{b.proto_file}: {b.service}.{b.method}",
                                       f"{b.http_method} {b.pattern} is ambiguous with {other.service}."
                                       f"{other.method} ({other.http_method} {other.pattern})")
        seen[key] = b
