"""Keep-alive HTTP/1.1 connections to upstream endpoints, reused across requests.

Why a pool of our own: the listener drives each exchange from protocol callbacks (no task per
request), so a pooled connection must be obtainable synchronously (`take_idle`) and report the
response as callbacks to whatever exchange currently owns it.  A new connection is the only
step that needs a coroutine (`connect`).

An idle connection is owned by nobody: any byte or EOF from the server then means the server
has given up on it, so it is closed and forgotten.  The server can still close it in the instant
between `take_idle` and its first write (the classic keep-alive race); the owner sees that as
`on_upstream_lost` with `conn.reused` set and decides whether it may retry.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from httptools import HttpParserError, HttpResponseParser

from sidecar.config.model import Endpoint
from sidecar.writebatch import WriteBatch

log = logging.getLogger("protomesh.sidecar")

# Names handled by the parser/pool to decide framing and keep-alive (lowercase bytes).
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"

# How a response body is delimited on the upstream connection.
NO_BODY = 0
CONTENT_LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3


class ResponseHandler(Protocol):
    """What an exchange implements to receive one response from an `UpstreamConnection`."""

    def on_response_head(self, status: int, reason: bytes, headers: list, framing: int) -> None:
        """`framing` is one of NO_BODY, CONTENT_LENGTH, CHUNKED, UNTIL_CLOSE."""

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_complete(self, keep_alive: bool) -> None: ...

    def on_upstream_lost(self, why: str, got_bytes: bool) -> None: ...

    def on_upstream_pause(self) -> None: ...

    def on_upstream_resume(self) -> None: ...

    def flush(self) -> None:
        """End of one read from the upstream: write out what this read produced."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to one endpoint; parses responses and hands them to its owner."""

    __slots__ = ("pool", "key", "transport", "handler", "closed", "reused", "idle_since",
                 "_parser", "_stale", "_head", "_status", "_reason", "_headers", "_in_body",
                 "_needs_eof", "_interim", "_got_bytes", "_read_paused", "_write_paused", "counted")

    def __init__(self, pool: "HttpPool", key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.handler: ResponseHandler | None = None
        self.closed = False
        self.reused = False  # True once it has served a response and come back from the pool
        self.idle_since = 0.0
        self._parser = HttpResponseParser(self)
        self._stale = False
        self._head = False
        self._status = 0
        self._reason = b""
        self._headers: list = []
        self._in_body = False
        self._needs_eof = False
        self._interim = False
        self._got_bytes = False
        self._read_paused = False
        self._write_paused = False
        self.counted = False  # included in its endpoint's `open` count

    # ---- used by the owner ----------------------------------------------------------------
    def start(self, handler: ResponseHandler, head_request: bool) -> None:
        """Hand the connection to `handler` for one request/response exchange."""
        self.handler = handler
        self._head = head_request
        self._got_bytes = False
        self._in_body = False
        self._needs_eof = False
        if self._stale:
            self._parser = HttpResponseParser(self)
            self._stale = False
        if self._write_paused:
            handler.on_upstream_pause()

    def write(self, data: bytes) -> None:
        self.pool.batch.write(self.transport, data)

    def writelines(self, parts) -> None:
        self.pool.batch.write(self.transport, b"".join(parts))

    def pause_reading(self) -> None:
        if not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now (owner gave up on it); no callbacks reach the owner."""
        self.handler = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:  # idle: the server is closing or misbehaving; never reuse it
            self.closed = True
            self.transport.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
            if self.handler is handler:
                handler.flush()
        except HttpParserError as exc:
            cause = exc.__context__ if exc.__context__ is not None else exc
            if self.handler is handler:
                self.handler = None
                self.closed = True
                self.transport.abort()
                if cause is exc:
                    handler.on_upstream_lost(f"protocol error: {exc}", True)
                else:
                    log.error("upstream exchange failed", exc_info=cause)
                    handler.on_upstream_lost(f"internal error: {cause!r}", True)
            elif cause is not exc:
                log.error("upstream exchange failed", exc_info=cause)

    def eof_received(self):
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool._forget(self)
        handler = self.handler
        if handler is None:
            return
        self.handler = None
        if self._in_body and self._needs_eof:
            self._in_body = False
            handler.on_response_complete(False)  # HTTP/1.0 style body ends at close
        else:
            handler.on_upstream_lost(str(exc) if exc else "connection closed by upstream",
                                     self._got_bytes)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.handler is not None:
            self.handler.on_upstream_pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.handler is not None:
            self.handler.on_upstream_resume()

    # ---- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        if status < 200 and status != 101:
            self._interim = True  # 100/102/103: the final response follows on this connection
            return
        self._interim = False
        chunked = False
        length = False
        for name, value in self._headers:
            if len(name) == 14 and name.lower() == _CONTENT_LENGTH:
                length = True
            elif len(name) == 17 and name.lower() == _TRANSFER_ENCODING:
                chunked = b"chunked" in value.lower()
        body = not (self._head or status == 204 or status == 304)
        if not body:
            framing = NO_BODY
        elif chunked:
            framing = CHUNKED
        elif length:
            framing = CONTENT_LENGTH
        else:
            framing = UNTIL_CLOSE
        self._needs_eof = framing == UNTIL_CLOSE
        handler = self.handler
        if handler is None:
            return
        handler.on_response_head(status, self._reason, self._headers, framing)
        if not body and self._head and self.handler is handler:
            # llhttp cannot be told "this answers a HEAD"; finish here, new parser next time.
            self._stale = True
            self.handler = None
            handler.on_response_complete(_head_keep_alive(self._parser, self._headers, length,
                                                          chunked))
            return
        self._in_body = body

    def on_body(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None:
            handler.on_response_body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        handler = self.handler
        self._in_body = False
        if handler is None:
            return
        keep_alive = self._parser.should_keep_alive()
        self.handler = None
        handler.on_response_complete(keep_alive)


def _head_keep_alive(parser, headers, length: bool, chunked: bool) -> bool:
    """Keep-alive for a HEAD response: llhttp would wrongly expect a body, so decide ourselves."""
    version = parser.get_http_version()
    tokens = b""
    for name, value in headers:
        if len(name) == 10 and name.lower() == _CONNECTION:
            tokens += b"," + value.lower()
    if b"close" in tokens:
        return False
    return version == "1.1" or b"keep-alive" in tokens


class _EndpointPool:
    __slots__ = ("idle", "open")

    def __init__(self):
        self.idle: list[UpstreamConnection] = []  # LIFO: reuse the warmest connection
        self.open = 0


class HttpPool:
    """Idle keep-alive connections per endpoint, shared by all HTTP listeners of a sidecar."""

    def __init__(self, connect_timeout_default: float = 5.0, max_idle_per_endpoint: int = 64,
                 idle_timeout_s: float = 60.0):
        self.connect_timeout_default = connect_timeout_default
        self.max_idle_per_endpoint = max_idle_per_endpoint
        self.idle_timeout_s = idle_timeout_s
        self._endpoints: dict[tuple[str, int], _EndpointPool] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.batch = WriteBatch()  # shared with the HTTP listeners (sidecar/writebatch.py)
        self._loop: asyncio.AbstractEventLoop | None = None  # cached by connect(): get_running_loop() is a syscall on 3.11

    def take_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """An idle connection to `endpoint`, or None; synchronous so the hot path needs no task."""
        ep = self._endpoints.get((endpoint.host, endpoint.port))
        if ep is None:
            return None
        idle = ep.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, endpoint: Endpoint, connect_timeout: float | None = None) -> UpstreamConnection:
        """A new connection.  Raises OSError (refused, unreachable) or asyncio.TimeoutError."""
        if self._closed:
            raise OSError("connection pool is closed")
        key = (endpoint.host, endpoint.port)
        timeout = self.connect_timeout_default if connect_timeout is None else connect_timeout
        loop = self._loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, key)
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: conn, endpoint.host, endpoint.port)
        ep = self._endpoints.get(key)
        if ep is None:
            ep = self._endpoints[key] = _EndpointPool()
        if conn.closed:  # lost between connect and now
            raise OSError("connection closed right after connect")
        ep.open += 1
        conn.counted = True
        return conn

    async def acquire(self, endpoint: Endpoint, connect_timeout: float | None = None) -> UpstreamConnection:
        conn = self.take_idle(endpoint)
        if conn is not None:
            return conn
        return await self.connect(endpoint, connect_timeout)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after an exchange; reusable only if request and response were
        both complete and both sides agreed on keep-alive."""
        conn.handler = None
        if conn.closed:
            return
        ep = self._endpoints.get(conn.key)
        if not reusable or self._closed or ep is None or len(ep.idle) >= self.max_idle_per_endpoint:
            conn.closed = True
            self.batch.close(conn.transport)
            return
        conn.resume_reading()  # so a server-side close of an idle connection is noticed
        conn.reused = True
        loop = self._loop
        conn.idle_since = loop.time()
        ep.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_timeout_s / 2 + 0.01, self._sweep)

    def _forget(self, conn: UpstreamConnection) -> None:
        """Called from `connection_lost`: the connection no longer counts as open or idle."""
        ep = self._endpoints.get(conn.key)
        if ep is None:
            return
        if conn.counted:
            conn.counted = False
            ep.open -= 1
        try:
            ep.idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout_s
        remaining = 0
        for ep in self._endpoints.values():
            keep = []
            for conn in ep.idle:
                if conn.closed:
                    continue
                if conn.idle_since <= cutoff:
                    conn.closed = True
                    conn.transport.close()
                else:
                    keep.append(conn)
            ep.idle[:] = keep
            remaining += len(keep)
        if remaining and not self._closed:
            self._sweeper = loop.call_later(self.idle_timeout_s / 2 + 0.01, self._sweep)

    def open_count(self, endpoint: Endpoint) -> int:
        ep = self._endpoints.get((endpoint.host, endpoint.port))
        return ep.open if ep is not None else 0

    def stats(self) -> dict[str, dict[str, int]]:
        """`{"host:port": {"open": n, "idle": m}}` for the admin /clusters page."""
        return {f"{host}:{port}": {"open": ep.open, "idle": sum(1 for c in ep.idle if not c.closed)}
                for (host, port), ep in self._endpoints.items()}

    def close(self) -> None:
        """Close idle connections and refuse to pool more; busy ones close when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for ep in self._endpoints.values():
            for conn in ep.idle:
                if not conn.closed:
                    conn.closed = True
                    conn.transport.close()
            ep.idle.clear()
