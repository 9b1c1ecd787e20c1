"""The HTTP/1.1 proxy listener: asyncio protocols + httptools, driven from callbacks.

Why callbacks and not a task per request: this is the hot path (design decision 5), and an
exchange is a small state machine that the two parsers (downstream request, upstream response)
advance.  The only coroutine is opening a new upstream connection.

One `_Downstream` per client connection parses requests into `_Exchange`s, kept in arrival order;
the head of the queue is the active one, later ones are pipelined and wait (their bodies are
buffered, and reading pauses once one is complete).  Bodies are streamed both ways and never
buffered whole; each side's `pause_writing` pauses reading on the other side.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from collections import deque
from http import HTTPStatus

from httptools import (HttpParserCallbackError, HttpParserError, HttpParserUpgrade,
                       HttpRequestParser)

from sidecar.call import (GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED, GRPC_INTERNAL,
                          GRPC_INVALID_ARGUMENT, GRPC_UNAVAILABLE, REASON_HEADER, Call, Reply,
                          upstream_timeout, upstream_unavailable)
from sidecar.dataplane import Dataplane, Target
from sidecar.listeners import grpc_bridge
from sidecar.filters import mirror
from sidecar.filters.fault import Hold
from sidecar.upstream import breaker, retry
from sidecar.upstream.http_pool import (CONTENT_LENGTH, NO_BODY, HttpPool,
                                        UpstreamConnection)

log = logging.getLogger("protomesh.sidecar")

RETRY_BUFFER_LIMIT = 64 * 1024  # a request this small (head + body) is kept for retries
PENDING_LIMIT = 64 * 1024  # body buffered while connecting / while queued before reading pauses

_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                  b"upgrade", b"transfer-encoding"))
# Request headers never copied as received: hop-by-hop, the ones we rewrite, and Expect
# (answered here).
_REQ_SKIP = _HOP | {b"x-forwarded-for", b"x-forwarded-proto", b"expect"}
_CRLF = b"\r\n"
_HOP_LENS = frozenset(map(len, _REQ_SKIP))  # cheap pre-check before lower-casing a header name
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close"))  # Connection values that name no header
_PLAIN_CONNECTION_S = frozenset(("keep-alive", "close"))
# Request-side skip sets compare with the parsed headers' lower-case str keys.
_REQ_SKIP_S = frozenset(n.decode() for n in _REQ_SKIP)
_REQ_SKIP_TRACED = _REQ_SKIP_S | {"traceparent", "tracestate", "baggage"}
_HEADER_JOIN = b": ".join  # (name, value) -> b"name: value", mapped over header lists in C
_CHUNK_END = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# Pause bits for the downstream transport's reading.
_P_PIPELINE = 1  # a later request is complete while an earlier one is in flight
_P_UPSTREAM = 2  # the upstream cannot take more body yet (write buffer full, or connecting)

# Response body framing towards the client.
_M_NONE = 0
_M_RAW = 1
_M_CHUNK = 2

_status_lines: dict[int, bytes] = {}


def _new_rid_source() -> None:
    """A fresh random prefix and counter start (at import, and in a forked child)."""
    global _RID_PREFIX, _rid_counter
    h = f"{random.getrandbits(72):018x}"
    _RID_PREFIX = f"{h[:8]}-{h[8:12]}-8{h[12:15]}-a{h[15:18]}-"
    _rid_counter = itertools.count(random.getrandbits(40))


_new_rid_source()
os.register_at_fork(after_in_child=_new_rid_source)


def _request_id() -> str:
    """A UUID-shaped x-request-id: a random per-process prefix and a counter (UUIDv8, "custom",
    since it is not random per request).  Ids for correlating logs need uniqueness, not
    unpredictability; uuid.uuid4() reads os.urandom (a syscall) and random 128-bit ids cost
    more formatting than the rest of the request head."""
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFF:012x}"


def _status_line(status: int, reason: bytes = b"") -> bytes:
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        line = _status_lines[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


def _tokens(value: str) -> list[str]:
    return [t.strip() for t in value.lower().split(",") if t.strip()]


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection we are closing."""


class _HeadersTooLarge(Exception):
    pass


