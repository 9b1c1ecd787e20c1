"""Batch export of sidecar spans over OTLP/gRPC, off the request path.

Spans are queued (bounded: when the collector is slow or down, the oldest are not kept and the
drop is counted, never blocking a request) and a background thread sends batches every
`interval_s` or when `batch_size` spans are waiting.  Encoding to the OTLP protobuf happens in
that thread too.
"""
from __future__ import annotations

import collections
import logging
import threading

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from sidecar.spans import Span

log = logging.getLogger("protomesh.sidecar.tracing")


def _any_value(v) -> common_pb2.AnyValue:
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    return common_pb2.AnyValue(string_value=str(v))


def encode(spans: list[Span], service_name: str) -> trace_service_pb2.ExportTraceServiceRequest:
    out = []
    for s in spans:
        out.append(trace_pb2.Span(
            trace_id=s.trace_id.to_bytes(16, "big"), span_id=s.span_id.to_bytes(8, "big"),
            parent_span_id=s.parent_id.to_bytes(8, "big") if s.parent_id else b"",
            flags=0x101 if s.parent_id else 0x100,
            name=s.name, kind=s.kind, start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
            attributes=[common_pb2.KeyValue(key=k, value=_any_value(v)) for k, v in s.attributes.items()],
            status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message=s.message)
            if s.error else trace_pb2.Status()))
    resource = resource_pb2.Resource(attributes=[
        common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service_name)),
        common_pb2.KeyValue(key="telemetry.sdk.name", value=common_pb2.AnyValue(string_value="protomesh-sidecar")),
    ])
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource,
        scope_spans=[trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name="protomesh.sidecar"),
                                          spans=out)])])


class SpanExporter:
    def __init__(self, endpoint: str, service_name: str, batch_size: int = 512, interval_s: float = 1.0,
                 max_queue: int = 8192, timeout_s: float = 5.0):
        self.target = endpoint.split("://", 1)[-1]
        self.service_name = service_name
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.queue: collections.deque[Span] = collections.deque(maxlen=max_queue)
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self._wake = threading.Event()
        self._stop = False
        self._channel = grpc.insecure_channel(self.target)
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        """Called on the request path: O(1), never blocks."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(span)
        if len(self.queue) >= self.batch_size:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self._send_all()
        self._send_all()

    def _send_all(self) -> None:
        while self.queue:
            batch = []
            while self.queue and len(batch) < self.batch_size:
                batch.append(self.queue.popleft())
            try:
                self._stub.Export(encode(batch, self.service_name), timeout=self.timeout_s)
                self.exported += len(batch)
            except grpc.RpcError as exc:
                self.failed += len(batch)
                log.warning("span export to %s failed (%d spans dropped): %s", self.target, len(batch),
                            exc.code().name if hasattr(exc, "code") else exc)
                return

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._channel.close()
