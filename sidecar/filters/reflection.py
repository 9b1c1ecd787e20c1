"""gRPC server reflection and health, answered by the gateway itself for the mesh's services.

Why at the gateway: generic tools (grpcurl, Postman, grpc_cli) first ask reflection what is
there, and load balancers ask health; the gateway knows both without asking any service — the
descriptor set comes with its listener config (`protomesh.descriptor_set` listener metadata),
and health is "the route's cluster has endpoints".  Reflection is served under v1alpha and v1
(the same messages on the wire).  Pure lookups here; grpc.py asks `handler()` per method.
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

HEALTH = "grpc.health.v1.Health"
REFLECTION_PATHS = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
_SKIP_PACKAGES = ("google.", "grpc.", "meshapi.")
_cache: dict[int, tuple[bytes, ReflectionServicer]] = {}


def is_local(method: str) -> bool:
    return method in REFLECTION_PATHS or method.startswith(f"/{HEALTH}/")


def servicer(descriptor_set: bytes) -> ReflectionServicer:
    """One reflection servicer per descriptor set (rebuilt only when the set changes)."""
    hit = _cache.get(id(descriptor_set))
    if hit is not None and hit[0] is descriptor_set:
        return hit[1]
    from sidecar.transcode.bindings import build_pool
    pool, fds = build_pool(descriptor_set)
    for mod in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(mod.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
    names = sorted({f"{fd.package}.{s.name}" if fd.package else s.name
                    for fd in fds.file for s in fd.service if not fd.package.startswith(_SKIP_PACKAGES)})
    svc = ReflectionServicer(names + [HEALTH, "grpc.reflection.v1alpha.ServerReflection"], pool=pool)
    _cache.clear()
    _cache[id(descriptor_set)] = (descriptor_set, svc)
    return svc


def health_status(dataplane, listener: str, service: str) -> int | None:
    """SERVING / NOT_SERVING for a service behind this listener; None when no route knows it."""
    config = dataplane.config
    spec = config.listeners.get(listener)
    table = config.routes_for(spec) if spec is not None else None
    if table is None:
        return health_pb2.HealthCheckResponse.NOT_SERVING if service == "" else None
    if service == "":
        return health_pb2.HealthCheckResponse.SERVING
    route = table.select("", f"/{service}/", {"content-type": "application/grpc"})
    if route is None:
        return None
    for wc in route.clusters:
        cluster = config.clusters.get(wc.name)
        if cluster is not None and config.endpoints_for(cluster):
            return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def handler(method: str, dataplane, listener: str, descriptor_set: bytes):
    """grpcio's handler for a reflection or health method, else None."""
    if method in REFLECTION_PATHS:
        refl = servicer(descriptor_set)
        return grpc.stream_stream_rpc_method_handler(
            refl.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)

    if method == f"/{HEALTH}/Check":
        async def check(request, context):
            status = health_status(dataplane, listener, request.service)
            if status is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service}")
            return health_pb2.HealthCheckResponse(status=status)
        return grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)

    if method == f"/{HEALTH}/Watch":
        async def watch(request, context):
            last = None
            while True:  # until the caller goes away (grpcio cancels us)
                status = health_status(dataplane, listener, request.service)
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
                await asyncio.sleep(1.0)
        return grpc.unary_stream_rpc_method_handler(
            watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
    return None
