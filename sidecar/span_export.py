"""Batch export of sidecar spans over OTLP/gRPC, off the request path.

Spans are queued (bounded: when the collector is slow or down, the oldest are not kept and the
drop is counted, never blocking a request) and a background thread sends batches every
`interval_s` or when `batch_size` spans are waiting.  Encoding happens in that thread too,
straight to OTLP wire bytes (sidecar/otlp_wire.py).
"""
from __future__ import annotations

import collections
import logging
import threading

import grpc

from sidecar import otlp_wire
from sidecar.spans import Span

log = logging.getLogger("protomesh.sidecar.tracing")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SCOPE = "protomesh.sidecar"
SDK_NAME = "protomesh-sidecar"


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
        # Requests are pre-encoded bytes (no serializer); the response (empty or partial
        # success) is not needed, so it is not decoded either.
        self._export = self._channel.unary_unary(EXPORT_METHOD)
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
                self._export(otlp_wire.export_request(batch, self.service_name, SCOPE, SDK_NAME),
                             timeout=self.timeout_s)
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
