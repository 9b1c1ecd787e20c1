"""sidecar/otlp_wire.py writes the same ExportTraceServiceRequest the generated classes would."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from sidecar import otlp_wire
from sidecar.spans import CLIENT, SERVER, Span


def _any(v) -> common_pb2.AnyValue:
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    return common_pb2.AnyValue(string_value=str(v))


def reference(spans, service: str) -> trace_service_pb2.ExportTraceServiceRequest:
    """The same request built with the generated classes: the oracle."""
    out = [trace_pb2.Span(
        trace_id=s.trace_id.to_bytes(16, "big"), span_id=s.span_id.to_bytes(8, "big"),
        parent_span_id=s.parent_id.to_bytes(8, "big") if s.parent_id else b"",
        flags=0x101 if s.parent_id else 0x100, name=s.name, kind=s.kind,
        start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
        attributes=[common_pb2.KeyValue(key=k, value=_any(v)) for k, v in (s.attributes or {}).items()],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message=s.message)
        if s.error else trace_pb2.Status()) for s in spans]
    resource = resource_pb2.Resource(attributes=[
        common_pb2.KeyValue(key="service.name", value=_any(service)),
        common_pb2.KeyValue(key="telemetry.sdk.name", value=_any("protomesh-sidecar"))])
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource, scope_spans=[trace_pb2.ScopeSpans(
            scope=common_pb2.InstrumentationScope(name="protomesh.sidecar"), spans=out)])])


def _encode(spans, service):
    raw = otlp_wire.export_request(spans, service, "protomesh.sidecar", "protomesh-sidecar")
    return trace_service_pb2.ExportTraceServiceRequest.FromString(raw)


def _span(**kw) -> Span:
    s = Span(kw.get("trace_id", 0x4BF92F3577B34DA6A3CE929D0E0E4736), kw.get("span_id", 0x00F067AA0BA902B7),
             kw.get("parent_id", 0), kw.get("name", "gateway GET /"), kw.get("kind", SERVER),
             kw.get("start_ns", 1_795_000_000_000_000_000), kw.get("attributes"), True)
    s.end_ns = kw.get("end_ns", s.start_ns + 250_000)
    s.error = kw.get("error", False)
    s.message = kw.get("message", "")
    return s


def test_a_typical_request_pair_round_trips():
    server = _span(attributes={"client.address": "127.0.0.1", "client.port": 40000,
                               "http.response.status_code": 503, "protomesh.reason": "upstream_unavailable"},
                   error=True, message="upstream_unavailable")
    client = _span(span_id=7, parent_id=server.span_id, kind=CLIENT, name="gateway -> users",
                   attributes={"server.port": 8080, "ratio": 0.5, "ok": False})
    assert _encode([server, client], "gateway") == reference([server, client], "gateway")


def test_cached_attribute_bytes_keep_types_and_signs_apart():
    for attrs in ({"a": 1}, {"a": True}, {"a": 1.0}, {"a": 0.0}, {"a": -0.0}, {"a": "1"}, {"a": 1}):
        s = _span(attributes=attrs)
        assert _encode([s], "svc") == reference([s], "svc")
        got = _encode([s], "svc").resource_spans[0].scope_spans[0].spans[0].attributes[0].value
        assert got.WhichOneof("value") == {bool: "bool_value", int: "int_value", float: "double_value",
                                           str: "string_value"}[type(attrs["a"])]


def test_no_spans_and_no_attributes():
    assert _encode([], "svc") == reference([], "svc")
    assert _encode([_span(attributes=None)], "svc") == reference([_span(attributes=None)], "svc")


attr_values = st.one_of(st.text(max_size=40), st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
                        st.floats(allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(trace_id=st.integers(1, (1 << 128) - 1), span_id=st.integers(1, (1 << 64) - 1),
       parent_id=st.integers(0, (1 << 64) - 1), name=st.text(max_size=60),
       start=st.integers(0, (1 << 63)), kind=st.sampled_from([SERVER, CLIENT]),
       attributes=st.dictionaries(st.text(min_size=1, max_size=30), attr_values, max_size=8),
       error=st.booleans(), message=st.text(max_size=40), service=st.text(max_size=20))
def test_any_span_round_trips(trace_id, span_id, parent_id, name, start, kind, attributes, error,
                              message, service):
    s = _span(trace_id=trace_id, span_id=span_id, parent_id=parent_id, name=name, start_ns=start,
              end_ns=start + 1, kind=kind, attributes=attributes, error=error, message=message)
    assert _encode([s, s], service) == reference([s, s], service)
