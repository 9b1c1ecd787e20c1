"""One request/response through the HTTP/1.1 proxy listener (`Exchange`): route it, stream the
request up, relay the response down, retry or time out, and finish exactly once.

The downstream connection (sidecar/listeners/http.py) parses requests and hands each to an
Exchange; the upstream connection (sidecar/upstream/http_pool.py) reports the response to it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from sidecar.call import GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, Call, Reply, upstream_timeout, upstream_unavailable
from sidecar.dataplane import Target
from sidecar.filters import mirror
from sidecar.filters.fault import Hold
from sidecar.listeners import grpc_bridge
from sidecar.listeners.http_wire import (CHUNK_END, CONTINUE, CRLF, HEADER_JOIN, HOP, HOP_LENS, METHODS,
                                         PLAIN_CONNECTION, PLAIN_CONNECTION_S, REQ_SKIP_S, REQ_SKIP_TRACED,
                                         connection_tokens, request_id, status_line)
from sidecar.upstream import breaker, retry
from sidecar.upstream.http_pool import CONTENT_LENGTH, NO_BODY, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.listeners.http import _Downstream as Downstream

log = logging.getLogger("protomesh.sidecar")

RETRY_BUFFER_LIMIT = 64 * 1024  # a request this small (head + body) is kept for retries
PENDING_LIMIT = 64 * 1024  # body buffered while connecting / while queued before reading pauses

# Pause bits for the downstream transport's reading.
P_PIPELINE = 1  # a later request is complete while an earlier one is in flight
P_UPSTREAM = 2  # the upstream cannot take more body yet (write buffer full, or connecting)

# Response body framing towards the client.
M_NONE = 0
M_RAW = 1
M_CHUNK = 2


class Exchange:
    """One request/response through the proxy; the upstream connection reports to it."""

    # Class-level defaults: an exchange is made per request, and assigning ~40 attributes in
    # __init__ was a measurable share of the per-request cost; only what differs is set there.
    active = False
    early: list | None = None  # body that arrived while queued behind another request
    call: Call | None = None
    target: Target | None = None
    up: UpstreamConnection | None = None
    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None
    sent_size = 0
    pending_size = 0
    pending_full = False
    up_paused = False
    retried = False
    resp_started = False
    resp_done = False
    finished = False
    status = 0
    mode = M_NONE
    close_after = False
    bytes_in = 0
    bytes_out = 0
    attempts = 1  # upstream attempts made (retries are attempts - 1)
    tried: set | None = None  # endpoints already tried, for retry_host_predicate
    retry_timer: asyncio.TimerHandle | None = None  # back-off before the next attempt
    try_timer: asyncio.TimerHandle | None = None  # per-try timeout
    retrying = False  # counted in the cluster's active retries
    pending_state = None  # ClusterState whose pending count includes this exchange
    bridge = None  # set when the gateway answers by calling gRPC itself (grpc_bridge.py)

    def __init__(self, conn: "Downstream", method_b: bytes, version: str, url: bytes,
                 raw: list, headers: dict, chunked: bool, has_body: bool,
                 keep_alive: bool, expect: bool):
        self.conn = conn
        self.method_b = method_b
        self.method = METHODS.get(method_b) or method_b.decode("latin-1")
        self.version = version
        self.url = url
        self.raw = raw
        self.headers = headers
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect = expect
        self.req_done = not has_body
        self.sent: list | None = []  # everything sent upstream, while small (for one retry)
        self.pending: list = []  # to write once an upstream connection is attached
        self.out: list = []  # response bytes collected during one upstream read, sent at once

    # ---- request side -------------------------------------------------------------------
    def activate(self) -> None:
        """Become the exchange in flight on its connection: route it and start forwarding."""
        self.active = True
        conn = self.conn
        listener = conn.listener
        dp = listener.dataplane
        call = self.call = Call("http", self.method, self.headers.get("host", ""),
                                self.url.decode("latin-1"), self.headers, conn.peer, listener.name)
        dp.begin(call)
        spec = listener.gateway_spec()
        if spec is not None:  # transcoding / gRPC-Web at the gateway (grpc_bridge.py)
            bridge = grpc_bridge.select(self, spec)
            if bridge is not None:
                self._bridge(bridge)
                return
        self._route()

    def _bridge(self, bridge) -> None:
        """Hand the exchange to a gateway bridge: it gets the (bounded) body, then runs."""
        self.bridge = bridge
        if self.expect and not self.req_done:
            self.conn.send(CONTINUE)
        early = self.early
        if early:
            self.early = None
            for data in early:
                bridge.feed(data)
        if self.req_done and not self.finished:
            bridge.start()

    def _route(self) -> None:
        conn = self.conn
        dp = conn.listener.dataplane
        call = self.call
        result = dp.route(call)
        if isinstance(result, Reply):
            self.local_reply(result)
            return
        if isinstance(result, Hold):  # fault delay: the body waits in `early`, then route again
            self.active = False
            self.timer = self.conn.loop.call_later(result.delay_s, self._held)
            return
        self.target = result
        head = self._request_head(result, dp.upstream_headers(call))
        if self.expect and not self.req_done:
            conn.send(CONTINUE)
        self._emit((head,))
        early = self.early
        if early:
            self.early = None
            for data in early:
                self._emit_body(data)
        if self.req_done:
            self._request_sent()
        if not self.finished:
            self._start_attempt()
        if result.route.mirrors and self.req_done:
            self._mirror()

    def _held(self) -> None:
        self.timer = None
        if self.finished:
            return
        self.active = True
        self._route()

    def _mirror(self) -> None:
        """Shadow copies of the complete request (issue 4); never awaited, never answered."""
        if self.sent is not None and self.attempts == 1:
            mirror.send_http(self.conn.listener.dataplane, self.call, self.target, tuple(self.sent))

    def _start_attempt(self) -> None:
        """Use an idle pooled connection, or open one (the only step that needs a task) if the
        cluster's pending and connection limits allow."""
        target = self.target
        pool = self.conn.listener.pool
        up = pool.take_idle(target.endpoint)
        if up is not None:
            self._attach(up)
            return
        dp = self.conn.listener.dataplane
        st = dp.clusters.get(target.cluster.name)
        if st is not None:
            limits = target.cluster.breaker
            limit = breaker.admit_pending(limits, st.breaker)
            if limit is None and limits.max_connections < 1 << 30:
                open_now = sum(pool.open_count(ep) for ep in dp.config.endpoints_for(target.cluster))
                limit = breaker.admit_connection(limits, open_now)
            if limit is not None:
                self.local_reply(dp._overflow(st, target.cluster.name, limit))
                return
            st.breaker.pending += 1
            self.pending_state = st
        self.task = self.conn.loop.create_task(self._connect())

    def _unpend(self) -> None:
        st = self.pending_state
        if st is not None:
            self.pending_state = None
            st.breaker.pending -= 1

    def _request_head(self, target: Target, trace_pairs: list) -> bytes:
        conn = self.conn
        headers = self.headers
        # Trace headers are re-sent from `trace_pairs` (ours, or the caller's unchanged).
        skip = REQ_SKIP_TRACED if trace_pairs else REQ_SKIP_S
        connection = headers.get("connection")
        if connection and connection.lower() not in PLAIN_CONNECTION_S:
            skip = skip.union(connection_tokens(connection))
        path = self.url if target.path is self.call.path else target.path.encode("latin-1", "replace")
        raw = self.raw
        if not skip.isdisjoint(headers):  # (header names are the dict's lower-case keys)
            raw = [h for h in raw if h[0].lower().decode("latin-1") not in skip]
        parts = [self.method_b, b" ", path, b" HTTP/1.1\r\n", b"\r\n".join(map(HEADER_JOIN, raw))]
        append = parts.append
        if raw:
            append(CRLF)
        if "host" not in headers:
            append(b"host: %s\r\n" % target.endpoint.address.encode())
        xff = headers.get("x-forwarded-for")
        append(b"x-forwarded-for: ")
        append(conn.peer_ip_b if not xff else (xff + ", " + conn.peer_ip).encode("latin-1"))
        append(b"\r\nx-forwarded-proto: http\r\n")
        if "x-request-id" not in headers:
            rid = request_id()
            headers["x-request-id"] = rid
            append(b"x-request-id: %s\r\n" % rid.encode())
        for name, value in trace_pairs:
            append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if self.chunked:
            append(b"transfer-encoding: chunked\r\n")
        append(CRLF)
        return b"".join(parts)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.resp_done or self.finished:
            return  # answered already; the rest of the body is dropped (connection closes)
        if not self.active:
            if self.early is None:
                self.early = []
            self.early.append(data)
            return
        if self.bridge is not None:
            self.bridge.feed(data)
            return
        self._emit_body(data)

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.bridge is not None:
            if self.active and not self.finished:
                self.bridge.start()
            return
        if self.active and self.target is not None and not self.finished:
            self._request_sent()
            if self.target.route.mirrors:
                self._mirror()

    def _request_sent(self) -> None:
        if self.chunked:
            self._emit((CHUNK_END,))
        timeout = self.target.timeout_s
        if timeout is not None and not self.resp_started:
            self.conn.watch_deadline(self, timeout)
        self._arm_try_timer()

    def _arm_try_timer(self) -> None:
        policy = self.target.route.retry
        if policy is not None and policy.per_try_timeout_s is not None and self.try_timer is None \
                and not self.resp_started:
            self.try_timer = self.conn.loop.call_later(policy.per_try_timeout_s,
                                                                   self._on_try_timeout)

    def _emit_body(self, data: bytes) -> None:
        if self.chunked:
            self._emit((b"%x\r\n" % len(data), data, CRLF))
        else:
            self._emit((data,))

    def _emit(self, parts) -> None:
        n = sum(map(len, parts))
        sent = self.sent
        if sent is not None:
            size = self.sent_size + n
            if size > RETRY_BUFFER_LIMIT:
                self.sent = None
            else:
                sent.extend(parts)
                self.sent_size = size
        up = self.up
        if up is not None:
            up.writelines(parts)
            return
        self.pending.extend(parts)
        self.pending_size += n
        if not self.pending_full and self.pending_size > PENDING_LIMIT:
            self.pending_full = True
            self.conn.set_paused(P_UPSTREAM, True)

    # ---- upstream connection ------------------------------------------------------------
    async def _connect(self) -> None:
        target = self.target
        try:
            up = await self.conn.listener.pool.connect(target.endpoint,
                                                       target.cluster.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            self.task = None
            self._unpend()
            if not self.finished and not self.resp_started and self.target is target:
                if isinstance(exc, TimeoutError):
                    why = f"connect timeout after {target.cluster.connect_timeout_s:g}s"
                else:
                    why = f"connect failed: {exc.strerror or exc}"
                self._attempt_failed(retry.CONNECT_FAILURE, upstream_unavailable(
                    target.cluster.name, target.endpoint.address, why))
            return
        finally:
            if self.task is None:
                self._unpend()
        self.task = None
        if self.finished or self.resp_started:
            self.conn.listener.pool.release(up, False)
            return
        try:
            self._attach(up)
        except Exception:  # a bug must not leave the client hanging
            log.exception("http exchange failed")
            self.conn.abort()

    def _attach(self, up: UpstreamConnection) -> None:
        self.up = up
        up.start(self, self.method_b == b"HEAD")
        if self.conn.write_paused:
            up.pause_reading()
        if self.pending:
            pending = self.pending
            self.pending = []
            self.pending_size = 0
            if self.pending_full:
                self.pending_full = False
                self._update_pause()
            up.writelines(pending)

    def _update_pause(self) -> None:
        self.conn.set_paused(P_UPSTREAM, self.pending_full or self.up_paused)

    def _drop_upstream(self) -> None:
        """Forget the upstream side without reusing it (timeout, local reply, client gone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn.deadline_ex is self:
            self.conn.deadline_ex = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._drop_attempt()

    def _drop_attempt(self) -> None:
        """Abandon the current attempt (its connection or connect) but not the request."""
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        if self.pending_full or self.up_paused:
            self.pending_full = self.up_paused = False
            self._update_pause()

    def _on_timeout(self) -> None:
        """The route timeout passed (called by the connection's deadline timer)."""
        if self.resp_started or self.finished:
            return
        target = self.target
        if self.retry_timer is None:  # an attempt was in flight: it timed out, as far as health goes
            self.conn.listener.dataplane.report(target, 504)
        self.local_reply(upstream_timeout(target.cluster.name, target.timeout_s))

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if self.resp_started or self.finished:
            return
        target = self.target
        self._drop_attempt()
        self._attempt_failed(retry.PER_TRY_TIMEOUT, Reply(
            504, GRPC_DEADLINE_EXCEEDED, "upstream_timeout",
            f"cluster {target.cluster.name} endpoint {target.endpoint.address} did not answer "
            f"within the per-try timeout of {target.route.retry.per_try_timeout_s:g}s"))

    # ---- retries --------------------------------------------------------------------------
    def _attempt_failed(self, kind: str, reply: Reply) -> None:
        """An attempt ended without a response: retry if the policy and budget allow, else
        answer with why."""
        dp = self.conn.listener.dataplane
        dp.report(self.target, reply.status)
        if self._try_retry(kind, 0):
            return
        if self.call.extra.get("retry_note") == "retry_budget_exhausted":
            reply = breaker.retry_budget_reply(self.target.cluster.name, reply.message)
        self.local_reply(reply)

    def _try_retry(self, kind: str, code: int) -> bool:
        """Schedule another attempt after the back-off; False when this one is the answer."""
        target = self.target
        policy = target.route.retry
        if policy is None or self.finished or not retry.retriable(policy, kind, code):
            return False
        self._retry_settled()
        if self.attempts > policy.num_retries:
            return False
        extra = self.call.extra
        if self.sent is None:
            extra["retry_note"] = "body_too_large_to_replay"
            return False
        if not retry.request_allows(policy, self.method, self.headers):
            extra["retry_note"] = "request_not_retriable"
            return False
        dp = self.conn.listener.dataplane
        if not dp.admit_retry(target):
            extra["retry_note"] = "retry_budget_exhausted"
            return False
        self.retrying = True
        up = self.up
        self.up = None
        if up is not None:
            up.abort()
        self._drop_attempt()
        if self.tried is None:
            self.tried = set()
        self.tried.add(target.endpoint.address)
        delay = retry.backoff_s(policy, self.attempts - 1, dp.rand)
        self.retry_timer = self.conn.loop.call_later(delay, self._retry)
        dp.stats.inc("retries", (("cluster", target.cluster.name),))
        return True

    def _retry_settled(self) -> None:
        if self.retrying:
            self.retrying = False
            self.conn.listener.dataplane.retry_done(self.target)

    def _retry(self) -> None:
        self.retry_timer = None
        if self.finished or self.resp_started:
            return
        dp = self.conn.listener.dataplane
        result = dp.retarget(self.call, self.target, self.tried)
        if isinstance(result, Reply):
            self.local_reply(result)
            return
        self.target = result
        self.attempts += 1
        self.call.extra["attempts"] = self.attempts
        self.pending = list(self.sent)
        self.pending_size = self.sent_size
        if self.req_done:
            self._arm_try_timer()
        self._start_attempt()

    # ---- ResponseHandler ----------------------------------------------------------------
    def on_response_head(self, status: int, reason: bytes, headers: list, framing: int) -> None:
        self.conn.last_io = time.monotonic()
        target = self.target
        self.conn.listener.dataplane.report(target, status)
        if status >= 500 or (target.route.retry is not None and
                             status in target.route.retry.retriable_status_codes):
            if self._try_retry(retry.HTTP_STATUS, status):
                return
        self._retry_settled()
        if self.conn.deadline_ex is self:
            self.conn.deadline_ex = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self.resp_started = True
        self.status = status
        conn = self.conn
        http11 = self.version != "1.0"
        named = None  # headers the upstream's Connection header declares hop-by-hop
        kept = [h for h in headers if len(h[0]) not in HOP_LENS or h[0].lower() not in HOP]
        if len(kept) != len(headers):
            for name, value in headers:
                if len(name) == 10 and name.lower() == b"connection" and \
                        value.lower() not in PLAIN_CONNECTION:
                    tokens = {t.encode("latin-1") for t in connection_tokens(value.decode("latin-1"))}
                    tokens -= {b"close", b"keep-alive"}
                    if tokens:
                        named = tokens if named is None else named | tokens
            if named:
                kept = [h for h in kept if h[0].lower() not in named]
        parts = [status_line(status, reason), b"\r\n".join(map(HEADER_JOIN, kept))]
        if kept:
            parts.append(CRLF)
        append = parts.append
        close = not self.keep_alive or conn.draining or conn.last_request(self)
        if framing == NO_BODY:
            self.mode = M_NONE
        elif framing == CONTENT_LENGTH:
            self.mode = M_RAW
        elif http11:
            self.mode = M_CHUNK
            append(b"transfer-encoding: chunked\r\n")
        else:
            self.mode = M_RAW  # HTTP/1.0 client: the end of the body is the end of the connection
            close = True
        if close:
            append(b"connection: close\r\n")
        elif not http11:
            append(b"connection: keep-alive\r\n")
        append(CRLF)
        self.close_after = close
        self.out.append(b"".join(parts))

    def on_response_body(self, data: bytes) -> None:
        self.conn.last_io = time.monotonic()
        self.bytes_out += len(data)
        if self.mode == M_CHUNK:
            self.out += (b"%x\r\n" % len(data), data, CRLF)
        elif self.mode == M_RAW:
            self.out.append(data)

    def flush(self) -> None:
        """End of one upstream read: one write downstream for head and body pieces."""
        out = self.out
        if out:
            self.out = []
            self.conn.send(out[0] if len(out) == 1 else b"".join(out))

    def on_response_complete(self, keep_alive: bool) -> None:
        if self.mode == M_CHUNK:
            self.out.append(CHUNK_END)
        self.flush()
        up = self.up
        self.up = None
        if up is not None:
            self.conn.listener.pool.release(up, keep_alive and self.req_done and not self.pending)
        if self.up_paused:
            self.up_paused = False
            self._update_pause()
        self._finish(self.status, "")
        self._response_done()

    def on_upstream_lost(self, why: str, got_bytes: bool) -> None:
        up = self.up
        self.up = None
        if self.up_paused:
            self.up_paused = False
            self._update_pause()
        if self.finished:
            return
        target = self.target
        if self.resp_started:
            self._finish(self.status, "upstream_reset_after_response_started")
            self.conn.abort()
            return
        if (not got_bytes and up is not None and up.reused and not self.retried
                and self.sent is not None):
            # The server closed a pooled connection as we reused it: resend on a fresh one.
            self.retried = True
            self.pending = list(self.sent)
            self.pending_size = self.sent_size
            self.task = self.conn.loop.create_task(self._connect())
            return
        where = f"cluster {target.cluster.name} endpoint {target.endpoint.address}"
        if why.startswith("protocol error"):
            reply = Reply(502, GRPC_UNAVAILABLE, "upstream_protocol_error", f"{where}: {why}")
        else:
            reply = Reply(503, GRPC_UNAVAILABLE, "upstream_reset",
                          f"{where}: {why} before the response started")
        self._attempt_failed(retry.RESET, reply)

    def on_upstream_pause(self) -> None:
        if not self.up_paused:
            self.up_paused = True
            self._update_pause()

    def on_upstream_resume(self) -> None:
        if self.up_paused:
            self.up_paused = False
            self._update_pause()

    # ---- endings ------------------------------------------------------------------------
    def local_reply(self, reply: Reply) -> None:
        self._drop_upstream()
        self.resp_started = True
        self.status = reply.status
        self.mode = M_NONE
        conn = self.conn
        close = (not self.keep_alive or not self.req_done or conn.draining
                 or conn.last_request(self))
        body = conn.write_reply(reply, self.call, close, self.version != "1.0",
                                self.method_b == b"HEAD")
        self.bytes_out += body
        self.close_after = close
        self._finish(reply.status, reply.reason)
        self._response_done()

    def downstream_lost(self) -> None:
        if self.finished:
            return
        self._drop_upstream()
        self._finish(499, "downstream_reset")

    def _finish(self, status: int, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self._retry_settled()
        if self.call is not None:
            self.conn.listener.dataplane.finish(self.call, self.target, status, reason,
                                                bytes_in=self.bytes_in, bytes_out=self.bytes_out)

    def _response_done(self) -> None:
        self.resp_done = True
        self.conn.exchange_done(self)
