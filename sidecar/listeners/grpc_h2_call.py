"""One proxied gRPC call on the h2 engine: downstream stream ⇄ upstream stream, driven by the
frames that arrive on either side (no task per call).

The Dataplane contract is the one every listener follows: `begin` → `route` (a `Target`, a
local `Reply`, or a fault `Hold`) → `upstream_headers` when forwarding → `finish` exactly once.
Messages are relayed as DATA without looking inside them; only heads and trailers are read.

Retries (unary and server-streaming methods only, as on the grpc.aio engine: their request is
one message, buffered up to RETRY_BUFFER) need the response head held back until the first
response message, so an attempt that fails before answering anything can be replayed.
"""
from __future__ import annotations

import asyncio
import time

from sidecar.call import REASON_HEADER, Call, Reply
from sidecar.dataplane import Target
from sidecar.filters import mirror
from sidecar.filters.fault import Hold
from sidecar.h2 import frames as F
from sidecar.h2 import grpcwire as W
from sidecar.h2.connection import LOST, Stream
from sidecar.upstream import retry

RETRY_BUFFER = 64 << 10
_REASON = REASON_HEADER.encode()
_RETRY_KINDS = ("unary", "server_stream")


class Exchange:
    __slots__ = ("lst", "dc", "down", "head", "kind", "call", "target", "uc", "up", "timer",
                 "deadline", "mesh_timeout", "per_try", "attempts", "tried", "retrying", "done",
                 "relayed", "resp_head", "body", "req_buf", "req_size", "req_done", "up_headers",
                 "connecting", "trace", "bytes_in", "bytes_out")

    def __init__(self, lst, dc, down: Stream, head: W.Head, kind: str | None):
        self.lst = lst  # the GrpcH2Listener
        self.dc = dc  # downstream connection
        self.down = down
        self.head = head
        self.kind = kind
        self.call: Call | None = None
        self.target: Target | None = None
        self.uc = None  # upstream connection of the current attempt
        self.up: Stream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.mesh_timeout = True
        self.per_try = False
        self.attempts = 1
        self.tried: set | None = None
        self.retrying = False
        self.done = False
        self.relayed = False  # a response head went downstream: no retry any more
        self.resp_head: list | None = None  # held back while a retry is still possible
        self.body: list[bytes] | None = None  # request DATA not yet sent upstream
        self.req_buf: list[bytes] | None = None  # the whole request, for replays
        self.req_size = 0
        self.req_done = False
        self.up_headers: list | None = None
        self.connecting = 0  # attempt number whose connect is in progress
        self.trace: list = []
        self.bytes_in = 0  # request DATA octets from the caller (gRPC framing included)
        self.bytes_out = 0  # response DATA octets relayed to the caller

    # ---- start ----------------------------------------------------------------------------------
    def start(self, end_stream: bool) -> None:
        head = self.head
        self.req_done = end_stream
        deadline = None if head.timeout_s is None else time.monotonic() + head.timeout_s
        call = self.call = Call("grpc", "POST", head.authority, head.path, dict(head.headers),
                                self.dc.peer, self.lst.name, deadline=deadline)
        self.lst.inflight += 1
        self.lst.dataplane.begin(call)
        self._route()

    def _route(self) -> None:
        self.timer = None
        if self.done:
            return
        dp = self.lst.dataplane
        call = self.call
        result = dp.route(call)
        if isinstance(result, Hold):  # fault delay: hold, then route again
            self.timer = self.dc.loop.call_later(result.delay_s, self._route)
            return
        if isinstance(result, Reply):
            self._reply(result.grpc_status, f"{result.reason}: {result.message}",
                        result.reason_value(call), result.status, result.reason, result.headers)
            return
        target = self.target = result
        timeout, now = target.timeout_s, time.monotonic()
        if call.deadline is not None:
            remaining = call.deadline - now
            if timeout is None or remaining < timeout:
                timeout, self.mesh_timeout = remaining, False
        self.deadline = None if timeout is None else now + timeout
        self.trace = [(k.encode(), v.encode()) for k, v in dp.upstream_headers(call)]
        if target.route.retry is not None and self.kind in _RETRY_KINDS:
            self.req_buf = [] if self.body is None else list(self.body)
            self.req_size = sum(map(len, self.req_buf))
        if target.route.mirrors and self.kind in _RETRY_KINDS:
            self.req_buf = self.req_buf if self.req_buf is not None else ([] if self.body is None else list(self.body))
            if self.req_done:  # the request ended while a fault delay held it
                self._mirror()
        self._attempt()

    # ---- one attempt ----------------------------------------------------------------------------
    def _attempt(self) -> None:
        target = self.target
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        timeout, self.per_try = retry.attempt_timeout(target.route.retry, remaining)
        if timeout is not None:
            self.timer = self.dc.loop.call_later(timeout, self._on_timeout)
        head = self.head
        hdrs = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", target.path.encode("latin-1", "replace")),
                (b":authority", head.authority.encode("latin-1", "replace"))]
        hdrs.extend(head.forward)
        hdrs.append((b"te", b"trailers"))
        if timeout is not None:
            hdrs.append((b"grpc-timeout", W.format_timeout(timeout)))
        hdrs.extend(self.trace)
        self.up_headers = hdrs
        address = target.endpoint.address
        conn = self.lst.h2pool.ready(address)
        if conn is not None:
            self._open_on(conn)
            return
        self.connecting = self.attempts
        fut = asyncio.ensure_future(self.lst.h2pool.connect(address, target.cluster.connect_timeout_s))
        fut.add_done_callback(self._connected)

    def _connected(self, fut: asyncio.Future) -> None:
        attempt, self.connecting = self.connecting, 0
        if fut.cancelled():
            return
        exc = fut.exception()
        if self.done or attempt != self.attempts or self.up is not None:
            return
        if exc is not None:
            why = (f"connect timeout after {self.target.cluster.connect_timeout_s:g}s"
                   if isinstance(exc, asyncio.TimeoutError) else f"connect failed: {exc}")
            self._upstream_failed(retry.CONNECT_FAILURE, 14, why)
            return
        self._open_on(fut.result())

    def _open_on(self, conn) -> None:
        self.uc = conn
        up = self.up = conn.open_stream(self)
        replay = self.attempts > 1
        chunks = self.req_buf if replay else self.body
        self.body = None
        if not chunks:
            conn.send_headers(up, self.up_headers, end_stream=self.req_done)
            return
        conn.send_headers(up, self.up_headers)
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            n = conn.send_data(up, chunk, self.req_done and i == last)
            if n and not replay:
                self.dc.consume(self.down, n)

    # ---- stream handler: both sides -------------------------------------------------------------
    def on_headers(self, st: Stream, fields, end_stream: bool) -> None:
        if st is self.down:  # request trailers (gRPC clients send none): end of request
            self.on_data(st, b"", True)
            return
        if self.done or st is not self.up:
            return
        if self.resp_head is None and not self.relayed:
            status, out = W.response_head(fields)
            if end_stream:  # trailers-only
                self._upstream_trailers(fields, status)
                return
            if status != 200:
                self.uc.reset(st, F.CANCEL)
                self.up = None
                self._end_with(W.status_of_http(status), f"upstream answered HTTP {status}", retry.GRPC_STATUS)
                return
            self.resp_head = out
            if self.req_buf is None or self.target.route.retry is None:
                self._relay_head()
            return
        self._upstream_trailers(fields, 200)

    def on_data(self, st: Stream, data: bytes, end_stream: bool) -> None:
        if st is self.down:
            self.bytes_in += len(data)
            if end_stream:
                self.req_done = True
            if self.done:
                self.dc.consume(st, len(data))
                return
            if self.req_buf is not None:
                self.req_size += len(data)
                if self.req_size > RETRY_BUFFER:
                    self.req_buf = None  # too large to replay: no retry, no mirror
                elif data:
                    self.req_buf.append(data)
            if self.up is not None:
                n = self.uc.send_data(self.up, data, end_stream)
                if n:
                    self.dc.consume(st, n)
            else:
                if data:
                    if self.body is None:
                        self.body = []
                    self.body.append(data)
            if end_stream and self.req_buf is not None and self.target is not None and self.target.route.mirrors:
                self._mirror()
            return
        if st is not self.up or self.done:
            return
        if not self.relayed:
            self._relay_head()
        self.bytes_out += len(data)
        n = self.dc.send_data(self.down, data)
        if n:
            self.uc.consume(st, n)

    def on_sent(self, st: Stream, n: int) -> None:
        """Queued octets left (or were dropped): the side they came from gets its window back,
        the connection's at least, even when its stream is gone already."""
        if st is self.down:
            if self.uc is not None:
                self.uc.consume(self.up, n)
        elif self.attempts == 1:
            self.dc.consume(self.down, n)

    def on_reset(self, st: Stream, code: int) -> None:
        if st is self.down:
            self.req_done = True
            if self.done:
                return
            self._cancel_timer()
            if self.up is not None:
                self.uc.reset(self.up, F.CANCEL)
                self.up = None
            if self.call is None:  # still being set up (never routed)
                self.done = True
                return
            self._settle()
            self._finish(499, "downstream_cancelled", 1)
            return
        if st is not self.up or self.done:
            return
        self.up = None
        if code in (LOST, F.REFUSED_STREAM):
            kind, grpc_code = (retry.CONNECT_FAILURE if code == F.REFUSED_STREAM else retry.RESET), 14
            why = "upstream refused the stream" if code == F.REFUSED_STREAM else "upstream connection lost"
        else:
            kind, grpc_code = retry.RESET, W.status_of_reset(code)
            why = f"upstream reset the stream ({F.ERROR_NAMES.get(code, code)})"
        self._upstream_failed(kind, grpc_code, why)

    # ---- endings --------------------------------------------------------------------------------
    def _relay_head(self) -> None:
        self.relayed = True
        self._settle()
        head, self.resp_head = self.resp_head, None
        if head is not None:
            self.dc.send_headers(self.down, head)

    def _upstream_trailers(self, fields, status: int) -> None:
        self._cancel_timer()
        self.up = None
        code, message = W.status_in(fields)
        if code is None:
            code = 2 if status == 200 else W.status_of_http(status)
        if code == 4 and not self.relayed and self.deadline is not None and (self.per_try or self.mesh_timeout):
            # The upstream enforced the grpc-timeout we sent (it may beat our own timer): that
            # is our timeout, per-try or route, and is treated as such.
            self._timed_out()
            return
        if not self.relayed and code != 0 and self._retry(None, code):
            return
        self._settle()
        self.lst.dataplane.report(self.target, W.HTTP_OF_GRPC.get(code, 200))
        if not self.relayed and self.resp_head is None:  # trailers-only: relay as it came
            out = [(n, v) for n, v in fields if n not in W.RESPONSE_HOP]
            if status != 200 or not any(n == b"grpc-status" for n, _ in out):
                out = W.trailers_only(code, message or f"upstream answered HTTP {status} without grpc-status")
        else:
            if not self.relayed:
                self._relay_head()
            out = [(n, v) for n, v in fields if n not in W.RESPONSE_HOP and n[:1] != b":"]
            if not any(n == b"grpc-status" for n, _ in out):
                out = W.trailers(code, message or "upstream trailers without grpc-status")
        self.dc.send_headers(self.down, out, True)
        self._finish(200, "", code)
        self._close_down()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.up is not None:
            self.uc.reset(self.up, F.CANCEL)
            self.up = None
        self._timed_out()

    def _timed_out(self) -> None:
        self._cancel_timer()
        self.connecting = 0
        if self.relayed:
            self.lst.dataplane.report(self.target, 504)
        elif self._retry(retry.PER_TRY_TIMEOUT if self.per_try else None, 4):  # reports it too
            return
        self._settle()
        reason = "upstream_timeout" if (self.mesh_timeout or self.per_try) else ""
        self._error(4, "deadline exceeded", reason)

    def _upstream_failed(self, kind: str, code: int, why: str) -> None:
        """An attempt ended without a status from the upstream (connect failure, reset)."""
        self._cancel_timer()
        if not self.relayed and self._retry(kind, code):
            return
        self._settle()
        reason = ""
        if code == 14 and not self.relayed:
            reason = "upstream_unavailable"
            if self.call.extra.get("retry_note") == "retry_budget_exhausted":
                reason = "retry_budget_exhausted"
        self._error(code, why, reason)

    def _end_with(self, code: int, why: str, kind) -> None:
        self._cancel_timer()
        if not self._retry(kind, code):
            self._settle()
            self._error(code, why, "")

    def _error(self, code: int, why: str, reason: str) -> None:
        call, target = self.call, self.target
        message = why
        if reason:
            message = f"{reason}: cluster {target.cluster.name} endpoint {call.upstream}: {why}"
        reason_value = f"{reason} route={call.route_name}" if reason else None
        self._reply(code, message, reason_value, 503 if reason else 200, reason, (), target)

    def _reply(self, code: int, message: str, reason_value: str | None, status: int, reason: str,
               extra=(), target: Target | None = None) -> None:
        if self.relayed:
            out = W.trailers(code, message, reason_value)
        else:
            out = W.trailers_only(code, message, reason_value, extra)
        self.dc.send_headers(self.down, out, True)
        self._finish(status, reason, code, target)
        self._close_down()

    def _finish(self, status: int, reason: str, grpc_status: int, target: Target | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        self.lst.inflight -= 1
        self.lst.dataplane.finish(self.call, target or self.target, status, reason, grpc_status=grpc_status,
                                  bytes_in=self.bytes_in, bytes_out=self.bytes_out)

    def _close_down(self) -> None:
        """The response is complete; a request still streaming in is stopped (RST NO_ERROR)."""
        down = self.down
        if down.local_closed and not down.remote_closed and not down.closed:
            self.dc.reset(down, F.NO_ERROR)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _settle(self) -> None:
        if self.retrying:
            self.retrying = False
            self.lst.dataplane.retry_done(self.target)

    # ---- retries and mirrors --------------------------------------------------------------------
    def _retry(self, kind: str | None, code: int) -> bool:
        """After an attempt that relayed nothing: report it, and start another if the route's
        policy, the retry budget and the deadline allow (as the grpc.aio engine decides)."""
        dp = self.lst.dataplane
        target = self.target
        local = kind in (retry.CONNECT_FAILURE, retry.RESET) and code == 14
        dp.report(target, 503 if local else W.HTTP_OF_GRPC.get(code, 200))
        self._settle()
        policy = target.route.retry
        if policy is None or self.req_buf is None or not self.req_done or self.relayed:
            return False
        call = self.call
        if not dp.may_retry_grpc(call, target, kind, code, self.attempts):
            return False
        self.retrying = True
        delay = retry.backoff_before(policy, self.attempts - 1, dp.rand, self.deadline, time.monotonic())
        if delay is None:
            self._settle()
            return False
        if self.tried is None:
            self.tried = set()
        self.tried.add(target.endpoint.address)
        result = dp.retarget(call, target, self.tried)
        if isinstance(result, Reply):
            self._settle()
            self.target = None  # retarget released the endpoint already
            self._reply(result.grpc_status, f"{result.reason}: {result.message}", result.reason_value(call),
                        result.status, result.reason, result.headers)
            return True
        self.target = result
        self.attempts += 1
        call.extra["attempts"] = self.attempts
        dp.stats.inc("retries", (("cluster", target.cluster.name),))
        self.up = None
        self.resp_head = None
        self.timer = self.dc.loop.call_later(delay, self._next_attempt)
        return True

    def _next_attempt(self) -> None:
        self.timer = None
        if not self.done:
            self._attempt()

    def _mirror(self) -> None:
        """Shadow copies of a one-message request (sent by the grpc.aio pool, answers dropped)."""
        data = b"".join(self.req_buf)
        if len(data) < 5 or int.from_bytes(data[1:5], "big") != len(data) - 5 or data[0]:
            return  # not exactly one uncompressed message
        metadata = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in self.head.forward
                         if n not in (b"content-type", b"user-agent", b"grpc-encoding", b"grpc-accept-encoding"))
        metadata += tuple((n.decode(), v.decode()) for n, v in self.trace)
        shape = "unary_unary" if self.kind == "unary" else "unary_stream"
        mirror.send_grpc(self.lst.dataplane, self.lst.pool, self.call, self.target, shape, data[5:], metadata)
