"""A minimal ADS (SotW) gRPC client on the project's own HTTP/2 stack, for the bench's simulated
sidecars (`bench/control_sim.py`).

Why not grpc.aio: the control-plane case runs thousands of streams in two processes on one core,
and with grpc.aio most of their CPU during a push went to its call machinery (a completion
queue, futures and a coroutine resumption per read and per write) rather than to the xDS work
a sidecar does.  A load generator that costs more than the server it measures measures itself.
Here one stream is one `AdsConnection`: an `H2Connection` in the client role on its own TCP
connection (as separate sidecars have) that is also its only stream's handler, so a response is
deframed, parsed, answered and written inside the connection's `data_received`; no task or
future per message.  What it does not do (TLS, compression, name resolution, keepalive pings)
the bench does not use.

A stream ends with an error string in the shape grpc.aio's callers saw, the gRPC status name
first ("UNAVAILABLE: connection lost", "INTERNAL: ..."), or "stream ended" when the server
finished it with OK.  An exception raised by a callback ends the stream and is re-raised to the
caller, as it was when the caller's own loop ran the callbacks.
"""
from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from sidecar.h2 import frames as F
from sidecar.h2 import grpcwire
from sidecar.h2.connection import LOST, H2Connection
from sidecar.xds.client import backoff_delays

ADS_PATH = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CONNECT_TIMEOUT_S = 20.0  # one TCP connect; grpc's minimum connect timeout
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, f"STATUS_{code}")


@dataclass(frozen=True)
class ChannelSettings:
    """What of grpc's channel options this client honours: the reconnect backoff of a
    `wait_for_ready` stream (full-jitter doubling from `initial_s` up to `max_s`, never below
    `min_s`, for at most `ready_budget_s`) and the largest message accepted.  Defaults: grpc's
    first backoff (1 s), capped at the sidecar xDS client's 5 s rather than grpc's 120 s, which
    would not fit the budget."""
    initial_s: float = 1.0
    min_s: float = 0.0
    max_s: float = 5.0
    ready_budget_s: float = 30.0
    max_message: int = grpcwire.MAX_MESSAGE

    _OPTIONS = {"grpc.initial_reconnect_backoff_ms": ("initial_s", 1e-3),
                "grpc.min_reconnect_backoff_ms": ("min_s", 1e-3),
                "grpc.max_reconnect_backoff_ms": ("max_s", 1e-3),
                "grpc.max_receive_message_length": ("max_message", 1)}
    # Meaningless here: every stream already has a connection of its own.
    _IGNORED = frozenset({"grpc.use_local_subchannel_pool"})

    @classmethod
    def from_options(cls, options) -> "ChannelSettings":
        """Settings from grpc channel options ((name, value) pairs).  An option this client does
        not implement is refused rather than silently not applied."""
        fields = {}
        for name, value in options:
            if name in cls._IGNORED:
                continue
            if name not in cls._OPTIONS:
                raise ValueError(f"channel option {name!r} is not supported by the bench's ADS client")
            field, scale = cls._OPTIONS[name]
            fields[field] = value * scale if scale != 1 else int(value)
        return cls(**fields)


class StopWatch:
    """Wakes every stream that shares one stop event, from a single task for all of them: a task
    per stream only to notice the stop would double the tasks of a simulator process."""

    _by_event: dict[asyncio.Event, "StopWatch"] = {}

    def __init__(self, stop: asyncio.Event):
        self.stop = stop
        self.callbacks: set = set()
        self.task = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        await self.stop.wait()
        if StopWatch._by_event.get(self.stop) is self:
            del StopWatch._by_event[self.stop]
        for callback in list(self.callbacks):
            callback()

    @classmethod
    def add(cls, stop: asyncio.Event, callback):
        """Call `callback()` once `stop` is set (soon, if it already is).  Returns the function
        that unregisters it."""
        if stop.is_set():
            asyncio.get_running_loop().call_soon(callback)
            return lambda: None
        watch = cls._by_event.get(stop)
        if watch is None:
            watch = cls._by_event[stop] = cls(stop)
        watch.callbacks.add(callback)
        return lambda: watch._remove(callback)

    def _remove(self, callback) -> None:
        self.callbacks.discard(callback)
        if not self.callbacks and StopWatch._by_event.get(self.stop) is self:
            del StopWatch._by_event[self.stop]
            self.task.cancel()


