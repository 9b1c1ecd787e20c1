"""The sidecar's span recorder and OTLP exporter: W3C parsing, sampling, parent links, export."""
import asyncio

import pytest

from protomesh.collector import Collector
from sidecar.span_export import SpanExporter
from sidecar.spans import CLIENT, SERVER, SpanRecorder, parse_traceparent

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"


@pytest.mark.parametrize("header, expected", [
    (f"00-{TID}-{PID}-01", (int(TID, 16), int(PID, 16), True)),
    (f"00-{TID}-{PID}-00", (int(TID, 16), int(PID, 16), False)),
    (f"01-{TID}-{PID}-01-future", (int(TID, 16), int(PID, 16), True)),  # later versions may add fields
    (f"00-{TID}-{PID}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TID}-{PID}-01", None),
    (f"00-{'0' * 32}-{PID}-01", None),
    (f"00-{TID}-{'0' * 16}-01", None),
    (f"00-{TID[:-1]}x-{PID}-01", None),
    ("garbage", None),
    (None, None),
])
def test_parse_traceparent(header, expected):
    assert parse_traceparent(header) == expected


def test_server_span_continues_the_caller_and_client_span_is_its_child():
    rec = SpanRecorder(sampling=0.0)  # the caller's decision wins over the local ratio
    server = rec.start_server(f"00-{TID}-{PID}-01", "s", {})
    client = rec.start_client(server, "c", {})
    assert (server.trace_id, server.parent_id, server.kind, server.sampled) == (int(TID, 16), int(PID, 16), SERVER, True)
    assert (client.trace_id, client.parent_id, client.kind) == (server.trace_id, server.span_id, CLIENT)
    assert client.traceparent() == f"00-{TID}-{client.span_id:016x}-01"


def test_new_traces_are_sampled_by_ratio():
    ended = []
    rec = SpanRecorder(sampling=0.25, sink=ended.append)
    spans = [rec.start_server(None, "s", {}) for _ in range(4000)]
    share = sum(s.sampled for s in spans) / len(spans)
    assert 0.2 < share < 0.3
    for s in spans:
        rec.end(s)
    assert len(ended) == sum(s.sampled for s in spans)  # unsampled spans are never exported
    assert all(not s.sampled for s in spans if s not in ended)


async def test_exporter_delivers_otlp_to_a_real_collector():
    async with Collector("127.0.0.1:0") as collector:
        exporter = SpanExporter(collector.endpoint, "sidecar.test", interval_s=0.05)
        rec = SpanRecorder(1.0, exporter.add)
        server = rec.start_server(f"00-{TID}-{PID}-01", "inbound GET /x", {"http.request.method": "GET"})
        client = rec.start_client(server, "inbound -> app", {"server.port": 8080})
        client.attributes["http.response.status_code"] = 503
        client.error, client.message = True, "upstream_unavailable"
        rec.end(client)
        rec.end(server)
        spans = await collector.wait_for(lambda s: len(s) >= 2, timeout=10)
        await asyncio.to_thread(exporter.shutdown)
    by_name = {s["name"]: s for s in spans}
    srv, cli = by_name["inbound GET /x"], by_name["inbound -> app"]
    assert srv["trace_id"] == TID and srv["parent_span_id"] == PID and srv["kind"] == "SERVER"
    assert cli["parent_span_id"] == srv["span_id"] and cli["kind"] == "CLIENT"
    assert cli["status_code"] == "ERROR" and cli["attributes"]["http.response.status_code"] == 503
    assert srv["service"] == "sidecar.test" and srv["attributes"]["http.request.method"] == "GET"
    assert exporter.exported == 2 and exporter.dropped == 0


def test_exporter_never_blocks_and_counts_drops_when_the_collector_is_down():
    exporter = SpanExporter("http://127.0.0.1:9", "sidecar.test", max_queue=10, interval_s=60, timeout_s=0.2)
    rec = SpanRecorder(1.0, exporter.add)
    for _ in range(25):
        rec.end(rec.start_server(None, "s", {}))
    assert exporter.dropped == 15
    exporter.shutdown()
    assert exporter.failed >= 1


def test_unrecorded_child_traceparent_continues_the_trace_with_a_new_span_id():
    rec = SpanRecorder(sampling=1.0)  # no sink: nothing is recorded
    server = rec.start_server(f"00-{TID}-{PID}-01", "s", None)
    version, trace, span, flags = rec.child_traceparent(server).split("-")
    assert (version, trace, flags) == ("00", TID, "01")
    assert len(span) == 16 and int(span, 16) not in (0, server.span_id)
    unsampled = rec.start_server(f"00-{TID}-{PID}-00", "s", None)
    assert rec.child_traceparent(unsampled).endswith("-00")
