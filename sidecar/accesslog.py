"""One JSON line per request with its outcome and reason, so no request is anonymous.

Requests are the hot path: `request_line` formats their record with one f-string and the C
string escaper instead of `json.dumps` over a dict (measured: 11 µs → 3 µs of a proxied
request's ~40 µs of Python).  The output is the same JSON object, field for field.
"""
from __future__ import annotations

import json
import sys
import time
from json.encoder import encode_basestring_ascii as _q
from typing import TextIO


_heads: dict[tuple, str] = {}  # the low-cardinality fields of a record, escaped once


def request_line(listener: str, protocol: str, method: str, authority: str, path: str, peer: str,
                 route: str, cluster: str, upstream: str, status: int, grpc_status: int | None,
                 reason: str, duration_ms: float, bytes_in: int, bytes_out: int, trace_id: str,
                 attempts: int, retry_note: str, ts: float) -> str:
    """One request's access-log record as a JSON line.  Strings are escaped by the json
    module's C escaper, so any header-derived value stays valid JSON; the fields that come from
    config or from us (listener, route, cluster, upstream, reasons) repeat, so their part of the
    line is made once per combination (bounded).  Numbers are ints from our own code; the trace
    id is hex."""
    key = (listener, protocol, method, route, cluster, upstream, reason, retry_note)
    head = _heads.get(key)
    if head is None:
        head = (f'{{"listener":{_q(listener)},"protocol":{_q(protocol)},"method":{_q(method)},'
                f'"route":{_q(route)},"cluster":{_q(cluster)},"upstream":{_q(upstream)},'
                f'"reason":{_q(reason)},"retry_note":{_q(retry_note)},')
        if len(_heads) >= 4096:
            _heads.clear()
        _heads[key] = head
    gs = "null" if grpc_status is None else grpc_status
    return (f'{head}"authority":{_q(authority)},"path":{_q(path)},"peer":{_q(peer)},'
            f'"status":{status},"grpc_status":{gs},"duration_ms":{duration_ms:.3f},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"trace_id":"{trace_id}",'
            f'"attempts":{attempts},"ts":{ts:.6f}}}\n')


class AccessLog:
    def __init__(self, path: str | None):
        """`path` None disables the log, '-' writes to stdout, anything else appends to a file."""
        self._out: TextIO | None
        if path is None:
            self._out = None
        elif path == "-":
            self._out = sys.stdout
        else:
            self._out = open(path, "a", buffering=1 << 16, encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._out is None:
            return
        record["ts"] = round(time.time(), 6)
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def write_line(self, line: str) -> None:
        """A record already formatted as one JSON line (see `request_line`)."""
        if self._out is not None:
            self._out.write(line)

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None
