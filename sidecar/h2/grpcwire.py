"""gRPC over HTTP/2 (the PROTOCOL-HTTP2 spec), the parts a byte-passthrough proxy needs:
splitting a request head into what policies see and what is forwarded, `grpc-timeout`, status
codes for HTTP statuses and resets, and trailers-only local replies.  Pure functions.
"""
from __future__ import annotations

from urllib.parse import quote

from sidecar.h2 import frames as F

# Header fields that belong to one hop (RFC 9113 §8.2.2) or that we set ourselves per hop.
HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                 b"te", b"host", b"grpc-timeout", b"traceparent", b"tracestate", b"baggage"})
RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                          b"upgrade"})

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

# HTTP status of a response without grpc-status → gRPC status (PROTOCOL-HTTP2 "HTTP to gRPC").
_OF_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
# RST_STREAM error code → gRPC status (PROTOCOL-HTTP2 "Errors").
_OF_RST = {F.NO_ERROR: 13, F.PROTOCOL_ERROR: 13, F.INTERNAL_ERROR: 13, F.FLOW_CONTROL_ERROR: 13,
           F.SETTINGS_TIMEOUT: 13, F.FRAME_SIZE_ERROR: 13, F.REFUSED_STREAM: 14, F.CANCEL: 1,
           F.COMPRESSION_ERROR: 13, F.CONNECT_ERROR: 13, F.ENHANCE_YOUR_CALM: 8,
           F.INADEQUATE_SECURITY: 7}
# gRPC status → the HTTP status outlier detection counts (Envoy's grpcToHttpStatus for 5xx).
HTTP_OF_GRPC = {2: 500, 4: 504, 12: 501, 13: 500, 14: 503, 15: 500}


class BadRequest(Exception):
    """A request head a gRPC server must refuse; the stream is reset with PROTOCOL_ERROR."""


class Head:
    """A request head, split once (and cached per distinct header block by the listener)."""

    __slots__ = ("path", "authority", "headers", "forward", "timeout_s")

    def __init__(self, path: str, authority: str, headers: dict, forward: tuple, timeout_s: float | None):
        self.path = path
        self.authority = authority
        self.headers = headers  # str → str, what policies see (comma-joined repeats)
        self.forward = forward  # (bytes, bytes) pairs sent upstream as they came
        self.timeout_s = timeout_s


def parse_request(fields) -> Head:
    method = path = authority = scheme = None
    headers: dict[str, str] = {}
    forward = []
    timeout = None
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise BadRequest("pseudo-header after a regular header")
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            else:
                raise BadRequest(f"unknown pseudo-header {name!r}")
            continue
        regular = True
        if name.lower() != name:
            raise BadRequest("upper-case header name")
        key = name.decode("latin-1")
        sval = value.decode("latin-1")
        old = headers.get(key)
        headers[key] = sval if old is None else old + "," + sval
        if name in HOP:
            if name == b"grpc-timeout":
                timeout = parse_timeout(value)
            elif name in (b"connection", b"transfer-encoding", b"upgrade", b"keep-alive", b"proxy-connection"):
                raise BadRequest(f"connection-specific header {key}")
            continue
        forward.append((name, value))
    if method is None or path is None or scheme is None:
        raise BadRequest("missing :method, :scheme or :path")
    if method != b"POST":
        raise BadRequest(f"method {method!r} is not POST")
    auth = (authority if authority is not None else headers.get("host", "").encode()).decode("latin-1")
    if authority is not None:
        headers[":authority"] = auth
    return Head(path.decode("latin-1"), auth, headers, tuple(forward), timeout)


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1–8 digits and a unit) in seconds; None when malformed (then ignored,
    as a missing deadline, rather than failing the call)."""
    digits, unit = value[:-1], value[-1:]
    if not 0 < len(digits) <= 8 or not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def format_timeout(seconds: float) -> bytes:
    """A `grpc-timeout` value that does not overshoot `seconds` by more than a millisecond."""
    ms = max(int(seconds * 1000.0 + 0.999), 1)
    if ms <= 99_999_999:
        return b"%dm" % ms
    return b"%dS" % min(int(seconds), 99_999_999)


def status_of_http(status: int) -> int:
    return _OF_HTTP.get(status, 2)


def status_of_reset(code: int) -> int:
    return _OF_RST.get(code, 13)


def grpc_message(text: str) -> bytes:
    """Percent-encoded as the spec asks (anything outside printable ASCII, and '%')."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def trailers_only(code: int, message: str, reason: str | None = None, extra=()) -> list:
    """A complete response in one HEADERS frame (a local reply, or a failure before any
    response head was relayed)."""
    out = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)]
    if message:
        out.append((b"grpc-message", grpc_message(message)))
    if reason:
        out.append((b"x-protomesh-reason", reason.encode("latin-1", "replace")))
    for k, v in extra:
        out.append((k.encode("latin-1") if isinstance(k, str) else k, v.encode("latin-1") if isinstance(v, str) else v))
    return out


