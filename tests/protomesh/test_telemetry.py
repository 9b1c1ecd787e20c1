"""protomesh.telemetry: validation, header round trips, and real export to a Collector.

setup_tracing installs process-global state (one TracerProvider per process, an OpenTelemetry
rule), so everything that calls it successfully runs in a child interpreter; the pytest process
itself never gets a provider from these tests.
"""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap

import pytest
from opentelemetry import baggage, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from protomesh.collector import Collector
from protomesh.telemetry import extract_context, inject_headers, setup_tracing

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


def _context(tenant: str = "acme"):
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    ctx = trace.set_span_in_context(span)
    return baggage.set_baggage("tenant", tenant, context=ctx)


@pytest.mark.parametrize("sampling", [-0.01, 1.0001, 2, math.nan, "0.5", None, True])
def test_sampling_outside_unit_interval_is_rejected_naming_the_field(sampling):
    with pytest.raises(ValueError, match=r"^sampling: "):
        setup_tracing("users", None, sampling)


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_service_name_is_required(name):
    with pytest.raises(ValueError, match=r"^service_name: "):
        setup_tracing(name, None)


def test_inject_then_extract_keeps_trace_id_and_baggage():
    pairs = inject_headers(_context())
    keys = [k for k, _ in pairs]
    assert "traceparent" in keys and "baggage" in keys
    assert all(k == k.lower() for k in keys)
    assert dict(pairs)["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"

    ctx = extract_context(pairs)
    remote = trace.get_current_span(ctx).get_span_context()
    assert remote.trace_id == TRACE_ID
    assert remote.span_id == SPAN_ID
    assert remote.is_remote
    assert baggage.get_baggage("tenant", ctx) == "acme"


def test_extract_accepts_bytes_and_mixed_case_keys_like_grpc_metadata():
    metadata = [(b"User-Agent", b"grpc-python")]
    metadata += [(k.upper().encode(), v.encode()) for k, v in inject_headers(_context("bytes-co"))]
    ctx = extract_context(metadata)
    assert trace.get_current_span(ctx).get_span_context().trace_id == TRACE_ID
    assert baggage.get_baggage("tenant", ctx) == "bytes-co"


def test_extract_accepts_a_mapping_with_any_key_case():
    headers = {k.title(): v for k, v in inject_headers(_context())}
    ctx = extract_context(headers)
    assert trace.get_current_span(ctx).get_span_context().trace_id == TRACE_ID


def test_repeated_baggage_headers_are_joined():
    traceparent = dict(inject_headers(_context()))["traceparent"]
    ctx = extract_context([("traceparent", traceparent), ("baggage", "a=1"), ("baggage", "b=2")])
    assert baggage.get_all(ctx) == {"a": "1", "b": "2"}


def test_no_propagation_headers_gives_an_empty_context_not_the_ambient_one():
    ambient = _context()
    from opentelemetry import context as otel_context

    token = otel_context.attach(ambient)
    try:
        ctx = extract_context([("content-type", "application/grpc"), (b"x-request-id", b"1")])
    finally:
        otel_context.detach(token)
    assert trace.get_current_span(ctx) is trace.INVALID_SPAN
    assert baggage.get_all(ctx) == {}


def test_inject_without_a_span_sends_nothing():
    from opentelemetry.context import Context

    assert inject_headers(Context()) == []


CHILD = textwrap.dedent(
    """
    import sys
    from opentelemetry import trace
    from protomesh.telemetry import setup_tracing, shutdown_tracing, extract_context, inject_headers

    endpoint = sys.argv[1]
    provider = setup_tracing("orders", endpoint, 1.0)
    assert setup_tracing("orders", endpoint, 1.0) is provider, "setup must be idempotent"
    assert setup_tracing("other", None, 0.5) is provider, "first setup wins"
    assert trace.get_tracer_provider() is provider

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("ingress", kind=trace.SpanKind.SERVER) as parent:
        parent.set_attribute("mesh.route", "orders.create")
        headers = inject_headers()
        with tracer.start_as_current_span("egress", context=extract_context(headers),
                                          kind=trace.SpanKind.CLIENT):
            pass
    shutdown_tracing()
    shutdown_tracing()  # safe twice
    try:
        setup_tracing("orders", endpoint, 1.0)
    except RuntimeError as exc:
        assert "shut down" in str(exc)
    else:
        raise AssertionError("setup after shutdown must raise")
    print("child ok")
    """
)


async def test_spans_are_exported_to_a_real_collector_with_the_service_name():
    async with Collector() as collector:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, collector.endpoint,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert b"child ok" in out

        spans = await collector.wait_for(lambda s: len(s) >= 2, timeout=10)
    by_name = {s["name"]: s for s in spans}
    assert {s["service"] for s in spans} == {"orders"}
    ingress, egress = by_name["ingress"], by_name["egress"]
    assert ingress["kind"] == "SERVER" and egress["kind"] == "CLIENT"
    assert egress["trace_id"] == ingress["trace_id"]
    assert egress["parent_span_id"] == ingress["span_id"]
    assert ingress["attributes"] == {"mesh.route": "orders.create"}


def test_shutdown_without_setup_is_a_no_op():
    # Run in a child for the same reason as above: shutdown flips process-global state.
    import subprocess

    code = "from protomesh.telemetry import shutdown_tracing as s; s(); s(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
