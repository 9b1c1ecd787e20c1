"""gRPC reply messages → HTTP bodies: JSON, raw HttpBody, stream frames and google.rpc.Status errors."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from sidecar.transcode.errors import TranscodeError
from sidecar.transcode.fields import HTTP_BODY, is_message
from sidecar.transcode.status import http_status

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


@dataclass(frozen=True)
class PrintOptions:
    """The JSON printing knobs Envoy's transcoder has (its ``print_options``), same defaults."""
    always_print_primitive_fields: bool = False
    always_print_enums_as_ints: bool = False
    preserve_proto_field_names: bool = False
    add_whitespace: bool = False


def decode(cls, data: bytes) -> Message:
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise TranscodeError(502, f"upstream sent a message that is not a valid {cls.DESCRIPTOR.full_name}: {exc}",
                             "bad_upstream_message") from None


def to_value(message: Message, pool, opts: PrintOptions, *, force_defaults: bool = False):
    try:
        return json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=opts.always_print_primitive_fields or force_defaults,
            preserving_proto_field_name=opts.preserve_proto_field_names,
            use_integers_for_enums=opts.always_print_enums_as_ints,
            descriptor_pool=pool)
    except (json_format.SerializeToJsonError, TypeError, KeyError, ValueError) as exc:
        raise TranscodeError(502, f"cannot print {message.DESCRIPTOR.full_name} as JSON: {exc}",
                             "response_not_printable") from None


def dumps(value, opts: PrintOptions) -> bytes:
    if opts.add_whitespace:
        return json.dumps(value, indent=2, ensure_ascii=False).encode()
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def select(message: Message, response_body: str, pool, opts: PrintOptions):
    """(raw HttpBody message or None, JSON value) for the part of the reply the client gets."""
    if not response_body:
        if message.DESCRIPTOR.full_name == HTTP_BODY:
            return message, None
        return None, to_value(message, pool, opts)
    field = message.DESCRIPTOR.fields_by_name[response_body]
    if is_message(field) and not field.is_repeated:
        sub = getattr(message, response_body)
        if field.message_type.full_name == HTTP_BODY:
            return sub, None
        return None, to_value(sub, pool, opts)
    # A repeated, map or scalar field: take it out of the printed message. proto3 JSON leaves a
    # default-valued field out, so print again with defaults only then ("[]" rather than nothing).
    key = field.name if opts.preserve_proto_field_names else field.json_name
    whole = to_value(message, pool, opts)
    if key not in whole:
        whole = to_value(message, pool, opts, force_defaults=True)
    return None, whole.get(key)


def render(message: Message, response_body: str, pool, opts: PrintOptions) -> tuple[str, bytes]:
    raw, value = select(message, response_body, pool, opts)
    if raw is not None:
        return raw.content_type or "application/octet-stream", raw.data
    return JSON, dumps(value, opts)


def frame(message: Message, response_body: str, pool, opts: PrintOptions, sse: bool) -> bytes:
    """One stream element. HttpBody elements are raw chunks (the stream is one long body)."""
    raw, value = select(message, response_body, pool, opts)
    if raw is not None:
        return raw.data
    line = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()  # never indented
    return b"data: " + line + b"\n\n" if sse else line + b"\n"


def status_value(grpc_code: int, message: str, details_bin: bytes | None, pool) -> dict:
    """google.rpc.Status as proto3 JSON. Details come from ``grpc-status-details-bin``; one whose
    type the pool does not know is kept as ``{"@type", "value": base64}`` rather than dropped."""
    details = []
    if details_bin:
        from google.rpc import status_pb2
        try:
            st = status_pb2.Status.FromString(details_bin)
        except DecodeError:
            st = None
        for any_msg in (st.details if st is not None else ()):
            try:
                details.append(json_format.MessageToDict(any_msg, descriptor_pool=pool))
            except Exception:  # unknown type_url or unprintable payload
                details.append({"@type": any_msg.type_url, "value": base64.b64encode(any_msg.value).decode()})
    return {"code": grpc_code, "message": message, "details": details}


def error(grpc_code: int, message: str, details_bin: bytes | None, pool) -> tuple[int, str, bytes]:
    body = json.dumps(status_value(grpc_code, message, details_bin, pool), separators=(",", ":"),
                      ensure_ascii=False).encode()
    return http_status(grpc_code), JSON, body


def error_frame(grpc_code: int, message: str, details_bin: bytes | None, pool, sse: bool) -> bytes:
    """The last frame of a stream that failed after the HTTP status was sent: ``{"error": Status}``
    as an NDJSON line (grpc-gateway's shape), or an SSE ``event: error``."""
    line = json.dumps({"error": status_value(grpc_code, message, details_bin, pool)}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    return b"event: error\ndata: " + line + b"\n\n" if sse else line + b"\n"