class ConnectFailed(Exception):
    """The TCP connection to the control server could not be made (refused, timed out)."""


class AdsConnection(H2Connection):
    """One ADS stream on its own HTTP/2 connection; the connection is also the stream's handler.

    `ended` resolves with the stream's error string (see the module docstring) or with the
    exception a callback raised.  `open` starts the stream; after it, every response is passed
    to `reply(resp)`, whose requests (the ACK and any new subscriptions) are written at once,
    and then `on_acked(resp)` is called: the ACK has been handed to the socket's transport
    (`transport.write`, which sends what the kernel takes right away), or, if flow control held
    it back, once it has.  DATA is credited back to the server after it was processed."""

    def __init__(self, max_message: int = grpcwire.MAX_MESSAGE):
        super().__init__(client=True)
        self.ready: asyncio.Future = self.loop.create_future()  # the server's SETTINGS arrived
        self.ended: asyncio.Future = self.loop.create_future()
        self.st = None
        self.status: int | None = None  # :status of the response head
        self.deframer = grpcwire.Deframer(max_message)
        self.reply = None
        self.on_acked = None
        self.handed = 0  # request octets given to send_data
        self.written = 0  # ... of which went into the connection's output (not held by flow control)
        self.held: collections.deque = collections.deque()  # (response, `handed` after its ACK)

    def open(self, authority: str, opening, reply, on_acked=None) -> None:
        """Send the request head and the `opening` requests."""
        self.reply, self.on_acked = reply, on_acked
        if self.closed:  # the server closed it after its SETTINGS, before we got here
            self._finish("UNAVAILABLE: connection closed as it opened")
            return
        self.st = self.open_stream(self)
        self.send_headers(self.st, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", ADS_PATH),
                                    (b":authority", authority.encode()),
                                    (b"content-type", b"application/grpc"), (b"te", b"trailers")])
        self._send(opening)
        self.flush_now()

    def on_settings(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def shut(self) -> None:
        """End the stream (RST_STREAM CANCEL if it is still open) and close the connection."""
        self._finish("")
        if self.st is not None:
            self.reset(self.st)
        self.close()

    # ---- the stream's handler --------------------------------------------------------------
    def on_headers(self, st, fields, end: bool) -> None:
        if self.status is None:  # the response head, or a trailers-only response
            self.status = next((int(v) for n, v in fields if n == b":status" and v.isdigit()), 0)
            if not end:
                if self.status != 200:
                    self._finish(f"{status_name(grpcwire.status_of_http(self.status))}: HTTP status {self.status}")
                return
        self._finish(self._outcome(fields))

    def on_data(self, st, data: bytes, end: bool) -> None:
        try:
            for message in self.deframer.feed(data):
                if self.ended.done():
                    break
                self._answer(discovery_pb2.DiscoveryResponse.FromString(message))
        except grpcwire.MessageError as exc:
            self._finish(f"{status_name(exc.code)}: {exc}")
        except DecodeError as exc:
            self._finish(f"INTERNAL: a response is not a DiscoveryResponse: {exc}")
        except Exception as exc:  # a callback's: the stream ends, the caller gets it
            if not self.ended.done():
                self.ended.set_exception(exc)
        self.consume(st, len(data))
        if end:
            self._finish("INTERNAL: the stream ended without trailers")

    def on_reset(self, st, code: int) -> None:
        if code == LOST:
            self._finish("UNAVAILABLE: connection lost")
        else:
            name = F.ERROR_NAMES.get(code, str(code))
            self._finish(f"{status_name(grpcwire.status_of_reset(code))}: stream reset by the server ({name})")

    def on_sent(self, st, n: int) -> None:
        """Requests flow control had held went out (or were dropped with the stream: then their
        ACKs were never written and `on_acked` is not called)."""
        if st.closed or self.closed:
            return
        self.written += n
        if self.held and self.held[0][1] <= self.written:
            self.flush_now()
            while self.held and self.held[0][1] <= self.written:
                self._acked(self.held.popleft()[0])

    def on_closed(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("the server closed the connection before its SETTINGS"))
        self._finish("UNAVAILABLE: connection closed")

    # ---- internals -------------------------------------------------------------------------
    def _answer(self, resp) -> None:
        self._send(self.reply(resp))
        if self.written == self.handed and not self.held:
            self.flush_now()  # the ACK leaves now, not at the end of this loop iteration
            self._acked(resp)
        else:
            self.held.append((resp, self.handed))

    def _send(self, requests) -> None:
        data = b"".join(grpcwire.frame_message(r.SerializeToString()) for r in requests)
        self.handed += len(data)
        self.written += self.send_data(self.st, data)

    def _acked(self, resp) -> None:
        if self.on_acked is not None and not self.ended.done():
            self.on_acked(resp)

    def _outcome(self, fields) -> str:
        """The error string of trailers (or a trailers-only response)."""
        code, message = grpcwire.status_in(fields)
        if code is None:
            code = grpcwire.status_of_http(self.status) if self.status != 200 else grpc.StatusCode.UNKNOWN.value[0]
            message = message or "no grpc-status in the trailers"
        if code == 0:
            return "stream ended"
        return f"{status_name(code)}: {unquote(message)}"

    def _finish(self, error: str) -> None:
        if not self.ended.done():
            self.ended.set_result(error)


async def connect(address: str, stopped: asyncio.Future, settings: ChannelSettings,
                  wait_for_ready: bool = False, rand=random.random) -> AdsConnection | None:
    """An open connection to `address` ("host:port"), or None once `stopped` is done.  With
    `wait_for_ready`, a failed connect is tried again after a backoff (`settings`) until one
    succeeds or `settings.ready_budget_s` has passed.  Raises ConnectFailed."""
    loop = asyncio.get_running_loop()
    host, _, port = address.rpartition(":")
    delays = backoff_delays(settings.initial_s, settings.max_s, rand)
    give_up_at = loop.time() + settings.ready_budget_s
    while True:
        try:
            return await _connect_once(loop, host.strip("[]"), int(port), stopped, settings.max_message)
        except ConnectFailed:
            delay = max(settings.min_s, next(delays))
            if not wait_for_ready or loop.time() + delay > give_up_at:
                raise
        await asyncio.wait((stopped,), timeout=delay)
        if stopped.done():
            return None


async def _connect_once(loop, host: str, port: int, stopped: asyncio.Future,
                        max_message: int) -> AdsConnection | None:
    attempt = asyncio.ensure_future(_open_ready(loop, host, port, max_message))
    try:
        await asyncio.wait((attempt, stopped), timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _abandon(attempt)
        raise
    if stopped.done():
        _abandon(attempt)
        return None
    if not attempt.done():
        _abandon(attempt)
        raise ConnectFailed(f"connect failed: not ready within {CONNECT_TIMEOUT_S:g} s")
    try:
        return attempt.result()
    except OSError as exc:
        raise ConnectFailed(f"connect failed: {exc}") from None


async def _open_ready(loop, host: str, port: int, max_message: int) -> AdsConnection:
    """A connection whose server has sent its SETTINGS.  Why wait for them before the stream
    opens: grpc's clients do (a sidecar's xDS client is one), so a registration's measured delay
    includes that round trip as a real sidecar's does."""
    _, conn = await loop.create_connection(lambda: AdsConnection(max_message), host, port)
    try:
        await conn.ready
    except BaseException:
        conn.close()
        raise
    return conn


def _abandon(attempt: asyncio.Future) -> None:
    """Give up a connect (stop, timeout, cancellation); if it completes anyway, close what it
    opened."""
    attempt.cancel()
    attempt.add_done_callback(_close_late)


def _close_late(attempt: asyncio.Future) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close()
