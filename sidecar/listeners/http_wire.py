"""HTTP/1.1 on the wire, as the proxy listener writes it: hop-by-hop header sets, status lines,
request ids, and Connection-header tokens.  No state beyond small caches; no I/O."""
from __future__ import annotations

import itertools
import os
import random
from http import HTTPStatus

HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                  b"upgrade", b"transfer-encoding"))
# Request headers never copied as received: hop-by-hop, the ones we rewrite, and Expect
# (answered here).
REQ_SKIP = HOP | {b"x-forwarded-for", b"x-forwarded-proto", b"expect"}
CRLF = b"\r\n"
HOP_LENS = frozenset(map(len, REQ_SKIP))  # cheap pre-check before lower-casing a header name
PLAIN_CONNECTION = frozenset((b"keep-alive", b"close"))  # Connection values that name no header
PLAIN_CONNECTION_S = frozenset(("keep-alive", "close"))
# Request-side skip sets compare with the parsed headers' lower-case str keys.
REQ_SKIP_S = frozenset(n.decode() for n in REQ_SKIP)
REQ_SKIP_TRACED = REQ_SKIP_S | {"traceparent", "tracestate", "baggage"}
HEADER_JOIN = b": ".join  # (name, value) -> b"name: value", mapped over header lists in C
CHUNK_END = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

_status_lines: dict[int, bytes] = {}


def _new_rid_source() -> None:
    """A fresh random prefix and counter start (at import, and in a forked child)."""
    global _RID_PREFIX, _rid_counter
    h = f"{random.getrandbits(72):018x}"
    _RID_PREFIX = f"{h[:8]}-{h[8:12]}-8{h[12:15]}-a{h[15:18]}-"
    _rid_counter = itertools.count(random.getrandbits(40))


_new_rid_source()
os.register_at_fork(after_in_child=_new_rid_source)


def request_id() -> str:
    """A UUID-shaped x-request-id: a random per-process prefix and a counter (UUIDv8, "custom",
    since it is not random per request).  Ids for correlating logs need uniqueness, not
    unpredictability; uuid.uuid4() reads os.urandom (a syscall) and random 128-bit ids cost
    more formatting than the rest of the request head."""
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFF:012x}"


def status_line(status: int, reason: bytes = b"") -> bytes:
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        line = _status_lines[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


def connection_tokens(value: str) -> list[str]:
    return [t.strip() for t in value.lower().split(",") if t.strip()]
