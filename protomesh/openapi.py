"""OpenAPI 3 document for the gateway's HTTP/JSON API, derived from the same google.api.http
bindings the transcoder serves — so the document cannot promise a URL the gateway does not map.

Schemas follow the proto3 JSON mapping the transcoder prints: lowerCamelCase names, 64-bit
integers as strings, enums as their names, maps as objects, well-known types in their JSON form.
Descriptions come from proto comments when the descriptor set was built with
``--include_source_info``.
"""
from __future__ import annotations

import re

from google.protobuf import descriptor_pb2

from sidecar.transcode.bindings import Binding, load_bindings
from sidecar.transcode.fields import (FLOAT_TYPES, HTTP_BODY, INT32_TYPES, INT64_TYPES, UINT32_TYPES, UINT64_TYPES,
                                      WRAPPERS, T, is_map, is_message, is_wkt, resolve_path, scalar_leaf)
from sidecar.transcode.template import LITERAL, MANY, PathTemplate

_OPERATIONS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
_STATUS = "google.rpc.Status"
_MAX_QUERY_DEPTH = 8


def openapi_document(fds_bytes: bytes, services: list[str], title: str = "protomesh gateway",
                     servers: list[str] | None = None, *, openapi_version: str = "3.1.0",
                     api_version: str = "1.0.0", auto_mapping: bool = False) -> dict:
    """The document as a dict (``json.dumps`` it for ``/openapi.json``). ``openapi_version`` is
    "3.1.0" (JSON Schema 2020-12 schemas) or "3.0.3". Raises TranscodeConfigError like the
    transcoder does for rules it could not serve."""
    if openapi_version not in ("3.1.0", "3.0.3"):
        raise ValueError("openapi_version must be '3.1.0' or '3.0.3'")
    pool, bindings = load_bindings(fds_bytes, services, auto_mapping=auto_mapping)
    comments = _comments(descriptor_pb2.FileDescriptorSet.FromString(fds_bytes))
    gen = _Generator(pool, comments, openapi_version.startswith("3.1"))
    doc: dict = {"openapi": openapi_version, "info": {"title": title, "version": api_version}}
    if servers:
        doc["servers"] = [{"url": url} for url in servers]
    tags = []
    for name in services:
        tag = {"name": name}
        if comments.get(name):
            tag["description"] = comments[name]
        tags.append(tag)
    doc["tags"] = tags
    paths: dict = {}
    shapes: dict[str, list[str]] = {}
    unlisted = []
    for b in bindings:
        if b.http_method not in _OPERATIONS:
            unlisted.append(f"{b.http_method} {b.pattern} → {b.grpc_path}")
            continue
        path, names = _path_key(b.template, shapes)
        op = gen.operation(b, names)
        item = paths.setdefault(path, {})
        key = b.http_method.lower()
        if key in item:  # only reachable with equivalent templates the transcoder calls ambiguous
            continue
        item[key] = op
    doc["paths"] = paths
    gen.schema_for_status()
    doc["components"] = {"schemas": dict(sorted(gen.components.items()))}
    if unlisted:
        doc["x-protomesh-unlisted-bindings"] = unlisted  # custom HTTP methods OpenAPI cannot express
    return doc


