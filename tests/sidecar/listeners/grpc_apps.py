"""Raw-bytes gRPC upstreams for the gRPC listener tests (both engines)."""
from __future__ import annotations

import asyncio

import grpc

BIG = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class App:
    """A raw-bytes gRPC server.  mode: ok | unavailable | slow | midstream (server streams send
    one message, then fail UNAVAILABLE)."""

    def __init__(self, name: str = "app", mode: str = "ok"):
        self.name, self.mode = name, mode
        self.hits = 0
        self.remaining: list[float | None] = []
        self.metadata: list[dict] = []
        self.cancelled = asyncio.Event()

    async def start(self):
        self.server = grpc.aio.server(options=BIG)
        app = self
        handlers = {
            "/t.S/Unary": grpc.unary_unary_rpc_method_handler(app.unary),
            "/t.S/Server": grpc.unary_stream_rpc_method_handler(app.server_stream),
            "/t.S/Stream": grpc.unary_stream_rpc_method_handler(app.server_stream),
            "/t.S/Client": grpc.stream_unary_rpc_method_handler(app.client_stream),
            "/t.S/Bidi": grpc.stream_stream_rpc_method_handler(app.bidi),
            "/t.S/Hang": grpc.unary_stream_rpc_method_handler(app.hang),
        }

        class H(grpc.GenericRpcHandler):
            def service(self, details):
                return handlers.get(details.method)
        self.server.add_generic_rpc_handlers((H(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def _behave(self, context):
        self.hits += 1
        self.remaining.append(context.time_remaining())
        self.metadata.append(dict(context.invocation_metadata()))
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        if self.mode == "slow":
            await asyncio.sleep(3.0)

    async def unary(self, request, context):
        await self._behave(context)
        if request == b"fail":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nope: ünïcode",
                                trailing_metadata=(("why", "asked-to"),))
        await context.send_initial_metadata((("x-initial", "yes"),))
        context.set_trailing_metadata((("x-trailing", "also"), ("x-bin", b"\x00\xff")))
        if request.startswith(b"size:"):
            return b"r" * int(request[5:])
        return self.name.encode() + b":" + request

    async def server_stream(self, request, context):
        if self.mode == "midstream":
            self.hits += 1
            yield b"first"
            await context.abort(grpc.StatusCode.UNAVAILABLE, "died mid-stream")
        await self._behave(context)
        for i in range(int(request) if request.isdigit() else 3):
            yield b"%s:%d" % (self.name.encode(), i)

    async def client_stream(self, request_iterator, context):
        await self._behave(context)
        total, count = 0, 0
        async for m in request_iterator:
            total += len(m)
            count += 1
        return b"%d/%d" % (count, total)

    async def bidi(self, request_iterator, context):
        await self._behave(context)
        async for m in request_iterator:
            yield m[::-1]

    async def hang(self, request, context):
        self.hits += 1
        try:
            yield b"started"
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def stop(self):
        await self.server.stop(None)
