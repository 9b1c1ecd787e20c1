"""gRPC proxy listener on our own HTTP/2 (the `h2` engine): asyncio Protocols on uvloop,
messages relayed as DATA bytes, never deserialised.

Why not grpc.aio: as a passthrough it spends ~600 µs of C-core and Cython per proxied call;
relaying frames between two Protocols inside their callbacks costs a fraction of that.  The
interface is GrpcListener's, so the listener manager can build either.

Reflection and health, which the gateway answers itself, keep their grpc.aio servicers: the
listener relays those methods to an in-process grpc.aio server on a loopback port that is
started the first time one is asked for.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from sidecar.dataplane import Dataplane
from sidecar.filters import reflection
from sidecar.h2 import frames as F
from sidecar.h2 import grpcwire as W
from sidecar.h2.connection import H2Connection, IgnoreStream, Stream
from sidecar.h2.serving import Serving
from sidecar.listeners.grpc_h2_call import Exchange
from sidecar.upstream import h2_pool
from sidecar.upstream.grpc_pool import GrpcPool

log = logging.getLogger("protomesh.sidecar")
_HEAD_CACHE = 1024


class _Downstream(H2Connection):
    """The server role towards one client connection."""

    def __init__(self, lst: "GrpcH2Listener"):
        super().__init__(client=False)
        self.lst = lst
        self.peer = ""

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        self.lst.connection_opened(self)
        super().connection_made(transport)

    def on_request(self, st: Stream, headers, end_stream: bool) -> None:
        lst = self.lst
        head = lst._heads.get(headers)
        if head is None:
            try:
                head = W.parse_request(headers)
            except W.BadRequest as exc:
                log.info("listener %s: bad gRPC request from %s: %s", lst.name, self.peer, exc)
                self.reset(st, F.PROTOCOL_ERROR)
                return
            if len(lst._heads) >= _HEAD_CACHE:
                lst._heads.clear()
            lst._heads[headers] = head
        spec = lst.dataplane.config.listeners.get(lst.name)
        if spec is not None and spec.descriptor_set and reflection.is_local(head.path):
            st.handler = _LocalRelay(lst, self, st, headers, end_stream)
            return
        ex = Exchange(lst, self, st, head, spec.grpc_kinds.get(head.path) if spec is not None else None)
        st.handler = ex
        ex.start(end_stream)

    def on_headers_too_large(self, st: Stream, why: str) -> None:
        st.handler = IgnoreStream  # answered: drop what still arrives
        self.send_headers(st, W.trailers_only(8, why, "headers_too_large"), True)
        if not st.closed and not st.remote_closed:
            self.reset(st, F.NO_ERROR)

    def on_closed(self) -> None:
        self.lst.connection_closed(self)


class GrpcH2Listener(Serving):
    def __init__(self, name: str, dataplane: Dataplane, pool: GrpcPool, h2pool: h2_pool.H2Pool):
        super().__init__()
        self.name = name
        self.dataplane = dataplane
        self.pool = pool  # grpc.aio channels: used for mirrored copies only
        self.h2pool = h2pool  # the sidecar's, retained and closed with its config
        self.port = 0
        self.inflight = 0
        self._heads: dict = {}
        self._local: grpc.aio.Server | None = None
        self._local_addr: asyncio.Future | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Downstream(self), host, port,
                                                reuse_port=reuse_port or None, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, GOAWAY to every client, let calls in flight finish for up to
        `timeout_s`, then close what is left (`Serving.drain_connections`)."""
        await self.drain_connections(timeout_s)
        if self._local is not None:
            await self._local.stop(None)
            self._local = None

    async def close(self) -> None:
        await self.drain(0)

    # ---- reflection and health ------------------------------------------------------------------
    def local_address(self) -> asyncio.Future:
        if self._local_addr is None:
            self._local_addr = asyncio.ensure_future(self._start_local())
        return self._local_addr

    async def _start_local(self) -> str:
        lst = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                spec = lst.dataplane.config.listeners.get(lst.name)
                if spec is None or not spec.descriptor_set:
                    return None
                return reflection.handler(details.method, lst.dataplane, lst.name, spec.descriptor_set)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._local = server
        return f"127.0.0.1:{port}"


class _LocalRelay:
    """Relays one reflection/health stream to the in-process grpc.aio server, unchanged (no
    routing, no dataplane: the gateway answers these itself, as the grpc.aio engine does)."""

    def __init__(self, lst: GrpcH2Listener, dc: _Downstream, down: Stream, headers, end: bool):
        self.lst, self.dc, self.down = lst, dc, down
        self.headers = [(n, v) for n, v in headers if n not in W.HOP or n == b"grpc-timeout"]
        self.headers.append((b"te", b"trailers"))
        self.body: list[tuple[bytes, bool]] = []
        self.req_end = end
        self.uc = self.up = None
        self.done = False
        asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        try:
            address = await self.lst.local_address()
            conn = await self.lst.h2pool.connect(address, 5.0)
        except Exception as exc:  # the local server could not start: say so, not a traceback
            self._fail(14, f"local service unavailable: {exc}")
            return
        if self.done:
            return
        self.uc, self.up = conn, conn.open_stream(self)
        conn.send_headers(self.up, self.headers, end_stream=self.req_end and not self.body)
        for data, end in self.body:
            n = conn.send_data(self.up, data, end)
            if n:
                self.dc.consume(self.down, n)
        self.body = []

    def _fail(self, code: int, message: str) -> None:
        if not self.done:
            self.done = True
            self.dc.send_headers(self.down, W.trailers_only(code, message), True)

    def on_headers(self, st, fields, end) -> None:
        if st is self.down:
            self.on_data(st, b"", True)
        elif not self.done:
            self.dc.send_headers(self.down, [(n, v) for n, v in fields if n not in W.RESPONSE_HOP], end)
            if end:
                self.done = True

    def on_data(self, st, data, end) -> None:
        if st is self.down:
            if self.up is None:
                self.req_end = self.req_end or end
                self.body.append((data, end))
            else:
                n = self.uc.send_data(self.up, data, end)
                if n:
                    self.dc.consume(st, n)
        else:
            n = self.dc.send_data(self.down, data, False)
            if n:
                self.uc.consume(st, n)

    def on_sent(self, st, n) -> None:
        if st is self.down:
            if self.uc is not None:
                self.uc.consume(self.up, n)
        else:
            self.dc.consume(self.down, n)

    def on_reset(self, st, code) -> None:
        if st is self.down:
            self.done = True
            if self.up is not None:
                self.uc.reset(self.up, F.CANCEL)
        elif not self.done:
            self.done = True
            self.dc.reset(self.down, F.CANCEL if code == F.CANCEL else F.INTERNAL_ERROR)