def _path_key(template: PathTemplate, shapes: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """OpenAPI forbids two paths differing only in placeholder names (``/v1/{name}`` and
    ``/v1/{book.name}``); the second one reuses the first one's names."""
    keys = template.placeholders()
    shape = re.sub(r"\{[^}]*\}", "{}", template.openapi_path())
    existing = shapes.setdefault(shape, keys)
    names = dict(zip(keys, existing))
    return template.openapi_path(names), names


def _segment_regex(template: PathTemplate, start: int, end: int) -> str:
    parts = []
    for kind, lit in template.segments[start:end]:
        parts.append(re.escape(lit) if kind == LITERAL else (".*" if kind == MANY else "[^/]+"))
    return "^" + "/".join(parts) + "$"


class _Generator:
    def __init__(self, pool, comments: dict[str, str], v31: bool) -> None:
        self.pool, self.comments, self.v31 = pool, comments, v31
        self.components: dict[str, dict] = {}

    # -- operations ------------------------------------------------------------------------

    def operation(self, b: Binding, names: dict[str, str]) -> dict:
        req = self.pool.FindMessageTypeByName(b.input_type)
        resp = self.pool.FindMessageTypeByName(b.output_type)
        full = f"{b.service}.{b.method}"
        op: dict = {"tags": [b.service], "operationId": full + (f"_{b.index + 1}" if b.index else "")}
        text = self.comments.get(full, "")
        if text:
            op["summary"] = text.split("\n", 1)[0].strip()
            if text != op["summary"]:
                op["description"] = text
        op["x-grpc-method"] = b.grpc_path
        params = self.path_parameters(b, req, names) + self.query_parameters(b, req)
        if params:
            op["parameters"] = params
        if b.body:
            op["requestBody"] = self.request_body(b, req)
        op["responses"] = {"200": self.success(b, resp), "default": {
            "description": "The rpc failed: its gRPC status as google.rpc.Status, with the HTTP status mapped "
                           "from the gRPC code (NOT_FOUND → 404, INVALID_ARGUMENT → 400, UNAVAILABLE → 503, …).",
            "content": {"application/json": {"schema": self.ref(_STATUS)}}}}
        return op

    def path_parameters(self, b: Binding, req, names: dict[str, str]) -> list[dict]:
        out = []
        by_path = {v.field_path: v for v in b.template.variables}
        for key in b.template.placeholders():
            var = by_path.get(key)
            param = {"name": names.get(key, key), "in": "path", "required": True}
            if var is None:
                param["schema"] = {"type": "string"}
                param["description"] = "Any path segment(s); not bound to a request field."
            elif var.multi_segment:
                param["schema"] = {"type": "string", "pattern": _segment_regex(b.template, var.start, var.end)}
                param["description"] = (f"Binds request field `{var.field_path}`. The value matches "
                                        f"`{var.pattern}` and keeps its `/` characters: send them unescaped.")
            else:
                field = resolve_path(req, var.field_path)[-1]
                param["schema"] = self.element(field)
                param["description"] = self._field_text(field, f"Binds request field `{var.field_path}`.")
            out.append(param)
        return out

    def query_parameters(self, b: Binding, req) -> list[dict]:
        if b.body == "*":
            return []
        bound = {v.field_path for v in b.template.variables}
        bound |= {".".join(f.name for f in resolve_path(req, p)) for p in bound}
        out: list[dict] = []
        self._query_fields(req, "", "", bound, b.body, out, (req.full_name,))
        return out

    def _query_fields(self, desc, prefix, proto_prefix, bound, body, out, stack) -> None:
        for field in desc.fields:
            proto_path = proto_prefix + field.name
            if proto_path in bound or (not proto_prefix and field.name == body) or is_map(field):
                continue
            name = prefix + field.json_name
            if scalar_leaf(field):
                param = {"name": name, "in": "query", "required": False, "schema": self.field_schema(field)}
                if field.is_repeated:
                    param.update(style="form", explode=True)
                text = self._field_text(field, "")
                if text:
                    param["description"] = text
                out.append(param)
            elif (not field.is_repeated and not is_wkt(field.message_type)
                  and field.message_type.full_name not in stack and len(stack) < _MAX_QUERY_DEPTH):
                self._query_fields(field.message_type, name + ".", proto_path + ".", bound, body, out,
                                   stack + (field.message_type.full_name,))

    def request_body(self, b: Binding, req) -> dict:
        if b.body == "*":
            if req.full_name == HTTP_BODY:
                return _raw("The raw request body; its Content-Type is passed on.")
            schema = self.ref(req.full_name)
            chains = [resolve_path(req, v.field_path) for v in b.template.variables]
            top_bound = {chain[0].name for chain in chains if len(chain) == 1}
            if top_bound:
                props = {f.json_name: self.field_schema(f) for f in req.fields if f.name not in top_bound}
                schema = {"type": "object", "properties": props,
                          "description": f"{req.full_name} without the fields bound by the path "
                                         f"({', '.join(sorted(top_bound))})."}
            if b.client_streaming:
                schema = {"type": "array", "items": schema,
                          "description": "One request message per element (a single object is one message). "
                                         "An application/x-ndjson body (one message per line) works too."}
            return {"required": False, "content": {"application/json": {"schema": schema}}}
        field = req.fields_by_name[b.body]
        if is_message(field) and not field.is_repeated and field.message_type.full_name == HTTP_BODY:
            return _raw(f"The raw body, put into request field `{field.name}` (with its Content-Type).")
        return {"required": False, "content": {"application/json": {"schema": self.field_schema(field)}}}

    def success(self, b: Binding, resp) -> dict:
        if b.response_body:
            field = resp.fields_by_name[b.response_body]
            raw = is_message(field) and not field.is_repeated and field.message_type.full_name == HTTP_BODY
            what = f"field `{b.response_body}` of {resp.full_name}"
        else:
            raw, what = resp.full_name == HTTP_BODY, resp.full_name
        if raw:
            return {"description": "Raw bytes, with the Content-Type the rpc chose.",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}
        target_schema = self.field_schema(field) if b.response_body else self.ref(resp.full_name)
        if not b.server_streaming:
            return {"description": f"OK: {what}.", "content": {"application/json": {"schema": target_schema}}}
        return {"description": f"A stream of {what}: with `Accept: text/event-stream`, one server-sent event "
                               "per message (`data: <json>`); otherwise newline-delimited JSON, one message "
                               "per line. An error after the stream started is a last frame "
                               "`{\"error\": google.rpc.Status}` (SSE: `event: error`).",
                "content": {"application/x-ndjson": {"schema": target_schema},
                            "text/event-stream": {"schema": {"type": "string"}}}}

    # -- schemas ---------------------------------------------------------------------------

    def ref(self, full_name: str) -> dict:
        if full_name not in self.components:
            self.components[full_name] = {}  # placeholder first: messages may be recursive
            desc = self.pool.FindMessageTypeByName(full_name)
            self.components[full_name] = self.wkt(desc) or self.message(desc)
        return {"$ref": f"#/components/schemas/{full_name}"}

    def enum_ref(self, enum) -> dict:
        name = enum.full_name
        if name not in self.components:
            schema = {"type": "string", "enum": [v.name for v in enum.values]}
            text = self.comments.get(name)
            schema["description"] = (text + "\n\n" if text else "") + "Also accepted as the number in requests."
            self.components[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, desc) -> dict:
        props = {}
        for f in desc.fields:
            schema = self.field_schema(f)
            text = self._field_text(f, "")
            if text:
                schema = self._describe(schema, text)
            props[f.json_name] = schema
        schema = {"type": "object", "properties": props}
        if self.comments.get(desc.full_name):
            schema["description"] = self.comments[desc.full_name]
        return schema

    def field_schema(self, field) -> dict:
        if is_map(field):
            return {"type": "object", "additionalProperties": self.element(field.message_type.fields_by_name["value"])}
        if field.is_repeated:
            return {"type": "array", "items": self.element(field)}
        return self.element(field)

    def element(self, field) -> dict:
        t = field.type
        if t == T.TYPE_ENUM:
            if field.enum_type.full_name == "google.protobuf.NullValue":
                return self._nullable({}) if not self.v31 else {"type": "null"}
            return self.enum_ref(field.enum_type)
        if is_message(field):
            name = field.message_type.full_name
            if is_wkt(field.message_type) and name != "google.protobuf.Any":
                return self.wkt(field.message_type) or self.ref(name)
            return self.ref(name)
        return _scalar(t)

    def wkt(self, desc) -> dict | None:
        name = desc.full_name
        if name == "google.protobuf.Timestamp":
            return {"type": "string", "format": "date-time", "description": "RFC 3339, e.g. 2024-01-02T03:04:05Z"}
        if name == "google.protobuf.Duration":
            return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "description": "seconds, e.g. 1.5s"}
        if name == "google.protobuf.FieldMask":
            return {"type": "string", "description": "comma-separated lowerCamelCase field paths"}
        if name in WRAPPERS:
            return self._nullable(_scalar(desc.fields_by_name["value"].type))
        if name == "google.protobuf.Struct":
            return {"type": "object", "additionalProperties": True}
        if name == "google.protobuf.Value":
            return {"description": "any JSON value"}
        if name == "google.protobuf.ListValue":
            return {"type": "array", "items": {}}
        if name == "google.protobuf.Empty":
            return {"type": "object"}
        if name == "google.protobuf.Any":
            return {"type": "object", "required": ["@type"], "additionalProperties": True,
                    "properties": {"@type": {"type": "string", "description": "type.googleapis.com/<message name>"}},
                    "description": "A message of the type @type names, with its fields beside @type "
                                   "(a well-known type's JSON form goes under \"value\")."}
        return None

    def schema_for_status(self) -> None:
        self.ref("google.protobuf.Any")
        self.components[_STATUS] = {
            "type": "object",
            "description": "google.rpc.Status: the gRPC status code (0-16), a message, and typed details.",
            "properties": {"code": {"type": "integer", "format": "int32"}, "message": {"type": "string"},
                           "details": {"type": "array", "items": self.ref("google.protobuf.Any")}}}

    def _nullable(self, schema: dict) -> dict:
        schema = dict(schema)
        if self.v31:
            schema["type"] = [schema["type"], "null"] if "type" in schema else "null"
        else:
            schema["nullable"] = True
        return schema

    def _describe(self, schema: dict, text: str) -> dict:
        if "$ref" in schema and not self.v31:
            return {"allOf": [schema], "description": text}  # 3.0 ignores siblings of $ref
        return {**schema, "description": text}

    def _field_text(self, field, fallback: str) -> str:
        return self.comments.get(f"{field.containing_type.full_name}.{field.name}", fallback)