class _Exchange:
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
    mode = _M_NONE
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

    def __init__(self, conn: "_Downstream", method_b: bytes, version: str, url: bytes,
                 raw: list, headers: dict, chunked: bool, has_body: bool,
                 keep_alive: bool, expect: bool):
        self.conn = conn
        self.method_b = method_b
        self.method = _METHODS.get(method_b) or method_b.decode("latin-1")
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
            self.conn.send(_CONTINUE)
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
            conn.send(_CONTINUE)
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
        skip = _REQ_SKIP_TRACED if trace_pairs else _REQ_SKIP_S
        connection = headers.get("connection")
        if connection and connection.lower() not in _PLAIN_CONNECTION_S:
            skip = skip.union(_tokens(connection))
        path = self.url if target.path is self.call.path else target.path.encode("latin-1", "replace")
        raw = self.raw
        if not skip.isdisjoint(headers):  # (header names are the dict's lower-case keys)
            raw = [h for h in raw if h[0].lower().decode("latin-1") not in skip]
        parts = [self.method_b, b" ", path, b" HTTP/1.1\r\n", b"\r\n".join(map(_HEADER_JOIN, raw))]
        append = parts.append
        if raw:
            append(_CRLF)
        if "host" not in headers:
            append(b"host: %s\r\n" % target.endpoint.address.encode())
        xff = headers.get("x-forwarded-for")
        append(b"x-forwarded-for: ")
        append(conn.peer_ip_b if not xff else (xff + ", " + conn.peer_ip).encode("latin-1"))
        append(b"\r\nx-forwarded-proto: http\r\n")
        if "x-request-id" not in headers:
            rid = _request_id()
            headers["x-request-id"] = rid
            append(b"x-request-id: %s\r\n" % rid.encode())
        for name, value in trace_pairs:
            append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if self.chunked:
            append(b"transfer-encoding: chunked\r\n")
        append(_CRLF)
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
            self._emit((_CHUNK_END,))
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
            self._emit((b"%x\r\n" % len(data), data, _CRLF))
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
            self.conn.set_paused(_P_UPSTREAM, True)

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
        self.conn.set_paused(_P_UPSTREAM, self.pending_full or self.up_paused)

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
        kept = [h for h in headers if len(h[0]) not in _HOP_LENS or h[0].lower() not in _HOP]
        if len(kept) != len(headers):
            for name, value in headers:
                if len(name) == 10 and name.lower() == b"connection" and \
                        value.lower() not in _PLAIN_CONNECTION:
                    tokens = {t.encode("latin-1") for t in _tokens(value.decode("latin-1"))}
                    tokens -= {b"close", b"keep-alive"}
                    if tokens:
                        named = tokens if named is None else named | tokens
            if named:
                kept = [h for h in kept if h[0].lower() not in named]
        parts = [_status_line(status, reason), b"\r\n".join(map(_HEADER_JOIN, kept))]
        if kept:
            parts.append(_CRLF)
        append = parts.append
        close = not self.keep_alive or conn.draining or conn.last_request(self)
        if framing == NO_BODY:
            self.mode = _M_NONE
        elif framing == CONTENT_LENGTH:
            self.mode = _M_RAW
        elif http11:
            self.mode = _M_CHUNK
            append(b"transfer-encoding: chunked\r\n")
        else:
            self.mode = _M_RAW  # HTTP/1.0 client: the end of the body is the end of the connection
            close = True
        if close:
            append(b"connection: close\r\n")
        elif not http11:
            append(b"connection: keep-alive\r\n")
        append(_CRLF)
        self.close_after = close
        self.out.append(b"".join(parts))

    def on_response_body(self, data: bytes) -> None:
        self.conn.last_io = time.monotonic()
        self.bytes_out += len(data)
        if self.mode == _M_CHUNK:
            self.out += (b"%x\r\n" % len(data), data, _CRLF)
        elif self.mode == _M_RAW:
            self.out.append(data)

    def flush(self) -> None:
        """End of one upstream read: one write downstream for head and body pieces."""
        out = self.out
        if out:
            self.out = []
            self.conn.send(out[0] if len(out) == 1 else b"".join(out))

    def on_response_complete(self, keep_alive: bool) -> None:
        if self.mode == _M_CHUNK:
            self.out.append(_CHUNK_END)
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
        self.mode = _M_NONE
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
        self.queue: deque[_Exchange] = deque()
        self.parsing: _Exchange | None = None  # exchange whose body is being parsed
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
        self.deadline_ex: _Exchange | None = None
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
                tokens = _tokens(connection)
                keep_alive = "close" not in tokens and (version == "1.1" or "keep-alive" in tokens)
        te = headers.get("transfer-encoding")
        chunked = te is not None and "chunked" in te.lower()
        cl = headers.get("content-length")
        has_body = chunked or (cl is not None and cl.strip() not in ("0", ""))
        expect = headers.get("expect", "").lower() == "100-continue"
        ex = _Exchange(self, parser.get_method(), version, self.url, raw, headers,
                       chunked, has_body, keep_alive, expect)
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._activate(ex)

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.on_request_body(data)
            if not ex.active and not self.paused & _P_PIPELINE:
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
    def last_request(self, ex: _Exchange) -> bool:
        """True if nothing may follow `ex` on this connection."""
        return self.no_more and self.parsing is None and self.queue and self.queue[-1] is ex

    def exchange_done(self, ex: _Exchange) -> None:
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

    def _activate(self, ex: _Exchange) -> None:
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
        self.set_paused(_P_PIPELINE, want)

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
        parts = [_status_line(reply.status),
                 b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                 b"%s: %s\r\n" % (REASON_HEADER.encode(), reply.reason_value(call).encode())]
        for name, value in reply.headers:
            parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            parts.append(b"connection: close\r\n")
        elif not http11:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(_CRLF)
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
            self.set_paused(_P_PIPELINE, True)
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

    def watch_deadline(self, ex: _Exchange, timeout: float) -> None:
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
