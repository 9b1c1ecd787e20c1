"""HTTP request (path variables, query string, body) → one gRPC request message.

The body is parsed first; then path variables and query parameters are collected into one
JSON-shaped dict, parsed into a second message and merged over the first, so a path variable
wins over the same field in a ``body: "*"`` JSON document (as with Envoy and grpc-gateway).
Hostile bodies are bounded before protobuf sees them: size first, then JSON nesting depth and
the number of values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sidecar.transcode.errors import TranscodeError
from sidecar.transcode.fields import (FLOAT_TYPES, HTTP_BODY, WRAPPERS, T, is_message, resolve_path,
                                      scalar_leaf)

_PARSE_ERRORS = (json_format.ParseError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                 RecursionError, OverflowError)

_ENUM_NUMBER = re.compile(r"-?[0-9]{1,10}")


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 4 << 20
    max_json_depth: int = 64
    max_query_params: int = 1000
    max_json_values: int = 100_000
    ignore_unknown_query_parameters: bool = False
    ignored_query_parameters: frozenset[str] = frozenset()
    query_param_unescape_plus: bool = True   # "+" is a space, as in HTML forms (Envoy's default: off)


def load_json(body: bytes, limits: RequestLimits):
    """Parse a JSON body under the limits; every failure is a 400 that says why."""
    return load_json_counted(body, limits)[0]


def load_json_counted(body: bytes, limits: RequestLimits):
    """(value, number of JSON values in it), so a caller parsing many documents can share one budget."""
    check_size(body, limits)
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise TranscodeError(400, f"JSON body nested deeper than {limits.max_json_depth} levels",
                             "json_too_deep") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise TranscodeError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    return value, _check_shape(value, limits)


def check_size(body: bytes, limits: RequestLimits) -> None:
    if len(body) > limits.max_body_bytes:
        raise TranscodeError(413, f"request body is {len(body)} bytes, the limit is {limits.max_body_bytes}",
                             "body_too_large")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON (send it as the string \"{name}\")")


def _check_shape(value, limits: "RequestLimits") -> int:
    """One pass over the parsed JSON: nesting depth and number of values. protobuf's JSON parser
    is pure Python (~4 µs a value), so the value count is what bounds the CPU a body can cost."""
    stack = [(value, 1)]
    count = 0
    while stack:
        v, d = stack.pop()
        count += 1
        if count > limits.max_json_values:
            raise TranscodeError(400, f"JSON body has more than {limits.max_json_values} values", "json_too_large")
        if isinstance(v, dict):
            if d > limits.max_json_depth:
                raise TranscodeError(400, f"JSON body nested deeper than {limits.max_json_depth} levels",
                                     "json_too_deep")
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            if d > limits.max_json_depth:
                raise TranscodeError(400, f"JSON body nested deeper than {limits.max_json_depth} levels",
                                     "json_too_deep")
            stack.extend((x, d + 1) for x in v)
    return count


def parse_into(value, message: Message, pool, limits: RequestLimits, what: str) -> None:
    if not isinstance(value, dict) and not message.DESCRIPTOR.full_name.startswith("google.protobuf."):
        raise TranscodeError(400, f"{what} must be a JSON object, not {type(value).__name__}", "invalid_json")
    try:
        # json_format counts messages, not JSON levels: one Struct level is a Struct and a Value.
        # The JSON depth is already bounded, so this only has to be loose enough.
        json_format.ParseDict(value, message, descriptor_pool=pool, max_recursion_depth=4 * limits.max_json_depth + 8)
    except _PARSE_ERRORS as exc:
        raise TranscodeError(400, f"{what}: {exc}", "invalid_request_field") from None


def fill_body(message: Message, body_field: str, body: bytes, content_type: str, pool,
              limits: RequestLimits) -> None:
    """Put the HTTP body into ``message`` (``body_field`` "*" = the whole message). An HttpBody
    target takes the raw bytes and the Content-Type; anything else takes JSON."""
    if body_field == "*":
        field, target_type = None, message.DESCRIPTOR.full_name
    else:
        field = message.DESCRIPTOR.fields_by_name[body_field]
        singular_message = is_message(field) and not field.is_repeated
        target_type = field.message_type.full_name if singular_message else ""
    if target_type == HTTP_BODY:
        check_size(body, limits)
        raw = message if field is None else getattr(message, body_field)
        raw.content_type, raw.data = content_type, body
        return
    if not body.strip():
        return
    value = load_json(body, limits)
    if field is None:
        parse_into(value, message, pool, limits, "request body")
    else:
        parse_into({field.name: value}, message, pool, limits, "request body")


def bound_params(desc: Descriptor, variables: dict[str, str], query: str, body_field: str,
                 limits: RequestLimits) -> dict:
    """Path variables and query parameters as one nested dict keyed by proto field names."""
    params: dict = {}
    for field_path, value in variables.items():
        chain = resolve_path(desc, field_path)
        _put(params, chain, _json_value(chain[-1], value, f"path variable {field_path}"), f"path variable {field_path}")
    if not query:
        return params
    if not limits.query_param_unescape_plus:
        query = query.replace("+", "%2B")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict", max_num_fields=limits.max_query_params)
    except UnicodeDecodeError:
        raise TranscodeError(400, "query string is not valid UTF-8", "invalid_query") from None
    except ValueError as exc:
        raise TranscodeError(400, f"query string: {exc}", "invalid_query") from None
    path_bound = {_proto_path(resolve_path(desc, p)) for p in variables}
    for key, value in pairs:
        if key in limits.ignored_query_parameters:
            continue
        chain = resolve_path(desc, key)
        if chain is None or not scalar_leaf(chain[-1]):
            if limits.ignore_unknown_query_parameters and chain is None:
                continue
            why = "no such field" if chain is None else "only primitive fields (and repeated ones) can be set from the query string"
            raise TranscodeError(400, f"query parameter {key!r}: {why}", "invalid_query")
        proto_path = _proto_path(chain)
        if body_field == "*" or chain[0].name == body_field:
            raise TranscodeError(400, f"query parameter {key!r}: field is bound by the request body", "invalid_query")
        if proto_path in path_bound:
            raise TranscodeError(400, f"query parameter {key!r}: field is bound by the path", "invalid_query")
        _put(params, chain, _json_value(chain[-1], value, f"query parameter {key}"), f"query parameter {key!r}")
    return params


def _proto_path(chain) -> str:
    return ".".join(f.name for f in chain)


def _put(params: dict, chain: list[FieldDescriptor], value, what: str) -> None:
    node = params
    for f in chain[:-1]:
        node = node.setdefault(f.name, {})
    leaf = chain[-1]
    if leaf.is_repeated:
        node.setdefault(leaf.name, []).append(value)
    elif leaf.name in node:
        raise TranscodeError(400, f"{what}: field {leaf.name!r} is not repeated but given more than once",
                             "invalid_query")
    else:
        node[leaf.name] = value


def _json_value(field: FieldDescriptor, text: str, what: str):
    """A query/path string as the JSON value proto3 JSON expects for this field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TranscodeError(400, f"{what}: not valid UTF-8 once percent-decoded", "invalid_path") from None
    ftype = field.type
    if is_message(field):
        name = field.message_type.full_name
        if name not in WRAPPERS:
            return text  # Timestamp, Duration, FieldMask: their JSON form is a string
        ftype = field.message_type.fields_by_name["value"].type
    if ftype == T.TYPE_BOOL:
        low = text.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise TranscodeError(400, f"{what}: {text!r} is not a bool (true/false)", "invalid_query")
    if ftype in FLOAT_TYPES:
        if text in ("NaN", "Infinity", "-Infinity"):
            return text
        try:
            return float(text)
        except ValueError:
            raise TranscodeError(400, f"{what}: {text!r} is not a number", "invalid_query") from None
    if ftype == T.TYPE_ENUM:
        return int(text) if _ENUM_NUMBER.fullmatch(text) else text
    return text  # strings, bytes (base64) and integers (JSON accepts them as strings)
