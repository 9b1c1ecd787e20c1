"""OTLP trace export requests written straight to protobuf wire bytes.

Why by hand: building an `ExportTraceServiceRequest` from generated message classes cost
~28 µs per span here (a message object per attribute, key and value), which at full sampling
was more than the rest of a proxied request.  The message shapes a sidecar sends are small and
fixed, so writing their wire format directly costs a few µs per span.  The bytes are the same
message (tests/sidecar/test_otlp_wire.py parses them back with the generated classes and
compares with a reference built from those classes).

Field numbers: opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto.
"""
from __future__ import annotations

import struct

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack

STATUS_CODE_ERROR = 2


def varint(n: int) -> bytes:
    """Base-128 varint; negative ints as their 64-bit two's complement (int64 fields)."""
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field whose key byte(s) are already encoded."""
    return key + varint(len(payload)) + payload


_key_cache: dict[str, bytes] = {}


def _key_value_prefix(key: str) -> bytes:
    """KeyValue.key (field 1) and the AnyValue field key (2); attribute names repeat, so cached."""
    prefix = _key_cache.get(key)
    if prefix is None:
        if len(_key_cache) > 4096:
            _key_cache.clear()
        prefix = _key_cache[key] = _field(b"\x0a", key.encode())
    return prefix


def any_value(v) -> bytes:
    """AnyValue: string 1, bool 2, int64 3, double 4 (the types span attributes carry)."""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + varint(v)
    if isinstance(v, float):
        return b"\x21" + _pack_double(v)
    return _field(b"\x0a", str(v).encode())


def key_value(key: str, value) -> bytes:
    return _key_value_prefix(key) + _field(b"\x12", any_value(value))


_attribute_cache: dict[tuple, bytes] = {}


def attribute(key: str, value) -> bytes:
    """Span.attributes entry (field 9).  Most pairs repeat from span to span (listener, route,
    method, status), so their bytes are cached; the type is part of the key since True == 1, and
    floats are not cached (0.0 == -0.0 but their bytes differ)."""
    t = type(value)
    if t is float:
        return _field(b"\x4a", key_value(key, value))
    k = (key, value, t)
    out = _attribute_cache.get(k)
    if out is None:
        out = _field(b"\x4a", key_value(key, value))
        if len(_attribute_cache) < 8192:
            _attribute_cache[k] = out
    return out


def span(s) -> bytes:
    """One trace.v1.Span from a `sidecar.spans.Span`."""
    parts = [b"\x0a\x10", s.trace_id.to_bytes(16, "big"), b"\x12\x08", s.span_id.to_bytes(8, "big")]
    if s.parent_id:
        parts += (b"\x22\x08", s.parent_id.to_bytes(8, "big"))
    parts += (_field(b"\x2a", s.name.encode()), b"\x30", varint(s.kind),
              b"\x39", _pack_fixed64(s.start_ns), b"\x41", _pack_fixed64(s.end_ns))
    if s.attributes:
        parts += [attribute(k, v) for k, v in s.attributes.items()]
    if s.error:
        status = (_field(b"\x12", s.message.encode()) if s.message else b"") + b"\x18" + varint(STATUS_CODE_ERROR)
    else:
        status = b""
    parts.append(_field(b"\x7a", status))
    # flags (field 16, fixed32): W3C trace flags in the low byte, 0x100 = "is_remote is known".
    parts += (b"\x85\x01", _pack_fixed32(0x101 if s.parent_id else 0x100))
    return b"".join(parts)


def export_request(spans, service_name: str, scope_name: str, sdk_name: str) -> bytes:
    """collector.trace.v1.ExportTraceServiceRequest with one ResourceSpans / ScopeSpans."""
    resource = _field(b"\x0a", key_value("service.name", service_name)) + \
        _field(b"\x0a", key_value("telemetry.sdk.name", sdk_name))
    scope = _field(b"\x0a", _field(b"\x0a", scope_name.encode()))
    scope_spans = scope + b"".join(_field(b"\x12", span(s)) for s in spans)
    resource_spans = _field(b"\x0a", resource) + _field(b"\x12", scope_spans)
    return _field(b"\x0a", resource_spans)
