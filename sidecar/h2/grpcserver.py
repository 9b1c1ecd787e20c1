"""A small gRPC server on our HTTP/2 (sidecar/h2): each method is a callback object, messages
are bytes.

Why: the control server's ADS ran on grpc.aio, and with thousands of sidecars a push is one
response and one ACK per stream; py-spy put ~70 % of the push's CPU in grpc.aio's per-message
C-core and Cython machinery.  Here a message costs a length prefix, a DATA frame and a callback.

It serves what an xDS server needs and no more: unary and streaming calls without compression
(a compressed message is refused with UNIMPLEMENTED, since we never offer a grpc-encoding), no
deadlines (ADS streams have none), plain TCP.  Unknown methods get UNIMPLEMENTED.

A method is a factory `make(call) -> handler`; the handler (duck-typed) is told:
  on_message(data)   one request message (it may answer with call.send / call.finish)
  on_end()           the client half-closed its side
  on_cancel()        the call ended without the handler finishing it: the client reset it,
                     the connection went away, or the client sent bytes that are not messages
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from sidecar.h2 import frames as F
from sidecar.h2 import grpcwire as W
from sidecar.h2.connection import H2Connection, Stream
from sidecar.h2.serving import Serving

log = logging.getLogger("protomesh.h2")

RESPONSE_HEAD = ((b":status", b"200"), (b"content-type", b"application/grpc"))
UNIMPLEMENTED = 12
INTERNAL = 13


class Call:
    """One call on one stream: request messages go to `handler`, responses leave by `send`."""

    __slots__ = ("conn", "st", "peer", "metadata", "handler", "deframer", "started", "done")

    def __init__(self, conn: "_Connection", st: Stream, peer: str, metadata: dict[str, str],
                 max_message: int):
        self.conn = conn
        self.st = st
        self.peer = peer
        self.metadata = metadata  # request headers, str → str (pseudo-headers excluded but :authority)
        self.handler = None
        self.deframer = W.Deframer(max_message)
        self.started = False  # response headers sent
        self.done = False

    def send(self, message: bytes) -> None:
        """One response message (queued behind the peer's flow-control window if need be)."""
        if self.done or self.st.closed:
            return
        conn = self.conn
        if not self.started:
            self.started = True
            conn.send_headers(self.st, RESPONSE_HEAD, False)
        # Prefix and message go separately: a response shared by thousands of streams (an EDS
        # push) is then queued behind each stream's flow-control window by reference, not copied.
        conn.send_data(self.st, W.message_prefix(len(message)), False)
        conn.send_data(self.st, message, False)

    def finish(self, code: int = 0, message: str = "") -> None:
        """End the call with a status (after the messages already sent)."""
        if self.done:
            return
        self.done = True
        st, conn = self.st, self.conn
        if st.closed:
            return
        conn.send_headers(st, W.trailers(code, message) if self.started else W.trailers_only(code, message), True)
        if not st.remote_closed and st.pending is None and not st.closed:
            conn.reset(st, F.NO_ERROR)  # the client need not send more (RFC 9113 §8.1)

    def _cancel(self) -> None:
        if not self.done:
            self.done = True
            handler = self.handler
            if handler is not None:
                handler.on_cancel()

    def _fail(self, code: int, message: str) -> None:
        """End the call on the server's initiative (bad input, a bug): the handler is cancelled."""
        handler = self.handler
        self.finish(code, message)
        if handler is not None:
            handler.on_cancel()

    # ---- stream callbacks (sidecar/h2/connection.py) ---------------------------------------------
    def on_data(self, st: Stream, data: bytes, end: bool) -> None:
        if data:
            self.conn.consume(st, len(data))  # what arrives is handled now, never queued
        if self.done:
            return
        try:
            messages = self.deframer.feed(data) if data else ()
        except W.MessageError as exc:
            self._fail(exc.code, str(exc))
            return
        handler = self.handler
        try:
            for message in messages:
                handler.on_message(message)
                if self.done:
                    return
            if end:
                if self.deframer.pending:
                    self._fail(INTERNAL, f"the request ended inside a message ({self.deframer.pending} bytes)")
                else:
                    handler.on_end()
        except Exception as exc:  # a bug in the method: the client gets INTERNAL with its name
            log.exception("gRPC method %s failed", type(handler).__name__)
            self._fail(INTERNAL, f"internal error: {type(exc).__name__}")

    def on_headers(self, st: Stream, fields, end: bool) -> None:
        if end:  # trailers from a client carry nothing for us; they end its side
            self.on_data(st, b"", True)

    def on_reset(self, st: Stream, code: int) -> None:
        self._cancel()

    def on_sent(self, st: Stream, n: int) -> None:
        pass


class _Connection(H2Connection):
    """The server role towards one client connection."""

    def __init__(self, server: "GrpcH2Server"):
        super().__init__(client=False, max_concurrent_streams=server.max_concurrent_streams)
        self.server = server
        self.peer = ""

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"ipv4:{peer[0]}:{peer[1]}"
        self.server.connection_opened(self)
        super().connection_made(transport)
        if self.server.keepalive is not None:
            self.keep_alive(*self.server.keepalive)

    def on_request(self, st: Stream, headers, end_stream: bool) -> None:
        try:
            head = W.parse_request(headers)
        except W.BadRequest as exc:
            log.info("gRPC server: bad request from %s: %s", self.peer, exc)
            self.reset(st, F.PROTOCOL_ERROR)
            return
        if not head.headers.get("content-type", "").startswith("application/grpc"):
            self.send_headers(st, ((b":status", b"415"),), True)  # what the gRPC spec asks of servers
            return
        encoding = head.headers.get("grpc-encoding", "identity")
        make = self.server.methods.get(head.path)
        if make is None or encoding != "identity":
            why = (f"unknown method {head.path}" if make is None else
                   f"grpc-encoding {encoding} is not supported (send uncompressed messages)")
            self.send_headers(st, W.trailers_only(UNIMPLEMENTED, why), True)
            if not st.closed:
                self.reset(st, F.NO_ERROR)
            return
        call = Call(self, st, self.peer, head.headers, self.server.max_message)
        st.handler = call
        call.handler = make(call)
        if end_stream:
            call.on_data(st, b"", True)

    def on_headers_too_large(self, st: Stream, why: str) -> None:
        self.send_headers(st, W.trailers_only(8, why), True)
        if not st.closed:
            self.reset(st, F.NO_ERROR)

    def on_closed(self) -> None:
        self.server.connection_closed(self)


class GrpcH2Server(Serving):
    """Listens on one address and serves `methods` ({"/pkg.Service/Method": make(call)})."""

    def __init__(self, methods: dict[str, Callable[[Call], object]], max_message: int = W.MAX_MESSAGE,
                 max_concurrent_streams: int = 1000, keepalive: tuple[float, float] | None = None):
        """`keepalive`: (interval, timeout) in seconds for every connection (H2Connection.keep_alive)."""
        super().__init__()
        self.methods = methods
        self.keepalive = keepalive
        self.max_message = max_message
        self.max_concurrent_streams = max_concurrent_streams
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port.  Raises OSError when the address is unusable."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host or None, port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting and drain (`Serving.drain_connections`): calls still open after
        `grace_s` are cancelled."""
        await self.drain_connections(grace_s)