def trailers(code: int, message: str, reason: str | None = None) -> list:
    """Trailers after a relayed response head."""
    out = [(b"grpc-status", b"%d" % code)]
    if message:
        out.append((b"grpc-message", grpc_message(message)))
    if reason:
        out.append((b"x-protomesh-reason", reason.encode("latin-1", "replace")))
    return out


def response_head(fields) -> tuple[int, list]:
    """(:status, the fields to relay) of an upstream response head."""
    status = 0
    out = []
    for name, value in fields:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
            out.append((name, value))
        elif name not in RESPONSE_HOP:
            out.append((name, value))
    return status, out


def status_in(fields) -> tuple[int | None, str]:
    """grpc-status and grpc-message of trailers (None when absent or not a number)."""
    code = None
    message = ""
    for name, value in fields:
        if name == b"grpc-status":
            code = int(value) if value.isdigit() else None
        elif name == b"grpc-message":
            message = value.decode("latin-1")
    return code, message


# ---- messages on a stream (for endpoints that read them: the control server's ADS, the bench) ----
MAX_MESSAGE = 4 << 20  # grpc's default receive limit


class MessageError(Exception):
    """Bytes on a stream that are not gRPC messages we accept; `code` is the gRPC status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def message_prefix(size: int) -> bytes:
    """The 5 bytes before an uncompressed message of `size` bytes."""
    return b"\x00" + size.to_bytes(4, "big")


def frame_message(message: bytes) -> bytes:
    """One uncompressed length-prefixed message."""
    return message_prefix(len(message)) + message


class Deframer:
    """Splits a stream's DATA into messages as it arrives (a message may span frames, and a
    frame may hold several).  The pieces of an incomplete message are kept as a list and joined
    once it is whole, so a large message over many frames is copied once, not once per frame.
    Compressed messages are refused: nothing here negotiates a grpc-encoding, so a peer that
    compresses did not follow the headers we sent."""

    __slots__ = ("_parts", "_have", "_need", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE):
        self._parts: list[bytes] = []  # an incomplete message (and its prefix)
        self._have = 0  # bytes in _parts
        self._need = 0  # bytes _parts must reach before anything can be split off
        self.max_message = max_message

    def feed(self, data: bytes) -> list[bytes]:
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts = []
            self._have = 0
        else:
            buf = data
        out = []
        i = 0
        n = len(buf)
        while n - i >= 5:
            if buf[i]:
                raise MessageError(12, "compressed messages are not supported (no grpc-encoding was negotiated)")
            size = int.from_bytes(buf[i + 1:i + 5], "big")
            if size > self.max_message:
                raise MessageError(8, f"message of {size} bytes exceeds the limit of {self.max_message}")
            if n - i - 5 < size:
                self._need = 5 + size
                break
            out.append(buf[i + 5:i + 5 + size])
            i += 5 + size
        else:
            self._need = 5
        if i < n:
            self._parts = [buf[i:] if i else buf]
            self._have = n - i
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (non-zero at end of stream: truncated)."""
        return self._have