def _scalar(t: int) -> dict:
    if t in INT32_TYPES:
        return {"type": "integer", "format": "int32"}
    if t in UINT32_TYPES:
        return {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295}
    if t in INT64_TYPES:
        return {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"}
    if t in UINT64_TYPES:
        return {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"}
    if t in FLOAT_TYPES:
        return {"type": "number", "format": "double" if t == T.TYPE_DOUBLE else "float"}
    if t == T.TYPE_BOOL:
        return {"type": "boolean"}
    if t == T.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    return {"type": "string"}


def _raw(description: str) -> dict:
    return {"required": False, "description": description,
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}


def _comments(fds) -> dict[str, str]:
    """Leading comments by full name (services, rpcs, messages, fields, enums), when present."""
    out: dict[str, str] = {}
    for fd in fds.file:
        locs = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location
                if loc.leading_comments.strip()}
        if not locs:
            continue
        pkg = fd.package + "." if fd.package else ""

        def messages(msgs, prefix, path):
            for i, m in enumerate(msgs):
                name, p = prefix + m.name, path + (i,)
                _put(out, name, locs.get(p))
                for j, f in enumerate(m.field):
                    _put(out, f"{name}.{f.name}", locs.get(p + (2, j)))
                messages(m.nested_type, name + ".", p + (3,))
                enums(m.enum_type, name + ".", p + (4,))

        def enums(es, prefix, path):
            for i, e in enumerate(es):
                _put(out, prefix + e.name, locs.get(path + (i,)))

        messages(fd.message_type, pkg, (4,))
        enums(fd.enum_type, pkg, (5,))
        for i, s in enumerate(fd.service):
            _put(out, pkg + s.name, locs.get((6, i)))
            for j, m in enumerate(s.method):
                _put(out, f"{pkg}{s.name}.{m.name}", locs.get((6, i, 2, j)))
    return out


def _put(out: dict, key: str, text: str | None) -> None:
    if text:
        out[key] = text

