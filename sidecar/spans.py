"""Span recording on the sidecar's hot path, without the OpenTelemetry SDK's per-span cost.

Measured here, the SDK's two spans per request (server + client: sampler, attribute
validation, locks, context objects) cost ~40 µs — more than the whole per-request budget of a
proxy that aims at Envoy's efficiency.  A sidecar needs much less: parse and write W3C
`traceparent`, decide sampling (parent-based, then a ratio), and hand finished spans to a
background exporter that speaks OTLP (`sidecar/span_export.py`).  The wire format, ids, span
kinds and semantic-convention attributes are the same as the SDK's, so collectors and Jaeger
see ordinary OTLP spans.  Services in the mesh keep using the SDK (`protomesh.telemetry`).

`tracestate` and `baggage` are forwarded unchanged (a proxy adds no entries of its own).
"""
from __future__ import annotations

import random
import time
from typing import Callable

SERVER = 2  # OTLP Span.SpanKind values
CLIENT = 3


class Span:
    __slots__ = ("trace_id", "span_id", "parent_id", "name", "kind", "start_ns", "end_ns",
                 "attributes", "error", "message", "sampled", "trace_id_hex")

    def __init__(self, trace_id: int, span_id: int, parent_id: int, name: str, kind: int,
                 start_ns: int, attributes: dict | None, sampled: bool, trace_id_hex: str = ""):
        self.trace_id = trace_id
        # Formatted once per trace (it appears in traceparent, the access log and request ids).
        self.trace_id_hex = trace_id_hex or f"{trace_id:032x}"
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes = attributes
        self.error = False
        self.message = ""
        self.sampled = sampled

    def traceparent(self) -> str:
        return f"00-{self.trace_id_hex}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a W3C traceparent, or None if absent/invalid
    (an invalid header starts a new trace, as the spec asks)."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 \
            or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    try:
        trace_id, parent_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or parent_id == 0:
        return None
    return trace_id, parent_id, bool(flags & 1)


class SpanRecorder:
    """Starts and ends spans; finished sampled spans go to `sink` (the batch exporter)."""

    def __init__(self, sampling: float = 1.0, sink: Callable[[Span], None] | None = None,
                 bits: Callable[[int], int] = random.getrandbits, clock: Callable[[], int] = time.time_ns):
        self.sampling = sampling
        self.sink = sink
        self._bits = bits
        self._clock = clock
        self._threshold = int(sampling * (1 << 64))  # compared with the low 64 bits of the trace id

    @property
    def records(self) -> bool:
        """False when nothing is exported: spans then only carry ids for propagation."""
        return self.sink is not None

    def start_server(self, traceparent: str | None, name: str, attributes: dict | None) -> Span:
        parent = parse_traceparent(traceparent)
        if parent is None:
            trace_id = self._bits(128) or 1
            parent_id = 0
            sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < self._threshold
        else:
            trace_id, parent_id, sampled = parent
        return Span(trace_id, self._bits(64) or 1, parent_id, name, SERVER, self._clock(), attributes, sampled)

    def start_client(self, parent: Span, name: str, attributes: dict | None) -> Span:
        return Span(parent.trace_id, self._bits(64) or 1, parent.span_id, name, CLIENT, self._clock(),
                    attributes, parent.sampled, parent.trace_id_hex)

    def child_traceparent(self, parent: Span) -> str:
        """The traceparent of a child of `parent` that is not recorded (no Span object)."""
        return f"00-{parent.trace_id_hex}-{self._bits(64) or 1:016x}-{'01' if parent.sampled else '00'}"

    def end(self, span: Span) -> None:
        span.end_ns = self._clock()
        if span.sampled and self.sink is not None:
            self.sink(span)
