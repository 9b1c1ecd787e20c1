"""gRPC proxy listener: grpc.aio generic handler forwarding raw message bytes.

Messages are never deserialised: request and response serializers are None, so grpcio hands us
the framed payload as bytes and we hand the same bytes upstream.  The method's kind (from the
services' protos, pushed with the listener) picks grpcio's handler shape; an unknown method is
proxied as a bidi stream, which carries any kind on the wire.  Initial metadata, trailing
metadata, status code and details of the upstream are relayed as they are.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from sidecar.call import REASON_HEADER, Call, Reply
from sidecar.dataplane import Dataplane, Target
from sidecar.filters import reflection
from sidecar.filters import mirror
from sidecar.filters.fault import Hold
from sidecar.h2.grpcwire import HTTP_OF_GRPC
from sidecar.upstream import retry
from sidecar.upstream.grpc_pool import GrpcPool

# Metadata grpcio manages itself or that belongs to one hop only; never forwarded.
_HOP_KEYS = frozenset({"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding",
                       "grpc-accept-encoding", "grpc-message", "grpc-status", "host", ":authority",
                       "traceparent", "tracestate", "baggage"})
_NO_DEADLINE = 1e9  # time_remaining() above this means "no deadline" (grpcio reports ~9e18)


class _Handler(grpc.GenericRpcHandler):
    """Picks grpcio's handler shape from the method's kind (pushed with the listener config):
    unary methods take grpcio's unary path, which costs far less per call than a stream."""

    def __init__(self, listener: "GrpcListener"):
        self._listener = listener

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        lst = self._listener
        spec = lst.dataplane.config.listeners.get(lst.name)
        if spec is not None and spec.descriptor_set and reflection.is_local(method):
            local = reflection.handler(method, lst.dataplane, lst.name, spec.descriptor_set)
            if local is not None:  # the gateway answers reflection and health itself
                return local
        kind = spec.grpc_kinds.get(method, "bidi_stream") if spec is not None else "bidi_stream"
        if kind == "unary":
            async def unary(request, context):
                return await lst.forward_unary(method, "unary_unary", request, context)
            return grpc.unary_unary_rpc_method_handler(unary)
        if kind == "client_stream":
            async def client_stream(request_iterator, context):
                return await lst.forward_unary(method, "stream_unary", request_iterator, context)
            return grpc.stream_unary_rpc_method_handler(client_stream)
        shape = "unary_stream" if kind == "server_stream" else "stream_stream"

        async def streaming(request, context):
            async for message in lst.forward_stream(method, shape, request, context):
                yield message
        if shape == "unary_stream":
            return grpc.unary_stream_rpc_method_handler(streaming)
        return grpc.stream_stream_rpc_method_handler(streaming)


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

    async def _open(self, method: str, shape: str, request, context):
        """Route the call and start the upstream call; None when a local reply was given."""
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
        while isinstance(result, Hold):  # fault delay (issue 4): hold, then route again
            try:
                await asyncio.sleep(result.delay_s)
            except asyncio.CancelledError:
                dp.finish(call, None, 499, "downstream_cancelled", grpc_status=1)
                raise
            result = dp.route(call)
            remaining = context.time_remaining()
            has_deadline = remaining is not None and remaining < _NO_DEADLINE
        if isinstance(result, Reply):
            self._local_reply(context, call, None, result)
            return None
        target: Target = result
        timeout = target.timeout_s
        mesh_timeout = True
        if has_deadline and (timeout is None or remaining < timeout):
            timeout, mesh_timeout = remaining, False
        forward.extend(dp.upstream_headers(call))
        ex = _Exchange(call, target, None, mesh_timeout)
        ex.forward = tuple(forward)
        ex.deadline = None if timeout is None else time.monotonic() + timeout
        self._attempt(ex, shape, request)
        if target.route.mirrors:
            mirror.send_grpc(dp, self.pool, call, target, shape, request, ex.forward)
        return ex

    def _attempt(self, ex: "_Exchange", shape: str, request) -> None:
        """Start one upstream attempt.  grpcio turns `timeout` into the `grpc-timeout` header, so
        the deadline the next hop sees is what is left of ours (or the per-try timeout)."""
        remaining = None if ex.deadline is None else max(ex.deadline - time.monotonic(), 0.001)
        timeout, ex.per_try = retry.attempt_timeout(ex.target.route.retry, remaining)
        channel = self.pool.channel(ex.target.endpoint.address)
        ex.upstream = getattr(channel, shape)(ex.target.path)(request, timeout=timeout, metadata=ex.forward)

    async def _retry(self, ex: "_Exchange", err: grpc.aio.AioRpcError, shape: str, request) -> bool:
        """After a failed attempt that relayed nothing: report it, and start another attempt if
        the route's retry policy, the retry budget and the deadline allow."""
        code = err.code().value[0]
        local = code == 14 and not err.initial_metadata()
        per_try_expired = code == 4 and ex.per_try
        dp = self.dataplane
        target = ex.target
        dp.report(target, 503 if local else HTTP_OF_GRPC.get(code, 200))
        if ex.retrying:
            ex.retrying = False
            dp.retry_done(target)
        policy = target.route.retry
        if policy is None or shape not in ("unary_unary", "unary_stream"):
            return False
        kind = retry.PER_TRY_TIMEOUT if per_try_expired else retry.CONNECT_FAILURE if local else None
        call = ex.call
        if not dp.may_retry_grpc(call, target, kind, code, ex.attempts):
            return False
        ex.retrying = True
        delay = retry.backoff_before(policy, ex.attempts - 1, dp.rand, ex.deadline, time.monotonic())
        if delay is None:
            return False
        await asyncio.sleep(delay)
        if ex.tried is None:
            ex.tried = set()
        ex.tried.add(target.endpoint.address)
        result = dp.retarget(call, target, ex.tried)
        if isinstance(result, Reply):
            return False
        ex.target = result
        ex.attempts += 1
        call.extra["attempts"] = ex.attempts
        dp.stats.inc("retries", (("cluster", target.cluster.name),))
        self._attempt(ex, shape, request)
        return True

    def _settled(self, ex: "_Exchange") -> None:
        if ex.retrying:
            ex.retrying = False
            self.dataplane.retry_done(ex.target)

    async def forward_unary(self, method: str, shape: str, request, context):
        """unary_unary and stream_unary: one response message."""
        ex = await self._open(method, shape, request, context)
        if ex is None:
            return None
        self.inflight += 1
        try:
            while True:
                try:
                    response = await ex.upstream
                    break
                except grpc.aio.AioRpcError as err:
                    if await self._retry(ex, err, shape, request):
                        continue
                    self._settled(ex)
                    self._upstream_error(context, ex, err)
                    return None
            self._settled(ex)
            initial = await ex.upstream.initial_metadata()
            if initial:
                await context.send_initial_metadata(tuple(initial))
            await self._relay_status(context, ex)
            return response
        except grpc.aio.AioRpcError as err:
            self._upstream_error(context, ex, err)
            return None
        except asyncio.CancelledError:
            self._settled(ex)
            self._cancelled(ex)
            raise
        finally:
            self.inflight -= 1

    async def forward_stream(self, method: str, shape: str, request, context):
        """unary_stream and stream_stream: relay response messages as they come.  Initial
        metadata goes out with the first message, so an attempt that fails before any message
        can still be retried (unary_stream only: a request stream cannot be replayed)."""
        ex = await self._open(method, shape, request, context)
        if ex is None:
            return
        self.inflight += 1
        relayed = False
        try:
            while True:
                try:
                    async for message in ex.upstream:
                        if not relayed:
                            relayed = True
                            self._settled(ex)
                            initial = await ex.upstream.initial_metadata()
                            if initial:
                                await context.send_initial_metadata(tuple(initial))
                        yield message
                    break
                except grpc.aio.AioRpcError as err:
                    if not relayed and await self._retry(ex, err, shape, request):
                        continue
                    self._settled(ex)
                    self._upstream_error(context, ex, err)
                    return
            self._settled(ex)
            if not relayed:
                initial = await ex.upstream.initial_metadata()
                if initial:
                    await context.send_initial_metadata(tuple(initial))
            await self._relay_status(context, ex)
        except grpc.aio.AioRpcError as err:
            self._upstream_error(context, ex, err)
        except asyncio.CancelledError:
            self._settled(ex)
            self._cancelled(ex)
            raise
        finally:
            self.inflight -= 1

    async def _relay_status(self, context, ex: "_Exchange") -> None:
        code = await ex.upstream.code()
        trailing = await ex.upstream.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        if code != grpc.StatusCode.OK:
            context.set_code(code)
            details = await ex.upstream.details()
            if details:
                context.set_details(details)
        self.dataplane.report(ex.target, HTTP_OF_GRPC.get(code.value[0], 200))
        self.dataplane.finish(ex.call, ex.target, 200, "", grpc_status=code.value[0])

    def _cancelled(self, ex: "_Exchange") -> None:
        ex.upstream.cancel()
        self.dataplane.finish(ex.call, ex.target, 499, "downstream_cancelled",
                              grpc_status=grpc.StatusCode.CANCELLED.value[0])

    def _upstream_error(self, context, ex: "_Exchange", err: grpc.aio.AioRpcError) -> None:
        """Relay an upstream failure; name our own part in it when the mesh caused it."""
        call, target = ex.call, ex.target
        code = err.code()
        reason = ""
        if code == grpc.StatusCode.UNAVAILABLE and not err.initial_metadata():
            reason = "upstream_unavailable"
            if call.extra.get("retry_note") == "retry_budget_exhausted":
                reason = "retry_budget_exhausted"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and (ex.mesh_timeout or ex.per_try):
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

    def _local_reply(self, context, call: Call, target: Target | None, reply: Reply) -> None:
        context.set_trailing_metadata(((REASON_HEADER, reply.reason_value(call)),))
        context.set_code(_CODES[reply.grpc_status])
        context.set_details(f"{reply.reason}: {reply.message}")
        self.dataplane.finish(call, target, reply.status, reply.reason, grpc_status=reply.grpc_status)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Exchange:
    """One proxied call in flight: what was chosen for it and the upstream call object."""

    __slots__ = ("call", "target", "upstream", "mesh_timeout", "forward", "deadline", "per_try",
                 "attempts", "tried", "retrying")

    def __init__(self, call: Call, target: Target, upstream, mesh_timeout: bool):
        self.call = call
        self.target = target
        self.upstream = upstream
        self.mesh_timeout = mesh_timeout  # the route's timeout, not the caller's deadline, bounds it
        self.forward: tuple = ()  # metadata sent upstream on every attempt
        self.deadline: float | None = None  # monotonic; the whole call, across attempts
        self.per_try = False  # this attempt's timeout is the per-try timeout
        self.attempts = 1
        self.tried: set | None = None
        self.retrying = False
