"""Compile services' .proto files with grpc_tools.protoc and read their services and methods.

The control server needs each rpc's full name (to route `/pkg.Service/Method`) and its kind
(unary or streaming), and later the options declared on it.  protoc's own error text names file,
line and column; it is passed on as it is.
"""
from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path

from google.protobuf import descriptor_pb2

from control.errors import MeshError
from control.model import GrpcMethod, GrpcService

_PROTOC_ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$")


@lru_cache(maxsize=1)
def standard_includes() -> tuple[str, ...]:
    """protoc's bundled well-known types, googleapis' google/api/*.proto, and our own
    meshapi/v1/*.proto (shipped inside the meshapi package)."""
    import grpc_tools
    import google.api.annotations_pb2 as ann
    import meshapi
    return (str(Path(grpc_tools.__file__).parent / "_proto"), str(Path(ann.__file__).parents[2]),
            str(Path(meshapi.__file__).parents[1]))


def compile_protos(files: list[str], include_paths, mesh_file: str) -> dict[str, list[GrpcService]]:
    raw = compile_descriptor_set(files, include_paths, mesh_file)
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    result: dict[str, list[GrpcService]] = {f: [] for f in files}
    for fd in fds.file:
        if fd.name not in result:
            continue
        for svc in fd.service:
            full = f"{fd.package}.{svc.name}" if fd.package else svc.name
            methods = tuple(GrpcMethod(m.name, m.client_streaming, m.server_streaming) for m in svc.method)
            result[fd.name].append(GrpcService(full, methods, fd.name, raw))
    return result


def compile_descriptor_set(files: list[str], include_paths, mesh_file: str) -> bytes:
    """A serialized FileDescriptorSet of `files` and everything they import, with source info
    (so options can be traced to their line).  Raises MeshError naming file and line."""
    from grpc_tools import protoc

    includes = list(include_paths) + list(standard_includes())
    for f in files:
        if not any((Path(p) / f).is_file() for p in include_paths):
            raise MeshError(mesh_file, "services.*.proto", f"{f} not found under proto_paths {list(include_paths)}",
                            "set proto_paths (relative to mesh.yaml) to the directory the path is relative to")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", *(f"-I{p}" for p in includes), f"--descriptor_set_out={out}",
                "--include_imports", "--include_source_info", *files]
        err_path = Path(tmp) / "stderr"
        code = _run_protoc(protoc, args, err_path)
        if code != 0:
            detail = err_path.read_text(errors="replace").strip() if err_path.exists() else ""
            m = _PROTOC_ERROR.match(detail.splitlines()[0]) if detail else None
            if m:
                raise MeshError(m["file"], "", f"column {m['col']}: {m['msg']}",
                                f"fix the .proto (used by {mesh_file})", line=int(m["line"]))
            raise MeshError(mesh_file, "services.*.proto", detail or "protoc failed")
        return out.read_bytes()


def _run_protoc(protoc, args: list[str], err_path: Path) -> int:
    """protoc writes errors to the process's fd 2; capture them into a file for the message."""
    import os
    saved = os.dup(2)
    with open(err_path, "wb") as err:
        os.dup2(err.fileno(), 2)
        try:
            return protoc.main(args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def merge_descriptor_sets(sets) -> bytes:
    """One FileDescriptorSet holding every file of `sets` once (by name, first wins), in an order
    where each file follows its imports (as protoc writes them), for Envoy and for descriptor pools."""
    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for raw in sets:
        if not raw:
            continue
        for fd in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
            seen.setdefault(fd.name, fd)
    out = descriptor_pb2.FileDescriptorSet()
    done: set[str] = set()

    def add(name: str) -> None:
        if name in done or name not in seen:
            return
        done.add(name)
        for dep in seen[name].dependency:
            add(dep)
        out.file.append(seen[name])
    for name in seen:
        add(name)
    return out.SerializeToString(deterministic=True)
