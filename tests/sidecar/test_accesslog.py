"""The access log's request line is the JSON object of its fields, whatever the strings hold."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.accesslog import AccessLog, request_line

FIELDS = ("listener", "protocol", "method", "authority", "path", "peer", "route", "cluster", "upstream",
          "status", "grpc_status", "reason", "duration_ms", "bytes_in", "bytes_out", "trace_id",
          "attempts", "retry_note", "ts")

text = st.text(max_size=30)  # quotes, backslashes, control characters, any code point


@settings(max_examples=300, deadline=None)
@given(listener=text, method=text, authority=text, path=text, peer=text, route=text, cluster=text,
       upstream=text, reason=text, retry_note=text, status=st.integers(0, 999),
       grpc_status=st.none() | st.integers(0, 16), duration=st.floats(0, 1e6),
       sizes=st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 40)), attempts=st.integers(1, 10),
       trace=st.integers(0, (1 << 128) - 1))
def test_the_line_is_the_json_object_of_the_fields(listener, method, authority, path, peer, route, cluster,
                                                  upstream, reason, retry_note, status, grpc_status, duration,
                                                  sizes, attempts, trace):
    values = (listener, "http", method, authority, path, peer, route, cluster, upstream, status, grpc_status,
              reason, duration, sizes[0], sizes[1], f"{trace:032x}", attempts, retry_note, 1795825361.150667)
    line = request_line(*values)
    assert line.endswith("\n") and "\n" not in line[:-1]
    record = json.loads(line)
    expected = dict(zip(FIELDS, values))
    assert abs(record.pop("duration_ms") - expected.pop("duration_ms")) <= 0.0005
    assert abs(record.pop("ts") - expected.pop("ts")) <= 0.0000005
    assert record == expected


def test_records_reach_the_file(tmp_path):
    log = AccessLog(str(tmp_path / "access.log"))
    log.write_line(request_line("l", "grpc", "POST", "a", "/p.S/M", "1.2.3.4:5", "r", "c", "u", 200, 0, "",
                                1.5, 1, 2, "ab" * 16, 1, "", 1.0))
    log.write({"listener": "t", "reason": "idle_timeout"})
    log.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert json.loads(lines[0])["grpc_status"] == 0 and json.loads(lines[1])["reason"] == "idle_timeout"
