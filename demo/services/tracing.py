"""Trace continuation for the demo services, written once instead of per service.

Why: a trace must run gateway → orders → users/products unbroken, so every service extracts
the caller's W3C context (traceparent/tracestate/baggage) from gRPC metadata or HTTP headers,
opens a SERVER span under it, and orders injects its own context into the calls it makes.
The tracer is looked up from the global provider on every use, so whatever
``protomesh.telemetry.setup_tracing`` (or a test) installs is honoured even if it happens
after import.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_TRACER_NAME = "demo.services"

# Infrastructure services polled by sidecars; tracing them would bury the demo's traces.
UNTRACED_GRPC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def _metadata_carrier(metadata: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):  # binary (-bin) metadata never carries W3C context
            continue
        key = key.lower()
        carrier[key] = f"{carrier[key]},{value}" if key in carrier else value
    return carrier


def split_grpc_method(full_method: str) -> tuple[str, str]:
    """'/demo.users.v1.Users/GetUser' → ('demo.users.v1.Users', 'GetUser')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def outgoing_metadata(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current trace context (plus ``extra``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(extra) + tuple((k.lower(), v) for k, v in carrier.items())


def outgoing_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    """HTTP headers carrying the current trace context (plus ``extra``)."""
    headers = dict(extra or {})
    propagate.inject(headers)
    return headers


@contextlib.contextmanager
def client_span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """A CLIENT span around one outgoing call; inject inside it so the callee is its child."""
    with tracer().start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        yield span


def _finish_grpc_span(span: Span, code: grpc.StatusCode, details: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        # Per OTel semantic conventions, which codes are server errors; NOT_FOUND is not one.
        if code in (
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS,
        ):
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))


class ServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of a grpc.aio server in a SERVER span continuing the caller's trace."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, method = split_grpc_method(handler_call_details.method)
        if handler is None or service in UNTRACED_GRPC_SERVICES:
            return handler
        name = f"{service}/{method}"
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def start(context: grpc.aio.ServicerContext):
            parent = propagate.extract(
                _metadata_carrier(context.invocation_metadata()), context=Context()
            )
            return tracer().start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attrs,
                record_exception=False, set_status_on_exception=False,
            )

        def finish(span: Span, context: grpc.aio.ServicerContext, exc: BaseException | None):
            code = context.code()
            if code is None:
                if exc is None:
                    code = grpc.StatusCode.OK
                elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    code = grpc.StatusCode.CANCELLED  # the caller went away
                else:
                    code = grpc.StatusCode.UNKNOWN
            if exc is not None and not isinstance(exc, grpc.aio.AbortError):
                span.record_exception(exc)
            details = context.details()
            _finish_grpc_span(span, code, details.decode() if isinstance(details, bytes) else details)

        def wrap_unary_response(behavior):
            async def traced(request_or_iterator, context):
                with start(context) as span:
                    try:
                        result = await behavior(request_or_iterator, context)
                    except BaseException as exc:
                        finish(span, context, exc)
                        raise
                    finish(span, context, None)
                    return result

            return traced

        def wrap_stream_response(behavior):
            async def traced(request_or_iterator, context) -> AsyncIterator[Any]:
                with start(context) as span:
                    try:
                        async for item in behavior(request_or_iterator, context):
                            yield item
                    except BaseException as exc:
                        finish(span, context, exc)
                        raise
                    finish(span, context, None)

            return traced

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary_response(handler.unary_unary),
                handler.request_deserializer, handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream_response(handler.unary_stream),
                handler.request_deserializer, handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary_response(handler.stream_unary),
                handler.request_deserializer, handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream_response(handler.stream_stream),
            handler.request_deserializer, handler.response_serializer,
        )


@web.middleware
async def http_tracing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """SERVER span per aiohttp request, named '<METHOD> <route template>'."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    # CIMultiDictProxy: case-insensitive lookups, as the default getter needs.
    parent = propagate.extract(request.headers, context=Context())
    with tracer().start_as_current_span(
        f"{request.method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            raise
        except BaseException as exc:
            status = 500
            span.record_exception(exc)
            raise
        else:
            status = response.status
            return response
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
