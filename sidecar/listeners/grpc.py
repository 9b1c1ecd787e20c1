"""gRPC proxy listener: grpc.aio generic handler forwarding raw message bytes.

Messages are never deserialised: request and response serializers are None, so grpcio hands us
the framed payload as bytes and we hand the same bytes upstream.  All four call kinds travel as
stream-stream on the wire, which is what HTTP/2 carries anyway; initial metadata, trailing
metadata, status code and details of the upstream are relayed as they are.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from sidecar.call import REASON_HEADER, Call, Reply
from sidecar.dataplane import Dataplane, Target
from sidecar.upstream.grpc_pool import GrpcPool

# Metadata grpcio manages itself or that belongs to one hop only; never forwarded.
_HOP_KEYS = frozenset({"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding",
                       "grpc-accept-encoding", "grpc-message", "grpc-status", "host", ":authority",
                       "traceparent", "tracestate", "baggage"})
_NO_DEADLINE = 1e9  # time_remaining() above this means "no deadline" (grpcio reports ~9e18)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, listener: "GrpcListener"):
        self._listener = listener

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        lst = self._listener

        async def handle(request_iterator, context):
            async for message in lst.proxy(method, request_iterator, context):
                yield message

        return grpc.stream_stream_rpc_method_handler(handle)


class GrpcListener:
    def __init__(self, name: str, dataplane: Dataplane, pool: GrpcPool):
        self.name = name
        self.dataplane = dataplane
        self.pool = pool
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.inflight = 0

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self._server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ])
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"listener {self.name}: cannot bind {host}:{port}")
        await self._server.start()

    async def drain(self, timeout_s: float) -> None:
        """GOAWAY to clients, let calls in flight finish for up to `timeout_s`, then cancel."""
        if self._server is not None:
            await self._server.stop(grace=timeout_s)
            self._server = None

    async def close(self) -> None:
        await self.drain(0)

    async def proxy(self, method: str, request_iterator, context: grpc.aio.ServicerContext):
        metadata = context.invocation_metadata() or ()
        headers: dict[str, str] = {}
        forward: list[tuple[str, str | bytes]] = []
        for key, value in metadata:
            if key.startswith(":"):
                continue
            if isinstance(value, str):
                headers[key] = value if key not in headers else headers[key] + "," + value
            if key not in _HOP_KEYS:
                forward.append((key, value))
        headers.setdefault("content-type", "application/grpc")
        remaining = context.time_remaining()
        has_deadline = remaining is not None and remaining < _NO_DEADLINE
        dp = self.dataplane
        call = Call("grpc", "POST", headers.get(":authority", headers.get("host", "")), method, headers,
                    context.peer(), self.name,
                    deadline=(time.monotonic() + remaining) if has_deadline else None)
        dp.begin(call)
        result = dp.route(call)
        if isinstance(result, Reply):
            await self._local_reply(context, call, None, result)
            return
        target: Target = result
        timeout = target.timeout_s
        if has_deadline and (timeout is None or remaining < timeout):
            timeout = remaining
        forward.extend(dp.upstream_headers(call))
        channel = self.pool.channel(target.endpoint.address)
        upstream = channel.stream_stream(target.path)(
            request_iterator, timeout=timeout, metadata=tuple(forward))
        sent = 0
        self.inflight += 1
        try:
            initial = await upstream.initial_metadata()
            if initial:
                await context.send_initial_metadata(tuple(initial))
            async for message in upstream:
                sent += 1
                yield message
            code = await upstream.code()
            trailing = await upstream.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            details = await upstream.details()
            if code != grpc.StatusCode.OK:
                context.set_code(code)
                if details:
                    context.set_details(details)
            dp.finish(call, target, 200, "", grpc_status=code.value[0])
        except grpc.aio.AioRpcError as err:
            await self._upstream_error(context, call, target, err, timeout, remaining, has_deadline)
        except asyncio.CancelledError:
            upstream.cancel()
            dp.finish(call, target, 499, "downstream_cancelled", grpc_status=grpc.StatusCode.CANCELLED.value[0])
            raise
        finally:
            self.inflight -= 1

    async def _upstream_error(self, context, call: Call, target: Target, err: grpc.aio.AioRpcError,
                              timeout, remaining, has_deadline) -> None:
        """Relay an upstream failure; name our own part in it when the mesh caused it."""
        code = err.code()
        reason = ""
        if code == grpc.StatusCode.UNAVAILABLE and not err.initial_metadata():
            reason = "upstream_unavailable"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None and \
                not (has_deadline and remaining <= timeout):
            reason = "upstream_timeout"
        trailing = tuple(err.trailing_metadata() or ())
        details = err.details() or ""
        if any(k == REASON_HEADER for k, _ in trailing):
            reason = ""  # a peer sidecar's local reply: it already says why; relay it unchanged
        if reason:
            trailing += ((REASON_HEADER, f"{reason} route={call.route_name}"),)
            details = f"{reason}: cluster {target.cluster.name} endpoint {call.upstream}: {details}"
        if trailing:
            context.set_trailing_metadata(trailing)
        context.set_code(code)
        context.set_details(details)
        self.dataplane.finish(call, target, 503 if reason else 200, reason, grpc_status=code.value[0])

    async def _local_reply(self, context, call: Call, target: Target | None, reply: Reply) -> None:
        context.set_trailing_metadata(((REASON_HEADER, reply.reason_value(call)),))
        context.set_code(_CODES[reply.grpc_status])
        context.set_details(f"{reply.reason}: {reply.message}")
        self.dataplane.finish(call, target, reply.status, reply.reason, grpc_status=reply.grpc_status)


_CODES = {c.value[0]: c for c in grpc.StatusCode}
