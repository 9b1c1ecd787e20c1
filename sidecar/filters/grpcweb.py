"""gRPC-Web framing (binary and base64 text), pure: the HTTP listener bridges it to gRPC.

A gRPC-Web body is a sequence of frames: 1 flag byte (0x00 data, 0x80 trailers), a 4-byte
big-endian length, the payload.  `-text` content types carry the same bytes base64-encoded; a
stream of text may be several padded base64 pieces back to back.  Envoy's `GrpcWeb` filter
has no fields: its presence switches the feature on.
"""
from __future__ import annotations

import base64
import binascii
import struct

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
DATA, TRAILERS = 0x00, 0x80
EXPOSE = "grpc-status,grpc-message,grpc-status-details-bin,x-protomesh-reason"


class GrpcWebError(ValueError):
    pass


def is_grpc_web(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower().startswith("application/grpc-web")


def is_text(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower().startswith("application/grpc-web-text")


def response_type(request_type: str) -> str:
    return "application/grpc-web-text+proto" if is_text(request_type) else "application/grpc-web+proto"


def decode_text(body: bytes) -> bytes:
    """Base64 that may be several padded pieces concatenated."""
    data = b"".join(body.split())
    out, start = [], 0
    try:
        while start < len(data):
            end = start
            while end < len(data) and data[end:end + 1] != b"=":
                end += 1
            while end < len(data) and data[end:end + 1] == b"=":
                end += 1
            out.append(base64.b64decode(data[start:end], validate=True))
            start = end
    except (binascii.Error, ValueError) as exc:
        raise GrpcWebError(f"body is not valid base64: {exc}") from None
    return b"".join(out)


def decode_messages(body: bytes) -> list[bytes]:
    """Data frames of a request body (a trailer frame from a client is ignored)."""
    out, i = [], 0
    while i < len(body):
        if len(body) - i < 5:
            raise GrpcWebError("truncated frame header")
        flag, size = body[i], struct.unpack_from(">I", body, i + 1)[0]
        i += 5
        if len(body) - i < size:
            raise GrpcWebError("truncated frame")
        if flag & 0x01:
            raise GrpcWebError("compressed frames are not supported")
        if not flag & TRAILERS:
            out.append(body[i:i + size])
        i += size
    return out


def frame(payload: bytes, flag: int = DATA) -> bytes:
    return struct.pack(">BI", flag, len(payload)) + payload


def trailer_frame(code: int, message: str, metadata=()) -> bytes:
    lines = [f"grpc-status:{code}", f"grpc-message:{_pct(message)}"]
    lines += [f"{k}:{v}" for k, v in metadata if isinstance(v, str)]
    return frame(("\r\n".join(lines) + "\r\n").encode("utf-8"), TRAILERS)


def encode(chunk: bytes, text: bool) -> bytes:
    return base64.b64encode(chunk) if text else chunk


def _pct(message: str) -> str:
    """grpc-message is percent-encoded (everything outside printable ASCII, and '%')."""
    out = []
    for b in message.encode("utf-8"):
        out.append(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}")
    return "".join(out)
