"""The HTTP/1.1 proxy listener: asyncio protocols + httptools, driven from callbacks.

Why callbacks and not a task per request: this is the hot path (design decision 5), and an
exchange is a small state machine that the two parsers (downstream request, upstream response)
advance.  The only coroutine is opening a new upstream connection.

One `_Downstream` per client connection parses requests into `Exchange`s (http_exchange.py),
kept in arrival order; the head of the queue is the active one, later ones are pipelined and
wait (their bodies are buffered, and reading pauses once one is complete).  Bodies are streamed
both ways and never buffered whole; each side's `pause_writing` pauses reading on the other side.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque

from httptools import (HttpParserCallbackError, HttpParserError, HttpParserUpgrade,
                       HttpRequestParser)

from sidecar.call import (GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED, GRPC_INTERNAL,
                          GRPC_INVALID_ARGUMENT, REASON_HEADER, Call, Reply)
from sidecar.dataplane import Dataplane
from sidecar.listeners.http_exchange import PENDING_LIMIT, P_PIPELINE, Exchange
from sidecar.listeners.http_wire import CRLF, connection_tokens, status_line
from sidecar.upstream.http_pool import HttpPool

log = logging.getLogger("protomesh.sidecar")


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection we are closing."""


class _HeadersTooLarge(Exception):
    pass


