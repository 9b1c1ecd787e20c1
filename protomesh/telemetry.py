"""OpenTelemetry wiring shared by sidecars, the control server and the demo apps.

Why one module: every process in the mesh must agree on the same propagation format (W3C
``traceparent``/``tracestate`` plus ``baggage``) and on how spans leave the process (OTLP/gRPC,
batched), otherwise traces break at the first hop.  Call :func:`setup_tracing` once at process
start and :func:`shutdown_tracing` on the way out so the last batch is flushed.

OpenTelemetry allows exactly one global TracerProvider per process.  So the first successful
``setup_tracing`` wins: repeating it with the same arguments returns the same provider, a call
with different arguments logs a warning and still returns the first provider, and a call after
``shutdown_tracing`` raises ``RuntimeError`` (a shut-down provider would silently drop spans).

:func:`extract_context` and :func:`inject_headers` sit on the sidecar's per-request path, so they
only look at the three propagation headers and skip all work when none is present.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.baggage.propagation import W3CBaggagePropagator

__all__ = ["setup_tracing", "shutdown_tracing", "extract_context", "inject_headers"]

log = logging.getLogger(__name__)

# Header names the propagators read, as str and as bytes (gRPC metadata may carry either).
_WANTED = frozenset(("traceparent", "tracestate", "baggage"))
_WANTED_BYTES = frozenset(k.encode() for k in _WANTED)

_lock = threading.Lock()
_provider: TracerProvider | None = None
_config: tuple[str, str | None, float] | None = None
_shut_down = False


def _validate(service_name: Any, otlp_endpoint: Any, sampling: Any) -> float:
    if not isinstance(service_name, str) or not service_name.strip():
        raise ValueError(f"service_name: must be a non-empty string, got {service_name!r}")
    if otlp_endpoint is not None and (not isinstance(otlp_endpoint, str) or not otlp_endpoint.strip()):
        raise ValueError(
            f"otlp_endpoint: must be a URL like 'http://127.0.0.1:4317' or None, got {otlp_endpoint!r}"
        )
    if isinstance(sampling, bool) or not isinstance(sampling, (int, float)):
        raise ValueError(f"sampling: must be a number in [0, 1], got {sampling!r}")
    sampling = float(sampling)
    if not 0.0 <= sampling <= 1.0:  # also rejects NaN
        raise ValueError(f"sampling: must be in [0, 1], got {sampling!r}")
    return sampling


def setup_tracing(service_name: str, otlp_endpoint: str | None, sampling: float = 1.0) -> TracerProvider:
    """Install the process-wide TracerProvider and W3C propagators; see the module docstring.

    With ``otlp_endpoint=None`` spans are still created (so trace ids flow through the sidecar
    and show up in logs) but nothing is exported.
    """
    global _provider, _config
    sampling = _validate(service_name, otlp_endpoint, sampling)
    config = (service_name, otlp_endpoint, sampling)
    with _lock:
        if _shut_down:
            raise RuntimeError(
                "setup_tracing: tracing was already shut down in this process; OpenTelemetry "
                "allows one global TracerProvider per process, so it cannot be set up again"
            )
        if _provider is not None:
            if config != _config:
                log.warning(
                    "setup_tracing%r ignored: tracing already set up as %r (one provider per process)",
                    config, _config,
                )
            return _provider

        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sampling)),
        )
        if otlp_endpoint is not None:
            OTLPSpanExporter = _otlp_exporter_class()
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
        trace.set_tracer_provider(provider)
        if trace.get_tracer_provider() is not provider:
            log.warning("setup_tracing: another global TracerProvider was already installed; "
                        "spans from trace.get_tracer() will not use protomesh's provider")
        propagate.set_global_textmap(
            CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
        )
        _provider, _config = provider, config
        return provider


# Printed when the OTLP exporter cannot import.  xds-protos (Envoy's data-plane API) bundles a
# years-old copy of opentelemetry/proto/*_pb2.py; installed after opentelemetry-proto it
# overwrites the current files (grpc/grpc#42926, open-telemetry/opentelemetry-python#4843).
STALE_OTEL_PROTO_HINT = (
    "opentelemetry-proto's generated modules were overwritten by the stale copy bundled in "
    "xds-protos; repair with: pip install --no-deps --force-reinstall "
    "\"opentelemetry-proto==$(pip show opentelemetry-proto | sed -n 's/^Version: //p')\""
)


def _otlp_exporter_class():
    # Imported lazily: the exporter pulls in grpc channel machinery that processes running
    # without an endpoint never need.
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError(f"{exc}; {STALE_OTEL_PROTO_HINT}") from exc
    return OTLPSpanExporter


def shutdown_tracing() -> None:
    """Flush pending spans and stop exporting; a no-op when nothing was set up or already shut down."""
    global _shut_down
    with _lock:
        provider = _provider
        if provider is None or _shut_down:
            return
        _shut_down = True
    try:
        provider.force_flush()
    finally:
        provider.shutdown()


def _as_str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value


def extract_context(headers: Mapping[str, str] | Iterable[tuple[Any, Any]]) -> Context:
    """The remote parent context (and baggage) carried by incoming headers or gRPC metadata.

    Keys may be str or bytes in any case; repeated ``tracestate``/``baggage`` entries are joined
    with ``,`` as HTTP does.  Without propagation headers this returns an empty Context, never
    the caller's ambient one, so a server span does not accidentally adopt an unrelated parent.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    carrier: dict[str, str] | None = None
    for key, value in pairs:
        if isinstance(key, str):
            if len(key) > 11:  # longest wanted name is "traceparent"
                continue
            key = key.lower()
            if key not in _WANTED:
                continue
        else:
            if len(key) > 11:
                continue
            key = bytes(key).lower()
            if key not in _WANTED_BYTES:
                continue
            key = key.decode()
        value = _as_str(value)
        if carrier is None:
            carrier = {key: value}
        elif key in carrier and key != "traceparent":
            carrier[key] = carrier[key] + "," + value
        else:
            carrier[key] = value
    if carrier is None:
        return Context()
    return propagate.extract(carrier, context=Context())


def inject_headers(context: Context | None = None) -> list[tuple[str, str]]:
    """The propagation headers (lowercase keys) to send upstream for ``context`` (default: current)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [(k.lower(), v) for k, v in carrier.items()]

