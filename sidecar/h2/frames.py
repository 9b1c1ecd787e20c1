"""HTTP/2 framing (RFC 9113 §4, §6): pure parsing and serialising, no I/O and no state.

Why our own: the gRPC data path only needs a handful of frame kinds, and doing them here as
plain byte slicing (no frame objects on the hot path) is what lets a Python proxy keep up.
Errors are exceptions that carry the HTTP/2 error code the connection must answer with:
`ConnectionError_` ends the connection with GOAWAY, `StreamError` resets one stream.
"""
from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Error codes (RFC 9113 §7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM",
               8: "CANCEL", 9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM",
               12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}

# SETTINGS identifiers (RFC 9113 §6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
HEADER_LEN = 9

_HDR = struct.Struct(">HBBBL")  # length as 16+8 bits, type, flags, stream id (with the R bit)
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


class ConnectionError_(Exception):
    """A connection error: the connection answers GOAWAY with `code` and closes."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{ERROR_NAMES.get(code, hex(code))}: {message}")
        self.code = code
        self.message = message


class StreamError(Exception):
    """A stream error: that stream is reset with `code`; the connection goes on."""

    def __init__(self, stream_id: int, code: int, message: str):
        super().__init__(f"stream {stream_id}: {ERROR_NAMES.get(code, hex(code))}: {message}")
        self.stream_id = stream_id
        self.code = code
        self.message = message


# ---- reading ------------------------------------------------------------------------------------
def parse_header(buf, pos: int = 0) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame header at `pos` (9 bytes must be there)."""
    hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, pos)
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def strip_padding(payload: bytes, flags: int, ftype: int) -> tuple[bytes, int]:
    """The payload without the Pad Length octet and padding; also how many octets were padding
    (they count against flow control but are never forwarded)."""
    if not flags & FLAG_PADDED:
        return payload, 0
    if not payload:
        raise ConnectionError_(FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, f"padding ({pad}) not shorter than the {_name(ftype)} payload")
    return payload[1:len(payload) - pad], pad + 1


def headers_fragment(payload: bytes, flags: int, stream_id: int) -> bytes:
    """The header block fragment of a HEADERS frame: padding and priority fields removed.
    A stream that depends on itself is a stream error (RFC 9113 §5.3.1)."""
    body, _ = strip_padding(payload, flags, HEADERS)
    if flags & FLAG_PRIORITY:
        if len(body) < 5:
            raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
        if _U32.unpack_from(body)[0] & 0x7FFFFFFF == stream_id:
            raise StreamError(stream_id, PROTOCOL_ERROR, "stream depends on itself")
        body = body[5:]
    return body


def parse_settings(payload: bytes, flags: int) -> list[tuple[int, int]]:
    """SETTINGS parameters, validated (RFC 9113 §6.5.2); unknown identifiers are kept (ignored
    by the caller).  An ACK carries none."""
    if flags & FLAG_ACK:
        if payload:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"SETTINGS length {len(payload)} not a multiple of 6")
    out = []
    for i in range(0, len(payload), 6):
        ident, value = _SETTING.unpack_from(payload, i)
        if ident == SETTINGS_ENABLE_PUSH and value > 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
        if ident == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} too large")
        if ident == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
            raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
        out.append((ident, value))
    return out


def parse_window_update(payload: bytes, stream_id: int) -> int:
    if len(payload) != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"WINDOW_UPDATE length {len(payload)}")
    inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
    if inc == 0:
        if stream_id:
            raise StreamError(stream_id, PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
        raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
    return inc


def parse_rst_stream(payload: bytes) -> int:
    if len(payload) != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"RST_STREAM length {len(payload)}")
    return _U32.unpack(payload)[0]


def parse_goaway(payload: bytes) -> tuple[int, int, bytes]:
    """(last stream id, error code, debug data)."""
    if len(payload) < 8:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"GOAWAY length {len(payload)}")
    last, code = _U32x2.unpack_from(payload)
    return last & 0x7FFFFFFF, code, payload[8:]


def check_ping(payload: bytes) -> None:
    if len(payload) != 8:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"PING length {len(payload)}")


def check_priority(payload: bytes, stream_id: int) -> None:
    if len(payload) != 5:
        raise StreamError(stream_id, FRAME_SIZE_ERROR, f"PRIORITY length {len(payload)}")
    if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
        raise StreamError(stream_id, PROTOCOL_ERROR, "stream depends on itself")


def _name(ftype: int) -> str:
    return ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING",
            "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")[ftype] if 0 <= ftype < 10 else f"type {ftype}"


# ---- writing ------------------------------------------------------------------------------------
def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def data(stream_id: int, payload: bytes, end_stream: bool = False) -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 8, n & 0xFF, DATA, FLAG_END_STREAM if end_stream else 0, stream_id) + payload


def headers(stream_id: int, block: bytes, end_stream: bool, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """HEADERS (+ CONTINUATION frames when the block exceeds the peer's max frame size)."""
    es = FLAG_END_STREAM if end_stream else 0
    n = len(block)
    if n <= max_frame:
        return _HDR.pack(n >> 8, n & 0xFF, HEADERS, es | FLAG_END_HEADERS, stream_id) + block
    parts = [frame(HEADERS, es, stream_id, block[:max_frame])]
    pos = max_frame
    while pos < n:
        chunk = block[pos:pos + max_frame]
        pos += len(chunk)
        parts.append(frame(CONTINUATION, FLAG_END_HEADERS if pos >= n else 0, stream_id, chunk))
    return b"".join(parts)


def settings(params: list[tuple[int, int]] | tuple = ()) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(i, v) for i, v in params))


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32x2.pack(last_stream_id, code) + debug)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))