class _Downstream(asyncio.Protocol):
    """One client connection: parse requests, keep them in order, answer them in order."""

    def __init__(self, listener: "HttpListener"):
        self.listener = listener
        self.loop = listener.loop  # cached: asyncio.get_running_loop() costs a getpid() syscall on 3.11
        self.batch = listener.pool.batch
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.peer = ""
        self.peer_ip = ""
        self.peer_ip_b = b""
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None  # exchange whose body is being parsed
        self.in_headers = False
        self.url = b""
        self.raw: list = []
        self.hdr_bytes = 0
        self.hdr_raw = 0
        self.paused = 0
        self.write_paused = False
        self.draining = False
        self.closing = False
        self.no_more = False  # the last parsed request ended the connection (close / upgrade)
        self.deferred: tuple | None = None  # an error reply waiting for earlier responses
        self.idle_deadline: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_io = 0.0  # time.monotonic() of the last bytes either way while a request is active
        self.stream_timer: asyncio.TimerHandle | None = None
        # The route timeout of the exchange in flight.  One timer per connection, re-armed only
        # when it fires early or must fire sooner: a TimerHandle per request was a measurable
        # share of the per-request cost.
        self.deadline_ex: Exchange | None = None
        self.deadline_at = 0.0
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.deadline_timer_at = 0.0

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_ip_b = self.peer_ip.encode()
        self.listener._conns.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.no_more:
            return
        self.last_io = time.monotonic()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self.no_more = True  # bytes after an Upgrade request are not HTTP; close after it
            return
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                return
            if isinstance(cause, _HeadersTooLarge):
                self._fail(431, "headers_too_large",
                           f"request headers exceed {self.listener.max_header_bytes} bytes")
                return
            log.error("http listener %s: request handling failed", self.listener.name,
                      exc_info=cause)
            self._fail(500, "internal_error", f"proxy error: {cause!r}")
            return
        except HttpParserError as exc:
            self._fail(400, "bad_request", str(exc) or type(exc).__name__)
            return
        if self.in_headers:
            self.hdr_raw += len(data)
            if self.hdr_raw > self.listener.max_header_bytes:
                self._fail(431, "headers_too_large",
                           f"request headers exceed {self.listener.max_header_bytes} bytes")

    def eof_received(self):
        return None  # like nginx: a client that stops sending while waiting has gone away

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.idle_deadline = None
        self.deadline_ex = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        if self.stream_timer is not None:
            self.stream_timer.cancel()
            self.stream_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        queue = self.queue
        self.queue = deque()
        for ex in queue:
            if ex.active or ex.timer is not None:  # (a timer while inactive: held by a fault delay)
                ex.downstream_lost()
        self.listener._forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.resume_reading()

    # ---- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing or self.no_more:
            raise _Stop()
        self.in_headers = True
        self.url = b""
        self.raw = []
        self.hdr_bytes = 0
        self.hdr_raw = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.hdr_bytes += len(url)
        if self.hdr_bytes > self.listener.max_header_bytes:
            raise _HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name, value))
        self.hdr_bytes += len(name) + len(value) + 4
        if self.hdr_bytes > self.listener.max_header_bytes:
            raise _HeadersTooLarge()

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.idle_deadline = None
        parser = self.parser
        raw = self.raw
        headers: dict[str, str] = {}
        for name, value in raw:
            key = name.lower().decode("latin-1")
            v = value.decode("latin-1")
            old = headers.get(key)
            headers[key] = v if old is None else old + ", " + v
        version = parser.get_http_version()
        connection = headers.get("connection")
        if connection is None:
            keep_alive = version == "1.1"
        else:
            lowered = connection.lower()
            if lowered == "keep-alive":
                keep_alive = True
            elif lowered == "close":
                keep_alive = False
            else:
                tokens = connection_tokens(connection)
                keep_alive = "close" not in tokens and (version == "1.1" or "keep-alive" in tokens)
        te = headers.get("transfer-encoding")
        chunked = te is not None and "chunked" in te.lower()
        cl = headers.get("content-length")
        has_body = chunked or (cl is not None and cl.strip() not in ("0", ""))
        expect = headers.get("expect", "").lower() == "100-continue"
        ex = Exchange(self, parser.get_method(), version, self.url, raw, headers,
                       chunked, has_body, keep_alive, expect)
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._activate(ex)

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.on_request_body(data)
            if not ex.active and not self.paused & P_PIPELINE:
                self._check_pipeline()

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if not self.parser.should_keep_alive():
            self.no_more = True
        if ex is None:
            return
        if not ex.req_done:
            ex.on_request_complete()
        if self.no_more and not self.queue and not self.closing:
            self._close()
            return
        self._check_pipeline()

    # ---- exchange bookkeeping -----------------------------------------------------------
    def last_request(self, ex: Exchange) -> bool:
        """True if nothing may follow `ex` on this connection."""
        return self.no_more and self.parsing is None and self.queue and self.queue[-1] is ex

    def exchange_done(self, ex: Exchange) -> None:
        if self.closing:
            return
        if ex.close_after or not ex.req_done or self.draining:
            self._close()
            return
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if queue:
            self._activate(queue[0])
            return
        if self.deferred is not None:
            status, reason, message = self.deferred
            self.deferred = None
            self._fail(status, reason, message)
            return
        if self.no_more and self.parsing is None and not self.in_headers:
            self._close()
            return
        self._check_pipeline()
        self._arm_idle()

    def _activate(self, ex: Exchange) -> None:
        self.last_io = time.monotonic()
        self._watch_stream()
        try:
            ex.activate()
        except Exception as exc:  # a bug in routing/telemetry must still answer the client
            log.exception("http listener %s: request handling failed", self.listener.name)
            if ex.resp_started:
                ex._finish(ex.status, "internal_error")
                self.abort()
            elif not ex.finished:
                ex.keep_alive = False
                ex.local_reply(Reply(500, GRPC_INTERNAL, "internal_error", f"proxy error: {exc!r}"))

    def _check_pipeline(self) -> None:
        queue = self.queue
        want = len(queue) > 1 and (self.parsing is None or
                                   sum(map(len, self.parsing.early or ())) > PENDING_LIMIT)
        self.set_paused(P_PIPELINE, want)

    def set_paused(self, bit: int, on: bool) -> None:
        before = self.paused
        after = before | bit if on else before & ~bit
        if after == before or self.closing:
            return
        self.paused = after
        if not before:
            self.transport.pause_reading()
        elif not after:
            self.transport.resume_reading()

    # ---- replies without an exchange, timers, closing -----------------------------------
    def write_reply(self, reply: Reply, call: Call | None, close: bool, http11: bool,
                    head: bool = False) -> int:
        """Write a local reply; returns the body length sent."""
        body = json.dumps({"error": reply.reason, "message": reply.message}).encode()
        parts = [status_line(reply.status),
                 b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                 b"%s: %s\r\n" % (REASON_HEADER.encode(), reply.reason_value(call).encode())]
        for name, value in reply.headers:
            parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            parts.append(b"connection: close\r\n")
        elif not http11:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(CRLF)
        if head:
            body = b""
        parts.append(body)
        self.send(b"".join(parts))
        return len(body)

    def _fail(self, status: int, reason: str, message: str) -> None:
        """Answer a request we could not parse (or took too long to send), then close."""
        if self.closing:
            return
        ex = self.parsing
        if ex is not None and not ex.finished:
            self.parsing = None
            if ex.active or ex.timer is not None:  # its own body is malformed: answer it (or cut it) and close
                ex.keep_alive = False
                if ex.resp_started:
                    ex._drop_upstream()
                    ex._finish(ex.status, reason)
                    self.abort()
                else:
                    grpc = GRPC_INVALID_ARGUMENT if status == 400 else GRPC_INTERNAL
                    ex.local_reply(Reply(status, grpc, reason, message))
                return
            self.queue.remove(ex)  # never started; the error reply takes its place
        if self.queue and not self.queue[0].resp_done:
            self.deferred = (status, reason, message)  # answer after the ones in front of it
            self.no_more = True
            self.set_paused(P_PIPELINE, True)
            return
        grpc = {400: GRPC_INVALID_ARGUMENT, 408: GRPC_DEADLINE_EXCEEDED,
                499: GRPC_CANCELLED}.get(status, GRPC_INTERNAL)
        reply = Reply(status, grpc, reason, message)
        listener = self.listener
        call = Call("http", "", "", self.url.decode("latin-1"), {}, self.peer, listener.name)
        listener.dataplane.begin(call)
        size = self.write_reply(reply, call, True, True)
        listener.dataplane.finish(call, None, status, reason, bytes_out=size)
        self._close()

    def watch_deadline(self, ex: Exchange, timeout: float) -> None:
        """Time `ex` out after `timeout` seconds unless it clears `deadline_ex` first."""
        loop = self.loop
        at = loop.time() + timeout
        self.deadline_ex = ex
        self.deadline_at = at
        timer = self.deadline_timer
        if timer is not None:
            if self.deadline_timer_at <= at:
                return  # fires first, then re-arms for the rest
            timer.cancel()
        self.deadline_timer_at = at
        self.deadline_timer = loop.call_at(at, self._on_deadline)

    def _on_deadline(self) -> None:
        self.deadline_timer = None
        ex = self.deadline_ex
        if ex is None or self.closing:
            return
        at = self.deadline_at
        if self.loop.time() < at:
            self.deadline_timer_at = at
            self.deadline_timer = self.loop.call_at(at, self._on_deadline)
            return
        self.deadline_ex = None
        ex._on_timeout()

    def _arm_idle(self) -> None:
        loop = self.loop
        self.idle_deadline = deadline = loop.time() + self.listener.header_timeout_s
        if self.idle_timer is None:
            self.idle_timer = loop.call_at(deadline, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self.idle_timer = None
        deadline = self.idle_deadline
        if deadline is None or self.closing or self.queue:
            return
        loop = self.loop
        if loop.time() < deadline:
            self.idle_timer = loop.call_at(deadline, self._on_idle_timer)
            return
        if self.in_headers:
            self._fail(408, "header_timeout",
                       f"request headers not complete within {self.listener.header_timeout_s:g}s")
        else:
            self._close()  # an idle keep-alive connection: close quietly

    def drain(self) -> None:
        """Stop after the request in flight (its response says `Connection: close`)."""
        self.draining = True
        if not self.queue and not self.in_headers:
            self._close()

    def _watch_stream(self) -> None:
        """Arm the stream idle watchdog (HCM `stream_idle_timeout`) for the exchange in flight."""
        if self.stream_timer is not None:
            return
        listener = self.listener
        spec = listener.dataplane.config.listeners.get(listener.name)
        limit = spec.stream_idle_timeout_s if spec is not None else None
        if limit:
            self.stream_timer = self.loop.call_later(limit, self._on_stream_idle, limit)

    def _on_stream_idle(self, limit: float) -> None:
        """No bytes either way for `limit`: end the exchange.  This is what frees a request whose
        body is stalled by backpressure after its client went away (with reading paused, the
        client's FIN is never seen) — both connections would otherwise be held indefinitely."""
        self.stream_timer = None
        if self.closing or not self.queue:
            return
        idle = time.monotonic() - self.last_io
        if idle < limit:
            self.stream_timer = self.loop.call_later(limit - idle, self._on_stream_idle, limit)
            return
        ex = self.queue[0]
        if ex.bridge is not None:
            return  # a gateway bridge (transcoding, gRPC-Web) is bounded by its gRPC deadline
        if ex.finished:
            self._watch_stream()  # the next exchange in the pipeline
            return
        if not ex.resp_started:
            ex.keep_alive = False
            ex.local_reply(Reply(408, GRPC_DEADLINE_EXCEEDED, "stream_idle_timeout",
                                 f"no request or response bytes for {limit:g}s"))
            self.abort()  # the client may not be reading: do not wait to flush to it
        else:
            ex._drop_upstream()
            ex._finish(ex.status, "stream_idle_timeout")
            self.abort()

    def send(self, data: bytes) -> None:
        """Every write to the client goes through the pool's write batch (in order)."""
        self.batch.write(self.transport, data)

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.batch.close(self.transport)

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()


class HttpListener:
    """An HTTP/1.1 listener that proxies every request the dataplane routes."""

    def __init__(self, name: str, dataplane: Dataplane, pool: HttpPool, *,
                 max_header_bytes: int = 65536, header_timeout_s: float = 30.0, grpc_pool=None):
        self.name = name
        self.dataplane = dataplane
        self.pool = pool
        self._grpc_pool = grpc_pool  # for transcoding / gRPC-Web at the gateway
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Downstream] = set()
        self._empty: asyncio.Event | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Downstream(self), host, port,
                                                reuse_port=reuse_port or None, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def grpc_pool(self):
        if self._grpc_pool is None:
            from sidecar.upstream.grpc_pool import GrpcPool
            self._grpc_pool = GrpcPool()
        return self._grpc_pool

    def gateway_spec(self):
        """This listener's config when a gateway filter (transcoding, gRPC-Web) is on, else None."""
        spec = self.dataplane.config.listeners.get(self.name)
        if spec is None or (spec.transcoder is None and not spec.grpc_web):
            return None
        return spec

    def _forget(self, conn: _Downstream) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; let requests in flight finish (then close), force-close at timeout."""
        if self._server is not None:
            self._server.close()
        self._empty = asyncio.Event()
        for conn in list(self._conns):
            conn.drain()
        if self._conns:
            try:
                await asyncio.wait_for(self._empty.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        for conn in list(self._conns):
            conn.abort()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
