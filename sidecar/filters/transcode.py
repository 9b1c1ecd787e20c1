"""Envoy's grpc_json_transcoder config → a built `sidecar.transcode.Transcoder` on the listener.

Honoured subset of `GrpcJsonTranscoder`: `proto_descriptor_bin`, `services`, `print_options`,
`convert_grpc_status` (errors are always google.rpc.Status JSON here), `query_param_unescape_plus`,
`ignore_unknown_query_parameters`, `ignored_query_parameters`, `auto_mapping`,
`request_validation_options.reject_unknown_query_parameters`, `max_request_body_size`.
`max_response_body_size` is accepted (responses are streamed message by message, never
buffered whole).  Anything else is refused by name (NACK).  Server-streaming rpcs go out as
NDJSON, or as server-sent events when the client's Accept asks for `text/event-stream`.

The same descriptor set also gives the gateway's `GET /openapi.json` (built on first request).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2 as t

from sidecar.config.errors import ConfigError
from sidecar.transcode import PrintOptions, TranscodeConfigError, Transcoder

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
OPENAPI_PATH = "/openapi.json"
_ALLOWED = {"proto_descriptor_bin", "services", "print_options", "convert_grpc_status", "query_param_unescape_plus",
            "ignore_unknown_query_parameters", "ignored_query_parameters", "auto_mapping",
            "request_validation_options", "max_request_body_size", "max_response_body_size"}


@dataclass
class TranscodeSettings:
    transcoder: Transcoder
    descriptor_set: bytes
    services: tuple[str, ...]
    max_body: int
    _openapi: bytes | None = field(default=None, repr=False)

    def openapi(self, host: str) -> bytes:
        """The OpenAPI 3 document of the bindings served here (cached per config)."""
        if self._openapi is None:
            from protomesh.openapi import openapi_document
            doc = openapi_document(self.descriptor_set, list(self.services), "protomesh gateway")
            self._openapi = json.dumps(doc, indent=1).encode()
        return self._openapi


def parse_filter(anyv, where: str) -> TranscodeSettings:
    from sidecar.config.parse import unpack_any
    cfg = unpack_any(anyv, t.GrpcJsonTranscoder, where)
    for fd, _ in cfg.ListFields():
        if fd.name not in _ALLOWED:
            raise ConfigError(f"{where}.{fd.name}", "is set but not supported by the protomesh sidecar")
    rvo = cfg.request_validation_options
    for fd, _ in rvo.ListFields():
        if fd.name != "reject_unknown_query_parameters":
            raise ConfigError(f"{where}.request_validation_options.{fd.name}", "is not supported")
    if not cfg.proto_descriptor_bin or not cfg.services:
        raise ConfigError(where, "needs proto_descriptor_bin and services")
    po = cfg.print_options
    max_body = cfg.max_request_body_size.value if cfg.HasField("max_request_body_size") else 4 << 20
    try:
        tc = Transcoder.from_descriptor_set(
            cfg.proto_descriptor_bin, list(cfg.services), auto_mapping=cfg.auto_mapping,
            max_body_bytes=max_body,
            ignore_unknown_query_parameters=cfg.ignore_unknown_query_parameters and not rvo.reject_unknown_query_parameters,
            ignored_query_parameters=tuple(cfg.ignored_query_parameters),
            query_param_unescape_plus=cfg.query_param_unescape_plus,
            print_options=PrintOptions(po.always_print_primitive_fields, po.always_print_enums_as_ints,
                                       po.preserve_proto_field_names, po.add_whitespace))
    except TranscodeConfigError as exc:
        raise ConfigError(f"{where}.{exc.where}", exc.reason) from None
    except Exception as exc:  # a descriptor set that does not even load
        raise ConfigError(f"{where}.proto_descriptor_bin", f"cannot load: {exc}") from None
    return TranscodeSettings(tc, cfg.proto_descriptor_bin, tuple(cfg.services), max_body)
