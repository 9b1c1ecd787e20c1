"""Descriptor helpers shared by request transcoding, binding validation and the OpenAPI generator.

Which fields a path variable or query parameter may bind is decided here once, so the
transcoder and the OpenAPI document agree on it.
"""
from __future__ import annotations

from functools import lru_cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from sidecar.transcode.errors import TranscodeConfigError

HTTP_BODY = "google.api.HttpBody"
# Well-known types whose JSON form is a single string.
STRING_WKTS = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})
WRAPPERS = frozenset(f"google.protobuf.{n}Value" for n in
                     ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes"))
WKT_PREFIX = "google.protobuf."

T = FieldDescriptor
INT32_TYPES = frozenset({T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32})
UINT32_TYPES = frozenset({T.TYPE_UINT32, T.TYPE_FIXED32})
INT64_TYPES = frozenset({T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64})
UINT64_TYPES = frozenset({T.TYPE_UINT64, T.TYPE_FIXED64})
FLOAT_TYPES = frozenset({T.TYPE_FLOAT, T.TYPE_DOUBLE})


def is_map(field: FieldDescriptor) -> bool:
    return (field.type == T.TYPE_MESSAGE and field.is_repeated
            and field.message_type.GetOptions().map_entry)


def is_message(field: FieldDescriptor) -> bool:
    return field.type in (T.TYPE_MESSAGE, T.TYPE_GROUP)


def is_wkt(desc: Descriptor) -> bool:
    return desc.full_name.startswith(WKT_PREFIX)


def scalar_leaf(field: FieldDescriptor) -> bool:
    """Whether one string (a path segment or query value) can set this field's element."""
    if not is_message(field):
        return True
    name = field.message_type.full_name
    return name in STRING_WKTS or name in WRAPPERS


@lru_cache(maxsize=4096)
def fields_by_any_name(desc: Descriptor) -> dict[str, FieldDescriptor]:
    """Proto names and lowerCamelCase JSON names both resolve (proto3 JSON accepts both)."""
    out = {f.json_name: f for f in desc.fields}
    out.update({f.name: f for f in desc.fields})
    return out


def resolve_path(desc: Descriptor, field_path: str) -> list[FieldDescriptor] | None:
    """``a.b.c`` → the chain of fields, or None when a step is missing or not a singular
    message we may walk into (repeated, map, or a well-known type)."""
    chain: list[FieldDescriptor] = []
    cur = desc
    parts = field_path.split(".")
    for i, part in enumerate(parts):
        if cur is None:
            return None
        field = fields_by_any_name(cur).get(part)
        if field is None:
            return None
        chain.append(field)
        if i < len(parts) - 1:
            if not is_message(field) or field.is_repeated or is_wkt(field.message_type):
                return None
            cur = field.message_type
    return chain


def check_path_variable(desc: Descriptor, field_path: str, where: str) -> list[FieldDescriptor]:
    chain = resolve_path(desc, field_path)
    if chain is None:
        raise TranscodeConfigError(where, f"path variable {field_path!r} does not name a field of "
                                          f"{desc.full_name} (through singular message fields)")
    leaf = chain[-1]
    if leaf.is_repeated or not scalar_leaf(leaf):
        raise TranscodeConfigError(where, f"path variable {field_path!r} must be a singular primitive "
                                          "field (or Timestamp/Duration/FieldMask/wrapper)")
    return chain
