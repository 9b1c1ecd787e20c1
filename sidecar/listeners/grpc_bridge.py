"""HTTP/1.1 requests the gateway answers by calling gRPC itself: JSON transcoding (google.api.http)
and gRPC-Web; plus its two local documents (`GET /openapi.json`, CORS preflight for gRPC-Web).

Why here and not as an upstream: the request must be buffered (bounded) and turned into gRPC
messages, and the answer streamed back in another framing, so the HTTP listener hands such an
exchange to a `Bridge` task instead of its byte-forwarding state machine.  Routing, breakers,
spans, stats and the access log still go through the dataplane like any request: the route is
chosen on the gRPC path (`/pkg.Service/Method`) so per-rpc routes (timeout, rate limit) apply,
as in Envoy, whose transcoder clears the route cache after rewriting the path.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import json

import grpc

from sidecar.call import GRPC_INVALID_ARGUMENT, REASON_HEADER, Reply
from sidecar.filters import grpcweb
from sidecar.filters.transcode import OPENAPI_PATH
from sidecar.listeners.http_wire import status_line
from sidecar.transcode import TranscodeError

GRPC_WEB_MAX_BODY = 4 << 20
# Request headers that describe the HTTP hop, not the call: never sent as gRPC metadata.
_SKIP = frozenset({"host", "connection", "keep-alive", "content-length", "content-type", "transfer-encoding",
                   "te", "upgrade", "accept", "accept-encoding", "expect", "traceparent", "tracestate", "baggage",
                   "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "x-grpc-web", "origin",
                   "proxy-connection", "trailer", "x-user-agent", "referer", "cookie"})
_RESERVED_OUT = frozenset({"content-type", "content-length", "grpc-status", "grpc-message", "date", "server",
                           "transfer-encoding", "connection"})
_HTTP_OF_GRPC = {2: 500, 4: 504, 12: 501, 13: 500, 14: 503, 15: 500}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def select(ex, spec) -> "Bridge | None":
    """The bridge for this request, or None to proxy it as usual."""
    call = ex.call
    path, _, query = call.path.partition("?")
    method = call.method
    ctype = call.headers.get("content-type", "")
    if spec.grpc_web:
        if method == "OPTIONS" and "access-control-request-method" in call.headers and _grpc_path(path):
            return Preflight(ex)
        if method == "POST" and grpcweb.is_grpc_web(ctype) and _grpc_path(path):
            return GrpcWebBridge(ex, path, spec.grpc_kinds.get(path, "unary"))
    settings = spec.transcoder
    if settings is not None:
        if method in ("GET", "HEAD") and path == OPENAPI_PATH:
            return OpenApi(ex, settings)
        if not ctype.startswith("application/grpc"):
            match = settings.transcoder.match(method, path)
            if match is not None:
                return TranscodeBridge(ex, settings, match, query)
    return None


def _grpc_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 3 and not parts[0] and "." in parts[1] and bool(parts[2])


class Bridge(ABC):
    """Answers one request at the gateway itself instead of routing it (transcoding, gRPC-Web,
    CORS preflight, OpenAPI); the HTTP listener feeds it the body, then calls `start`."""

    max_body = GRPC_WEB_MAX_BODY

    def __init__(self, ex):
        self.ex = ex
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False

    # ---- called by the HTTP listener ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > self.max_body:
            self.too_large = True
            self.body = []
            self.ex.keep_alive = False
            self.reply(413, "application/json", json.dumps({
                "code": GRPC_INVALID_ARGUMENT, "message": f"request body over {self.max_body} bytes"}).encode(),
                reason="body_too_large")
            return
        self.body.append(data)

    @abstractmethod
    def start(self) -> None:
        """The request is complete: answer it."""

    # ---- writing ----------------------------------------------------------------------------
    def _head(self, status: int, headers: list, length: int | None) -> bytes:
        ex = self.ex
        conn = ex.conn
        http11 = ex.version != "1.0"
        close = not ex.keep_alive or not ex.req_done or conn.draining or conn.last_request(ex) or \
            (length is None and not http11)
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif http11:
            parts.append(b"transfer-encoding: chunked\r\n")
        if close:
            parts.append(b"connection: close\r\n")
        elif not http11:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        ex.close_after = close
        ex.resp_started = True
        ex.status = status
        return b"".join(parts)

    def reply(self, status: int, ctype: str, body: bytes, headers=(), reason: str = "") -> None:
        """A whole response at once; ends the exchange."""
        ex = self.ex
        if ex.finished or ex.resp_started:
            return
        hdrs = [("content-type", ctype), *headers]
        if reason:
            hdrs.append((REASON_HEADER, Reply(status, 0, reason, "").reason_value(ex.call)))
        head_only = ex.method_b == b"HEAD"
        ex.conn.send(self._head(status, hdrs, len(body)) + (b"" if head_only else body))
        ex.bytes_out += len(body)
        self._end(status, reason)

    def begin_stream(self, status: int, headers: list) -> None:
        self.chunked = self.ex.version != "1.0"
        self.ex.conn.send(self._head(status, headers, None))

    async def chunk(self, data: bytes) -> None:
        ex = self.ex
        if not data or ex.finished:
            return
        ex.bytes_out += len(data)
        ex.conn.send(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        conn = ex.conn
        waited = 0.0
        while conn.write_paused and not conn.closing and waited < 60.0:  # backpressure from a slow client
            await asyncio.sleep(0.005)
            waited += 0.005

    def end_stream(self, status: int, reason: str = "") -> None:
        if self.chunked and not self.ex.conn.closing:
            self.ex.conn.send(b"0\r\n\r\n")
        self._end(status, reason)

    def _end(self, status: int, reason: str) -> None:
        ex = self.ex
        if ex.finished:
            return
        ex._finish(status, reason)
        ex._response_done()

    # ---- routing and the upstream call --------------------------------------------------------
    def route(self, grpc_path: str):
        """The dataplane's choice for the gRPC path (a Target), or the Reply it gave."""
        ex = self.ex
        call = ex.call
        dp = ex.conn.listener.dataplane
        saved_path, saved_ct = call.path, call.headers.get("content-type")
        call.path = grpc_path
        call.headers["content-type"] = "application/grpc"
        try:
            result = dp.route(call)
        finally:
            call.path = saved_path
            if saved_ct is None:
                call.headers.pop("content-type", None)
            else:
                call.headers["content-type"] = saved_ct
        if not isinstance(result, Reply):
            ex.target = result
        return result

    def metadata(self, target) -> tuple:
        ex = self.ex
        out = []
        for key, value in ex.call.headers.items():
            if key in _SKIP or key.startswith(":") or key.endswith("-bin") or key.startswith("access-control-"):
                continue
            out.append((key, value))
        peer_ip = ex.conn.peer_ip
        xff = ex.call.headers.get("x-forwarded-for")
        out = [(k, v) for k, v in out if k != "x-forwarded-for"]
        out.append(("x-forwarded-for", f"{xff}, {peer_ip}" if xff else peer_ip))
        out.extend(ex.conn.listener.dataplane.upstream_headers(ex.call))
        return tuple(out)

    def open_call(self, target, grpc_path: str, shape: str, request, timeout: float | None):
        ex = self.ex
        channel = ex.conn.listener.grpc_pool.channel(target.endpoint.address)
        return getattr(channel, shape)(grpc_path)(request, timeout=timeout, metadata=self.metadata(target))

    def upstream_failure(self, err: grpc.aio.AioRpcError, mesh_timeout: bool) -> tuple[str, tuple]:
        """(our reason or "", trailing metadata) for an upstream error; a peer's reason is relayed."""
        code = err.code()
        trailing = tuple(err.trailing_metadata() or ())
        for k, v in trailing:
            if k == REASON_HEADER:
                return "", trailing
        if code == grpc.StatusCode.UNAVAILABLE and not err.initial_metadata():
            return "upstream_unavailable", trailing
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and mesh_timeout:
            return "upstream_timeout", trailing
        return "", trailing

    def report(self, grpc_code: int) -> None:
        ex = self.ex
        if ex.target is not None:
            ex.conn.listener.dataplane.report(ex.target, _HTTP_OF_GRPC.get(grpc_code, 200))


