"""Descriptor sets for the transcoding and OpenAPI tests, compiled once per process with protoc."""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from control.sources.protos import standard_includes

ROOT = Path(__file__).resolve().parents[3]
DEMO_PROTOS = ("demo/users/v1/users.proto", "demo/orders/v1/orders.proto", "demo/products/v1/products.proto")
DEMO_SERVICES = ["demo.users.v1.Users", "demo.orders.v1.Orders", "demo.products.v1.Products"]
LIBRARY_PROTO = "txtest/v1/library.proto"
LIBRARY_SERVICE = "txtest.v1.Library"
TEST_PROTO_DIR = Path(__file__).resolve().parent / "protos"


def compile_set(files, include_dirs, source_info: bool = False) -> bytes:
    from grpc_tools import protoc
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", *(f"-I{d}" for d in [*include_dirs, *standard_includes()]), "--include_imports",
                f"--descriptor_set_out={out}", *(["--include_source_info"] if source_info else []), *files]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {files}")
        return out.read_bytes()


@lru_cache(maxsize=None)
def demo_set(source_info: bool = False) -> bytes:
    return compile_set(DEMO_PROTOS, [ROOT / "proto"], source_info)


@lru_cache(maxsize=None)
def library_set(source_info: bool = False) -> bytes:
    return compile_set([LIBRARY_PROTO], [TEST_PROTO_DIR], source_info)


@lru_cache(maxsize=None)
def library_classes():
    """Generated-style classes for building replies in tests, from the library set's own pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    pool = descriptor_pool.DescriptorPool()
    for fd in descriptor_pb2.FileDescriptorSet.FromString(library_set()).file:
        pool.AddSerializedFile(fd.SerializeToString())

    class Classes:
        def __getattr__(self, name):
            full = name if "." in name else f"txtest.v1.{name}"
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
    return Classes()
