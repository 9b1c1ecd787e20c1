"""A small OTLP/gRPC trace receiver: somewhere for spans to land when no Jaeger is running.

Why it exists: ``make demo`` and the integration tests need a real OTLP endpoint that the
sidecars' exporters can talk to, and the tests need to look at what arrived (parent links,
service names, attributes).  Spans are kept in memory for :meth:`Collector.spans`,
:meth:`Collector.traces` and :meth:`Collector.wait_for`.

With ``out_path`` every received ``ExportTraceServiceRequest`` is also appended to that file as
one line of OTLP/JSON (lowerCamelCase field names, enums as integers, trace/span ids as hex
strings -- protobuf's own JSON mapping would write the id bytes as base64, which OTLP/JSON
forbids).  Open it later in Jaeger's UI: since Jaeger 1.55, *Search -> Upload JSON* accepts
OTLP/JSON with one ``{"resourceSpans": ...}`` object per line.  Each line is also a valid OTLP/HTTP JSON request
body, so ``curl -H 'content-type: application/json' --data-binary @<line>
http://jaeger:4318/v1/traces`` replays it into a running Jaeger.

Run it standalone with ``protomesh collector --listen 127.0.0.1:4317 --out traces.jsonl``; it
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["Collector", "main", "to_otlp_json"]

if "scope_spans" not in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name:
    from protomesh.telemetry import STALE_OTEL_PROTO_HINT

    raise ImportError(f"protomesh.collector needs current OTLP messages; {STALE_OTEL_PROTO_HINT}")

_ID_KEYS = frozenset(("traceId", "spanId", "parentSpanId"))
_MAX_MESSAGE = 64 * 1024 * 1024


def _plain(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attrs(kvs) -> dict[str, Any]:
    return {kv.key: _plain(kv.value) for kv in kvs}


def _enum_suffix(full: str, prefix: str) -> str:
    return full[len(prefix):] if full.startswith(prefix) else full


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append({
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": _enum_suffix(trace_pb2.Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
                    "service": service,
                    "attributes": _attrs(span.attributes),
                    "status_code": _enum_suffix(trace_pb2.Status.StatusCode.Name(span.status.code), "STATUS_CODE_"),
                    "status_message": span.status.message,
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "scope": ss.scope.name,
                    "resource": resource,
                })
    return out


def _hex_ids(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def to_otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> str:
    """One line of OTLP/JSON for ``request`` (hex ids, integer enums, lowerCamelCase names)."""
    doc = MessageToDict(request, use_integers_for_enums=True)
    _hex_ids(doc)
    return json.dumps(doc, separators=(",", ":"))


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._collector._receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class Collector:
    """In-process OTLP/gRPC trace receiver; see the module docstring."""

    def __init__(self, listen: str = "127.0.0.1:0", out_path: Path | None = None) -> None:
        self._listen = listen
        self._out_path = Path(out_path) if out_path is not None else None
        self._out: IO[str] | None = None
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._spans: list[dict] = []
        self._changed = asyncio.Event()

    async def start(self) -> None:
        if self._server is not None:
            return
        # so_reuseport off: a second collector on a taken port must fail, not silently share it.
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.so_reuseport", 0),
        ])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
        try:
            port = server.add_insecure_port(self._listen)
        except RuntimeError as exc:  # grpcio reports bind failures this way
            port, reason = 0, f": {exc}"
        else:
            reason = ""
        if not port:
            await server.stop(None)
            raise OSError(f"collector: cannot listen on {self._listen}{reason}")
        if self._out_path is not None:
            self._out_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self._out_path.open("a", encoding="utf-8")
        await server.start()
        self._server, self._port = server, port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0.5)
        if self._out is not None:
            self._out.close()
            self._out = None

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def endpoint(self) -> str:
        """``http://host:port`` for exporters; a wildcard listen address maps to loopback."""
        if self._port is None:
            raise RuntimeError("collector: endpoint is known only after start()")
        host = self._listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self._port}"

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self._spans.extend(_flatten(request))
        if self._out is not None:
            self._out.write(to_otlp_json(request) + "\n")
            self._out.flush()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def spans(self) -> list[dict]:
        return list(self._spans)

    def traces(self) -> dict[str, list[dict]]:
        by_trace: dict[str, list[dict]] = {}
        for span in self._spans:
            by_trace.setdefault(span["trace_id"], []).append(span)
        return by_trace

    async def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
        """Wait until ``predicate(spans)`` holds, re-checking after every export; bounded by ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"collector: condition not met within {timeout:g}s; {self.summary()}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def summary(self) -> str:
        """What arrived so far, short enough for an assertion message."""
        spans = self._spans
        if not spans:
            return "received no spans"
        names = Counter(f"{s['service']}:{s['name']}" for s in spans)
        shown = ", ".join(f"{n} x{c}" for n, c in names.most_common(12))
        more = f" (+{len(names) - 12} more)" if len(names) > 12 else ""
        trace_count = len({s["trace_id"] for s in spans})
        return f"received {len(spans)} span(s) in {trace_count} trace(s): {shown}{more}"


async def _serve(listen: str, out: Path | None) -> int:
    collector = Collector(listen, out)
    try:
        await collector.start()
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = f", appending OTLP/JSON to {out}" if out else ""
    print(f"collector: OTLP/gRPC on {collector.endpoint}{where}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await collector.stop()
    print(f"collector: stopped; {collector.summary()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protomesh collector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:4317", help="HOST:PORT to receive OTLP/gRPC on")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="append each export as one line of OTLP/JSON (loadable in Jaeger's UI)")
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args.listen, args.out))


if __name__ == "__main__":
    sys.exit(main())
