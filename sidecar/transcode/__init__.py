"""HTTP/JSON ↔ gRPC transcoding from google.api.http rules — pure functions, no I/O.

The gateway's HTTP listener owns the sockets; it asks this package three things per request:
which rpc does ``METHOD /path`` map to (``match``), what are the request message bytes
(``request_message``), and what does the client get back (``response_body``, ``stream_frame``,
``error_body``).  Built once per config from the descriptor set Envoy's ``grpc_json_transcoder``
also takes (``proto_descriptor_bin`` + ``services``), so both data planes agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from google.protobuf import message_factory

from sidecar.transcode import response as _resp
from sidecar.transcode.bindings import Binding, load_bindings
from sidecar.transcode.errors import TranscodeConfigError, TranscodeError
from sidecar.transcode.request import (RequestLimits, bound_params, check_size, fill_body, load_json, load_json_counted,
                                       parse_into)
from sidecar.transcode.response import JSON, NDJSON, SSE, PrintOptions
from sidecar.transcode.status import http_status

__all__ = ["Binding", "Match", "PrintOptions", "RequestLimits", "Transcoder", "TranscodeConfigError",
           "TranscodeError", "http_status", "JSON", "NDJSON", "SSE"]


@dataclass(frozen=True)
class Match:
    binding: Binding
    variables: Mapping[str, str] = field(default_factory=dict)   # field path → decoded value

    @property
    def grpc_path(self) -> str:
        return self.binding.grpc_path

    @property
    def client_streaming(self) -> bool:
        return self.binding.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.binding.server_streaming


class Transcoder:
    """Immutable after construction; share one per config version across all requests."""

    def __init__(self, bindings, pool, *, max_body_bytes: int = 4 << 20, max_json_depth: int = 64,
                 max_query_params: int = 1000, max_json_values: int = 100_000, ignore_unknown_query_parameters: bool = False,
                 ignored_query_parameters=(), query_param_unescape_plus: bool = True,
                 print_options: PrintOptions = PrintOptions()) -> None:
        self.bindings: tuple[Binding, ...] = tuple(bindings)
        self.pool = pool
        self.limits = RequestLimits(max_body_bytes, max_json_depth, max_query_params, max_json_values,
                                    ignore_unknown_query_parameters, frozenset(ignored_query_parameters),
                                    query_param_unescape_plus)
        self.print_options = print_options
        # Most specific template first, so the first hit is the answer.
        ordered = sorted(self.bindings, key=lambda b: b.template.specificity(), reverse=True)
        self._by_method: dict[str, tuple[Binding, ...]] = {}
        for b in ordered:
            self._by_method[b.http_method] = self._by_method.get(b.http_method, ()) + (b,)
        self._classes: dict[str, type] = {}
        for b in self.bindings:
            for name in (b.input_type, b.output_type):
                if name not in self._classes:
                    self._classes[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    @classmethod
    def from_descriptor_set(cls, fds_bytes: bytes, services: list[str], *, auto_mapping: bool = False,
                            **options) -> "Transcoder":
        pool, bindings = load_bindings(fds_bytes, services, auto_mapping=auto_mapping)
        return cls(bindings, pool, **options)

    # -- routing ---------------------------------------------------------------------------

    def match(self, http_method: str, path: str) -> Match | None:
        for b in self._by_method.get(http_method.upper(), ()):
            variables = b.template.match(path)
            if variables is not None:
                return Match(b, MappingProxyType(variables))
        return None

    def allowed_methods(self, path: str) -> list[str]:
        """Methods some binding accepts for ``path`` — for a 405's ``Allow`` header."""
        return sorted(m for m, bs in self._by_method.items() if any(b.template.match(path) is not None for b in bs))

    # -- requests --------------------------------------------------------------------------

    def request_message(self, match: Match, query: str, body: bytes, content_type: str) -> bytes:
        b = match.binding
        msg = self._classes[b.input_type]()
        if b.body:
            fill_body(msg, b.body, body, content_type, self.pool, self.limits)
        self._merge_params(msg, match, query)
        return msg.SerializeToString()

    def request_messages(self, match: Match, query: str, body: bytes, content_type: str) -> list[bytes]:
        """Client streaming: a JSON array body is one request message per element (a single
        object is one message); ``application/x-ndjson`` bodies are one message per line.
        Path and query fields are set on every message."""
        b = match.binding
        if not b.client_streaming:
            return [self.request_message(match, query, body, content_type)]
        if content_type.split(";")[0].strip().lower() == NDJSON:
            check_size(body, self.limits)
            items, budget = [], self.limits.max_json_values
            for line in body.splitlines():
                if line.strip():
                    value, used = load_json_counted(line, replace(self.limits, max_json_values=budget))
                    items.append(value)
                    budget -= used
        else:
            value = load_json(body, self.limits) if body.strip() else []
            items = value if isinstance(value, list) else [value]
        out = []
        for i, item in enumerate(items):
            msg = self._classes[b.input_type]()
            parse_into(item, msg, self.pool, self.limits, f"request body element {i}")
            self._merge_params(msg, match, query)
            out.append(msg.SerializeToString())
        return out

    def _merge_params(self, msg, match: Match, query: str) -> None:
        b = match.binding
        params = bound_params(msg.DESCRIPTOR, dict(match.variables), query, b.body, self.limits)
        if params:
            extra = self._classes[b.input_type]()
            parse_into(params, extra, self.pool, self.limits, "path/query parameters")
            msg.MergeFrom(extra)

    # -- responses -------------------------------------------------------------------------

    def response_body(self, match: Match, message: bytes) -> tuple[str, bytes]:
        b = match.binding
        reply = _resp.decode(self._classes[b.output_type], message)
        return _resp.render(reply, b.response_body, self.pool, self.print_options)

    def raw_response(self, match: Match) -> bool:
        """True when replies are google.api.HttpBody: the body is the raw bytes, and a stream is
        one long body (take its Content-Type from ``response_body`` of the first message)."""
        b = match.binding
        desc = self.pool.FindMessageTypeByName(b.output_type)
        if b.response_body:
            desc = desc.fields_by_name[b.response_body].message_type
        return desc is not None and desc.full_name == "google.api.HttpBody"

    def stream_content_type(self, match: Match, sse: bool) -> str:
        return SSE if sse else NDJSON

    def stream_frame(self, match: Match, message: bytes, sse: bool) -> bytes:
        b = match.binding
        reply = _resp.decode(self._classes[b.output_type], message)
        return _resp.frame(reply, b.response_body, self.pool, replace(self.print_options, add_whitespace=False), sse)

    def error_body(self, grpc_code: int, message: str, details_bin: bytes | None = None) -> tuple[int, str, bytes]:
        return _resp.error(grpc_code, message, details_bin, self.pool)

    def stream_error_frame(self, grpc_code: int, message: str, details_bin: bytes | None = None,
                           sse: bool = False) -> bytes:
        return _resp.error_frame(grpc_code, message, details_bin, self.pool, sse)