def _response_headers(metadata) -> list:
    return [(k, v) for k, v in (metadata or ()) if isinstance(v, str) and k not in _RESERVED_OUT
            and not k.startswith(":")]


def _details_bin(trailing) -> bytes | None:
    for k, v in trailing:
        if k == "grpc-status-details-bin" and isinstance(v, bytes):
            return v
    return None


class CallBridge(Bridge):
    """A bridge that answers by calling the gRPC service: `run` does, as the exchange's task."""

    def start(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        ex.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.run(b"".join(self.body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still answer the client
            import logging
            logging.getLogger("protomesh.sidecar").exception("gateway bridge failed")
            if not self.ex.resp_started:
                self.reply(500, "application/json", json.dumps({"code": 13, "message": repr(exc)}).encode(),
                           reason="internal_error")
            elif not self.ex.finished:
                self.ex._finish(self.ex.status, "internal_error")
                self.ex.conn.abort()
        finally:
            if self.ex.task is asyncio.current_task():
                self.ex.task = None

    @abstractmethod
    async def run(self, body: bytes) -> None:
        """Call the service with the request `body` and write the answer."""


class TranscodeBridge(CallBridge):
    """JSON in, gRPC to the route's cluster, JSON (unary) or NDJSON / SSE (server streaming) out."""

    def __init__(self, ex, settings, match, query: str):
        super().__init__(ex)
        self.settings = settings
        self.match = match
        self.query = query
        self.max_body = settings.max_body

    def error(self, code: int, message: str, details_bin=None, reason: str = "", status: int | None = None,
              headers=()) -> None:
        st, ctype, body = self.settings.transcoder.error_body(code, message, details_bin)
        hdrs = list(headers)
        if reason and any(k == REASON_HEADER for k, _ in hdrs):
            reason = ""
        self.reply(status or st, ctype, body, hdrs, reason=reason)

    async def run(self, body: bytes) -> None:
        ex, tc, match = self.ex, self.settings.transcoder, self.match
        ctype = ex.call.headers.get("content-type", "application/json")
        try:
            if match.client_streaming:
                request = tc.request_messages(match, self.query, body, ctype)
            else:
                request = tc.request_message(match, self.query, body, ctype)
        except TranscodeError as exc:
            self.error(GRPC_INVALID_ARGUMENT, exc.message, reason=exc.reason, status=exc.http_status)
            return
        result = self.route(match.grpc_path)
        if isinstance(result, Reply):
            self.error(result.grpc_status, f"{result.reason}: {result.message}", reason=result.reason,
                       status=result.status, headers=result.headers)
            return
        target = result
        timeout = target.timeout_s
        if match.server_streaming:
            await self._stream(target, request, timeout)
            return
        shape = "stream_unary" if match.client_streaming else "unary_unary"
        upstream = self.open_call(target, match.grpc_path, shape, iter(request) if match.client_streaming else request,
                                  timeout)
        try:
            reply = await upstream
            initial = await upstream.initial_metadata()
        except grpc.aio.AioRpcError as err:
            self._failed(err, timeout is not None)
            return
        except asyncio.CancelledError:
            upstream.cancel()
            raise
        self.report(0)
        try:
            out_type, out = tc.response_body(match, reply)
        except TranscodeError as exc:
            self.error(13, exc.message, reason=exc.reason, status=exc.http_status)
            return
        self.reply(200, out_type, out, _response_headers(initial))

    def _failed(self, err: grpc.aio.AioRpcError, mesh_timeout: bool) -> None:
        code = err.code().value[0]
        self.report(code)
        reason, trailing = self.upstream_failure(err, mesh_timeout)
        relayed = [(k, v) for k, v in trailing if k == REASON_HEADER and isinstance(v, str)]
        message = err.details() or ""
        if reason:
            message = f"{reason}: {message}"
        self.error(code, message, _details_bin(trailing), reason=reason, headers=relayed)

    async def _stream(self, target, request: bytes, timeout: float | None) -> None:
        ex, tc, match = self.ex, self.settings.transcoder, self.match
        sse = "text/event-stream" in ex.call.headers.get("accept", "")
        upstream = self.open_call(target, match.grpc_path, "unary_stream", request, timeout)
        started = False
        try:
            async for message in upstream:
                if not started:
                    started = True
                    initial = await upstream.initial_metadata()
                    self.begin_stream(200, [("content-type", tc.stream_content_type(match, sse)),
                                            ("cache-control", "no-cache"), *_response_headers(initial)])
                await self.chunk(tc.stream_frame(match, message, sse))
        except grpc.aio.AioRpcError as err:
            if not started:
                self._failed(err, timeout is not None)
                return
            code = err.code().value[0]
            self.report(code)
            reason, trailing = self.upstream_failure(err, timeout is not None)
            await self.chunk(tc.stream_error_frame(code, err.details() or "", _details_bin(trailing), sse))
            self.end_stream(200, reason or "upstream_stream_error")
            return
        except TranscodeError as exc:
            if not started:
                self.error(13, exc.message, reason=exc.reason, status=exc.http_status)
            else:
                await self.chunk(tc.stream_error_frame(13, exc.message, None, sse))
                self.end_stream(200, exc.reason)
            upstream.cancel()
            return
        except asyncio.CancelledError:
            upstream.cancel()
            raise
        self.report(0)
        if not started:  # an empty stream: headers, then the end
            self.begin_stream(200, [("content-type", tc.stream_content_type(match, sse))])
        self.end_stream(200)


class GrpcWebBridge(CallBridge):
    """gRPC-Web (binary or base64 text) in, gRPC to the route's cluster, gRPC-Web frames out."""

    def __init__(self, ex, path: str, kind: str):
        super().__init__(ex)
        self.path = path
        self.kind = kind

    def _cors(self) -> list:
        origin = self.ex.call.headers.get("origin")
        if not origin:
            return []
        return [("access-control-allow-origin", origin), ("access-control-expose-headers", grpcweb.EXPOSE),
                ("vary", "Origin")]

    def _trailers_only(self, code: int, message: str, reason: str = "", extra=()) -> None:
        ctype = grpcweb.response_type(self.ex.call.headers.get("content-type", ""))
        hdrs = [("grpc-status", str(code)), ("grpc-message", grpcweb._pct(message)), *self._cors(), *extra]
        self.reply(200, ctype, b"", hdrs, reason=reason)

    async def run(self, body: bytes) -> None:
        ex = self.ex
        ctype = ex.call.headers.get("content-type", "")
        text = grpcweb.is_text(ctype)
        try:
            messages = grpcweb.decode_messages(grpcweb.decode_text(body) if text else body)
        except grpcweb.GrpcWebError as exc:
            self._trailers_only(GRPC_INVALID_ARGUMENT, f"bad gRPC-Web request: {exc}", "bad_request")
            return
        if self.kind in ("unary", "server_stream") and len(messages) != 1:
            self._trailers_only(GRPC_INVALID_ARGUMENT, f"expected 1 request message, got {len(messages)}", "bad_request")
            return
        result = self.route(self.path)
        if isinstance(result, Reply):
            self._trailers_only(result.grpc_status, f"{result.reason}: {result.message}", result.reason)
            return
        target = result
        timeout = target.timeout_s
        caller = _grpc_timeout(ex.call.headers.get("grpc-timeout", ""))
        mesh_timeout = True
        if caller is not None and (timeout is None or caller < timeout):
            timeout, mesh_timeout = caller, False
        shape = {"unary": "unary_unary", "server_stream": "unary_stream", "client_stream": "stream_unary"}.get(
            self.kind, "stream_stream")
        request = messages[0] if shape.startswith("unary") else iter(messages)
        upstream = self.open_call(target, self.path, shape, request, timeout)
        started = False
        out_type = grpcweb.response_type(ctype)
        try:
            if shape.endswith("unary"):
                replies = [await upstream]
            else:
                replies = upstream
            async for message in _aiter(replies):
                if not started:
                    started = True
                    initial = await upstream.initial_metadata()
                    self.begin_stream(200, [("content-type", out_type), *self._cors(), *_response_headers(initial)])
                await self.chunk(grpcweb.encode(grpcweb.frame(message), text))
            code, details = 0, ""
            trailing = tuple(await upstream.trailing_metadata() or ())
            reason = ""
        except grpc.aio.AioRpcError as err:
            code, details = err.code().value[0], err.details() or ""
            reason, trailing = self.upstream_failure(err, mesh_timeout)
            if reason:
                details = f"{reason}: {details}"
                trailing = trailing + ((REASON_HEADER, Reply(0, 0, reason, "").reason_value(ex.call)),)
            if not started:
                self.report(code)
                relay = [(k, v) for k, v in trailing if isinstance(v, str) and k not in _RESERVED_OUT
                         and not (reason and k == REASON_HEADER)]
                self._trailers_only(code, details, reason, relay)
                return
        except asyncio.CancelledError:
            upstream.cancel()
            raise
        self.report(code)
        if not started:
            initial = await upstream.initial_metadata()
            self.begin_stream(200, [("content-type", out_type), *self._cors(), *_response_headers(initial)])
        await self.chunk(grpcweb.encode(grpcweb.trailer_frame(code, details, trailing), text))
        self.end_stream(200, reason)


async def _aiter(items):
    if hasattr(items, "__aiter__"):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x


def _grpc_timeout(value: str) -> float | None:
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * units[value[-1]]


class Preflight(Bridge):
    """CORS preflight for browsers calling gRPC-Web (our sidecar's; Envoy needs its cors filter)."""

    def start(self) -> None:
        ex = self.ex
        h = ex.call.headers
        origin = h.get("origin", "*")
        self.reply(204, "text/plain", b"", [
            ("access-control-allow-origin", origin), ("access-control-allow-methods", "POST, OPTIONS"),
            ("access-control-allow-headers", h.get("access-control-request-headers",
                                                   "content-type,x-grpc-web,x-user-agent,grpc-timeout")),
            ("access-control-max-age", "86400"), ("access-control-expose-headers", grpcweb.EXPOSE),
            ("vary", "Origin")])


class OpenApi(Bridge):
    """`GET /openapi.json`: the OpenAPI 3 document of the bindings this listener transcodes."""

    def __init__(self, ex, settings):
        super().__init__(ex)
        self.settings = settings

    def start(self) -> None:
        try:
            doc = self.settings.openapi(self.ex.call.authority)
        except Exception as exc:  # the transcoder loaded these bindings; this should not happen
            self.reply(500, "application/json", json.dumps({"message": repr(exc)}).encode(), reason="internal_error")
            return
        self.reply(200, "application/json", doc, [("cache-control", "no-cache")])

