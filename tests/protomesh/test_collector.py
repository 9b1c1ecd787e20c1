"""protomesh.collector: a real OTLP/gRPC exporter talks to it; what it stores and writes.

The OTLP exporter blocks on its gRPC call while the collector serves on this test's event loop,
so spans are produced in a worker thread (asyncio.to_thread) to keep the loop free.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import sys

import pytest
from google.protobuf.json_format import ParseDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from protomesh.collector import Collector

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _emit(endpoint: str, service: str = "gateway") -> None:
    """Produce a small trace through a real OTLP/gRPC exporter (blocking; run in a thread)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("GET /v1/orders", kind=trace.SpanKind.SERVER) as root:
        root.set_attribute("http.response.status_code", 200)
        root.set_attribute("mesh.cached", False)
        root.set_attribute("mesh.weights", [1.5, 2.5])
        with tracer.start_as_current_span("demo.orders.v1.Orders/List", kind=trace.SpanKind.CLIENT) as child:
            child.set_attribute("rpc.system", "grpc")
            child.set_status(Status(StatusCode.ERROR, "upstream reset"))
    provider.shutdown()


async def test_spans_from_a_real_exporter_keep_parent_links_and_attributes():
    async with Collector() as collector:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", collector.endpoint)
        await asyncio.to_thread(_emit, collector.endpoint)
        spans = await collector.wait_for(lambda s: len(s) >= 2, timeout=10)

    by_name = {s["name"]: s for s in spans}
    root, child = by_name["GET /v1/orders"], by_name["demo.orders.v1.Orders/List"]
    assert HEX32.match(root["trace_id"]) and HEX16.match(root["span_id"])
    assert root["parent_span_id"] == ""
    assert child["parent_span_id"] == root["span_id"]
    assert child["trace_id"] == root["trace_id"]
    assert (root["kind"], child["kind"]) == ("SERVER", "CLIENT")
    assert root["service"] == child["service"] == "gateway"
    assert root["attributes"] == {
        "http.response.status_code": 200, "mesh.cached": False, "mesh.weights": [1.5, 2.5],
    }
    assert child["status_code"] == "ERROR" and child["status_message"] == "upstream reset"
    assert root["status_code"] == "UNSET"
    assert 0 < root["start_ns"] <= child["start_ns"] <= child["end_ns"] <= root["end_ns"]
    assert list(collector.traces()) == [root["trace_id"]]
    assert len(collector.traces()[root["trace_id"]]) == 2


async def test_out_file_is_otlp_json_with_hex_ids(tmp_path):
    out = tmp_path / "nested" / "traces.jsonl"
    async with Collector(out_path=out) as collector:
        await asyncio.to_thread(_emit, collector.endpoint, "users")
        await asyncio.to_thread(_emit, collector.endpoint, "orders")
        spans = await collector.wait_for(lambda s: len(s) >= 4, timeout=10)

    lines = out.read_text().splitlines()
    assert len(lines) == 4  # SimpleSpanProcessor: one export request per span
    seen_ids = set()
    for line in lines:
        doc = json.loads(line)
        assert set(doc) == {"resourceSpans"}
        for rs in doc["resourceSpans"]:
            assert rs["resource"]["attributes"][0]["key"] in {"service.name", "telemetry.sdk.language"}
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    assert HEX32.match(span["traceId"]) and HEX16.match(span["spanId"])
                    assert "parentSpanId" not in span or HEX16.match(span["parentSpanId"])
                    assert isinstance(span["kind"], int)  # OTLP/JSON: enums as integers
                    seen_ids.add(span["spanId"])
        # Converting the ids back to protobuf's base64 must give a well-formed export request.
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in span:
                            span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
        ParseDict(doc, ExportTraceServiceRequest())
    assert seen_ids == {s["span_id"] for s in spans}


async def test_wait_for_times_out_with_a_summary_of_what_arrived():
    async with Collector() as collector:
        with pytest.raises(TimeoutError, match="received no spans"):
            await collector.wait_for(lambda s: False, timeout=0.05)
        await asyncio.to_thread(_emit, collector.endpoint)
        await collector.wait_for(lambda s: len(s) == 2, timeout=10)
        with pytest.raises(TimeoutError) as info:
            await collector.wait_for(lambda s: any(x["service"] == "users" for x in s), timeout=0.1)
    message = str(info.value)
    assert "within 0.1s" in message
    assert "2 span(s) in 1 trace(s)" in message
    assert "gateway:GET /v1/orders" in message


async def test_wait_for_wakes_up_when_spans_arrive():
    async with Collector() as collector:
        waiter = asyncio.create_task(collector.wait_for(lambda s: len(s) >= 2, timeout=15))
        await asyncio.sleep(0)
        assert not waiter.done()
        await asyncio.to_thread(_emit, collector.endpoint)
        assert len(await asyncio.wait_for(waiter, 15)) == 2


async def test_endpoint_before_start_and_bind_failure_are_clear():
    collector = Collector()
    with pytest.raises(RuntimeError, match="after start"):
        collector.endpoint
    async with Collector() as first:
        port = first.endpoint.rsplit(":", 1)[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await Collector(f"127.0.0.1:{port}").start()
    await collector.stop()  # stop without start is harmless


async def test_cli_runs_until_sigterm_and_writes_the_out_file(tmp_path):
    out = tmp_path / "cli.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "protomesh.collector", "--listen", "127.0.0.1:0", "--out", str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        banner = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        await asyncio.to_thread(_emit, match.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0, rest.decode()
    assert "received 2 span(s)" in rest.decode()
    assert len(out.read_text().splitlines()) == 2
