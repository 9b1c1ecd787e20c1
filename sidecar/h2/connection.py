"""One HTTP/2 connection as an asyncio Protocol, in the server or the client role.

Why a Protocol and callbacks (not a task per stream): the proxy relays frames from one
connection to another inside `data_received`, as the HTTP/1.1 listener does; no coroutine is
created per call on the hot path.

The connection owns framing, HPACK, SETTINGS, PING, GOAWAY, RST_STREAM, stream states and flow
control; this module is the receiving half and the stream lifecycle, `streams.py` the sending
half.  What a stream carries is the business of its `handler` (duck-typed):
  on_headers(stream, headers, end_stream)   response head, or trailers
  on_data(stream, data, end_stream)
  on_reset(stream, code)                    peer reset it, or the connection is gone (LOST)
  on_sent(stream, n)                        n queued DATA octets went out (or were dropped
                                            with the stream): credit them where they came from
A server-role subclass gets new requests through `on_request(stream, headers, end_stream)`.

Flow control is end to end through the proxy: received DATA is credited back to the peer
(`consume`) only once the other side has written it, so a slow reader slows the writer down
instead of filling our memory.  We advertise large windows so WINDOW_UPDATEs stay rare.
"""
from __future__ import annotations

import asyncio
import logging

from sidecar.h2 import frames as F
from sidecar.h2.hpack import Decoder, Encoder, HeaderListTooLarge
from sidecar.h2.streams import Stream, StreamWriter

log = logging.getLogger("protomesh.h2")

LOST = -1  # on_reset code when the connection went away under the stream
STREAM_WINDOW = 1 << 20  # what we let a peer send per stream before it hears from us
CONN_WINDOW = 16 << 20
MAX_HEADER_BLOCK = 256 << 10  # HEADERS + CONTINUATION octets accepted for one block
RESET_FLOOD = 200  # client resets before the reset ratio is checked (see _count_reset)


class IgnoreStream:
    """Handler for a stream whose frames no longer matter to anyone (already answered, or a
    client that only wants the stream open)."""

    @staticmethod
    def on_headers(st, fields, end): pass

    @staticmethod
    def on_data(st, data, end): pass

    @staticmethod
    def on_reset(st, code): pass

    @staticmethod
    def on_sent(st, n): pass


class H2Connection(StreamWriter, asyncio.Protocol):
    """State common to both roles.  `client` decides stream id parity and who sends the preface."""

    def __init__(self, client: bool, max_concurrent_streams: int = 1000,
                 max_header_list_size: int = 65536, stream_window: int = STREAM_WINDOW,
                 conn_window: int = CONN_WINDOW):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.streams: dict[int, Stream] = {}
        self.decoder = Decoder(max_header_list_size)
        self.encoder = Encoder()
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.conn_window = conn_window
        # What the peer allows us.
        self.peer_max_streams = 1 << 31
        self.peer_initial_window = F.DEFAULT_WINDOW
        self.peer_max_frame = F.DEFAULT_MAX_FRAME
        self.send_window = F.DEFAULT_WINDOW
        # What we allow the peer.
        self.recv_window = conn_window
        self.conn_unacked = 0
        self.next_stream_id = 1 if client else 2
        self.last_peer_stream = 0
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        self.closed = False
        self.peer_settings_seen = False
        self._buf = b""
        self._preface = not client  # a server waits for the client's preface first
        self._cont: tuple | None = None  # (stream id, flags, [fragments], size) within CONTINUATION
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._paused = False  # our socket's write buffer is full
        self._blocked: set[Stream] = set()
        self.protocol_errors = 0
        self.peer_streams = 0  # streams the peer opened
        self.peer_resets = 0  # ... and reset before they were complete
        self.heard = True  # bytes arrived since the keepalive last looked (see keep_alive)
        self._keepalive: tuple[float, float] | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.pings_sent = 0

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        opening = [F.settings([(F.SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
                               (F.SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window),
                               (F.SETTINGS_MAX_HEADER_LIST_SIZE, self.decoder.max_list_size),
                               (F.SETTINGS_ENABLE_PUSH, 0)] if self.client else
                              [(F.SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
                               (F.SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window),
                               (F.SETTINGS_MAX_HEADER_LIST_SIZE, self.decoder.max_list_size)])]
        if self.conn_window > F.DEFAULT_WINDOW:  # the connection window only grows by WINDOW_UPDATE
            opening.append(F.window_update(0, self.conn_window - F.DEFAULT_WINDOW))
        else:
            self.recv_window = F.DEFAULT_WINDOW
        if self.client:
            opening.insert(0, F.PREFACE)
        self._write(b"".join(opening))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for st in streams:
            self._discard(st)
            st.closed = True
            if st.handler is not None:
                st.handler.on_reset(st, LOST)
        self.on_closed()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        buf = self._buf + data if self._buf else data
        pos = 0
        try:
            if self._preface:
                if len(buf) < 24:
                    if not F.PREFACE.startswith(buf):
                        raise F.ConnectionError_(F.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._buf = buf
                    return
                if buf[:24] != F.PREFACE:
                    raise F.ConnectionError_(F.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface = False
                pos = 24
            n = len(buf)
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = F._HDR.unpack_from(buf, pos)
                length = (hi << 8) | lo
                if length > F.DEFAULT_MAX_FRAME:
                    raise F.ConnectionError_(F.FRAME_SIZE_ERROR, f"frame of {length} octets exceeds 16384")
                end = pos + 9 + length
                if end > n:
                    break
                payload = buf[pos + 9:end]
                pos = end
                sid &= 0x7FFFFFFF
                if self._cont is not None and ftype != F.CONTINUATION:
                    raise F.ConnectionError_(F.PROTOCOL_ERROR, "frame interleaved within a header block")
                if not self.peer_settings_seen:
                    if ftype != F.SETTINGS or flags & F.FLAG_ACK:
                        raise F.ConnectionError_(F.PROTOCOL_ERROR, "first frame is not SETTINGS")
                    self.peer_settings_seen = True
                try:
                    if ftype == F.DATA:
                        self._on_data(sid, flags, payload, length)
                    elif ftype == F.HEADERS:
                        self._on_headers_frame(sid, flags, payload)
                    else:
                        self._on_control(ftype, sid, flags, payload)
                except F.StreamError as err:
                    self._stream_error(err)
                if self.closed:
                    return
            self._buf = buf[pos:] if pos < n else b""
        except F.ConnectionError_ as err:
            self.fail(err.code, err.message)
        except Exception as exc:  # a bug of ours: logged with its traceback, the peer gets GOAWAY
            log.exception("h2 connection: internal error")
            self.fail(F.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    # ---- receiving ------------------------------------------------------------------------------
    def _on_data(self, sid: int, flags: int, payload: bytes, length: int) -> None:
        if sid == 0:
            raise F.ConnectionError_(F.PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= length
        if self.recv_window < 0:
            raise F.ConnectionError_(F.FLOW_CONTROL_ERROR, "peer exceeded the connection window")
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            self._consume_conn(length)
            if st is None and self._idle(sid):
                raise F.ConnectionError_(F.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if st is not None:
                raise F.StreamError(sid, F.STREAM_CLOSED, "DATA after END_STREAM")
            return  # a stream we already closed: frames in flight are dropped
        if not st.head_seen:
            self._consume_conn(length)
            raise F.StreamError(sid, F.PROTOCOL_ERROR, "DATA before HEADERS")
        st.recv_window -= length
        if st.recv_window < 0:
            self._consume_conn(length)
            raise F.StreamError(sid, F.FLOW_CONTROL_ERROR, "peer exceeded the stream window")
        data, pad = F.strip_padding(payload, flags, F.DATA)
        if pad:
            self.consume(st, pad)
        end = bool(flags & F.FLAG_END_STREAM)
        if end:
            st.remote_closed = True
        st.handler.on_data(st, data, end)
        if end:
            self._maybe_done(st)

    def _on_headers_frame(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise F.ConnectionError_(F.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = F.headers_fragment(payload, flags, sid) if flags & (F.FLAG_PADDED | F.FLAG_PRIORITY) else payload
        if flags & F.FLAG_END_HEADERS:
            self._on_header_block(sid, flags, fragment)
        else:
            self._cont = (sid, flags, [fragment], len(fragment))

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        if self._cont is None or self._cont[0] != sid:
            raise F.ConnectionError_(F.PROTOCOL_ERROR, "CONTINUATION without a header block open")
        csid, cflags, parts, size = self._cont
        parts.append(payload)
        size += len(payload)
        if size > MAX_HEADER_BLOCK:
            raise F.ConnectionError_(F.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} octets")
        if flags & F.FLAG_END_HEADERS:
            self._cont = None
            self._on_header_block(sid, cflags, b"".join(parts))
        else:
            self._cont = (csid, cflags, parts, size)

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        end = bool(flags & F.FLAG_END_STREAM)
        too_large = None
        try:
            headers = self.decoder.decode(block)  # always: the HPACK state is shared
        except HeaderListTooLarge as exc:
            headers, too_large = (), str(exc)
        st = self.streams.get(sid)
        if st is None:
            if not self._idle(sid):
                return  # a stream we closed or reset: frames still in flight are dropped
            if self.client or sid & 1 == 0:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, f"peer opened stream {sid} with wrong parity")
            self.last_peer_stream = sid
            self.peer_streams += 1
            if self.goaway_sent is not None:
                self._write(F.rst_stream(sid, F.REFUSED_STREAM))
                return
            if len(self.streams) >= self.max_concurrent_streams:
                raise F.StreamError(sid, F.REFUSED_STREAM, "too many concurrent streams")
            st = Stream(sid, self.peer_initial_window, self.stream_window)
            st.head_seen = True
            st.remote_closed = end
            self.streams[sid] = st
            if too_large is not None:
                self.on_headers_too_large(st, too_large)
                return
            self.on_request(st, headers, end)
            if end:
                self._maybe_done(st)
            return
        if st.remote_closed:
            raise F.StreamError(sid, F.STREAM_CLOSED, "HEADERS after END_STREAM")
        if too_large is not None:
            raise F.StreamError(sid, F.PROTOCOL_ERROR, too_large)
        if st.head_seen and not end:
            raise F.StreamError(sid, F.PROTOCOL_ERROR, "trailers without END_STREAM")
        st.head_seen = True
        if end:
            st.remote_closed = True
        st.handler.on_headers(st, headers, end)
        if end:
            self._maybe_done(st)

    def _on_control(self, ftype: int, sid: int, flags: int, payload: bytes) -> None:
        if ftype == F.CONTINUATION:
            self._on_continuation(sid, flags, payload)
        elif ftype == F.SETTINGS:
            if sid:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, "SETTINGS on a stream")
            params = F.parse_settings(payload, flags)
            if not flags & F.FLAG_ACK:
                self._apply_settings(params)
                self._write(F.SETTINGS_ACK)
                self.on_settings()
        elif ftype == F.WINDOW_UPDATE:
            inc = F.parse_window_update(payload, sid)
            if sid == 0:
                self.send_window += inc
                if self.send_window > F.MAX_WINDOW:
                    raise F.ConnectionError_(F.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
                self._flush_blocked()
                return
            st = self.streams.get(sid)
            if st is None:
                if self._idle(sid):
                    raise F.ConnectionError_(F.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
                return
            st.send_window += inc
            if st.send_window > F.MAX_WINDOW:
                raise F.StreamError(sid, F.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            if st.pending is not None:
                self._flush_stream(st)
        elif ftype == F.PING:
            if sid:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, "PING on a stream")
            F.check_ping(payload)
            if not flags & F.FLAG_ACK:
                self._write(F.ping(payload, ack=True))
        elif ftype == F.RST_STREAM:
            if sid == 0:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            code = F.parse_rst_stream(payload)
            if self._idle(sid):
                raise F.ConnectionError_(F.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            st = self.streams.pop(sid, None)
            if st is not None:
                self._forget(st)
                st.handler.on_reset(st, code)
                self._after_stream_closed()
                if not self.client:
                    self._count_reset()
        elif ftype == F.GOAWAY:
            if sid:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, "GOAWAY on a stream")
            last, code, debug = F.parse_goaway(payload)
            self.goaway_received = last if self.goaway_received is None else min(last, self.goaway_received)
            if code != F.NO_ERROR:
                log.info("h2 peer sent GOAWAY %s: %s", F.ERROR_NAMES.get(code, code), debug[:200])
            for st in [s for s in self.streams.values() if s.id > last and (s.id & 1) == (0 if not self.client else 1)]:
                self.streams.pop(st.id, None)
                self._forget(st)
                st.handler.on_reset(st, F.REFUSED_STREAM)  # never processed: safe to retry
            self.on_goaway(last, code)
            self._after_stream_closed()
        elif ftype == F.PRIORITY:
            if sid == 0:
                raise F.ConnectionError_(F.PROTOCOL_ERROR, "PRIORITY on stream 0")
            F.check_priority(payload, sid)
        elif ftype == F.PUSH_PROMISE:
            raise F.ConnectionError_(F.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
        # other frame types are ignored (RFC 9113 §4.1)

    def _apply_settings(self, params) -> None:
        for ident, value in params:
            if ident == F.SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > F.MAX_WINDOW:
                        raise F.ConnectionError_(F.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
                if delta > 0:
                    self._flush_blocked()
            elif ident == F.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == F.SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value

    def _count_reset(self) -> None:
        """Rapid reset (CVE-2023-44487): a client that opens streams only to reset them makes us
        do the work of starting calls for nothing.  Past RESET_FLOOD streams, a connection on
        which more than half of all streams were reset by the peer is ended."""
        self.peer_resets += 1
        if self.peer_resets >= RESET_FLOOD and self.peer_resets * 2 > self.peer_streams:
            self.fail(F.ENHANCE_YOUR_CALM, f"{self.peer_resets} of {self.peer_streams} streams reset by the client")

    def _idle(self, sid: int) -> bool:
        """A stream id nobody has opened yet (frames on it are protocol errors)."""
        if (sid & 1) == (1 if self.client else 0):  # ours
            return sid >= self.next_stream_id
        return sid > self.last_peer_stream

    def _stream_error(self, err: F.StreamError) -> None:
        self.protocol_errors += 1
        log.debug("h2 stream error: %s", err)
        self._write(F.rst_stream(err.stream_id, err.code))
        st = self.streams.pop(err.stream_id, None)
        if st is not None:
            self._forget(st)
            if st.handler is not None:
                st.handler.on_reset(st, err.code)
            self._after_stream_closed()

    # ---- stream lifecycle -----------------------------------------------------------------------
    def open_stream(self, handler) -> Stream:
        """A new client stream (HEADERS must be sent next, before any other stream's)."""
        sid = self.next_stream_id
        self.next_stream_id += 2
        st = Stream(sid, self.peer_initial_window, self.stream_window)
        st.handler = handler
        self.streams[sid] = st
        return st

    def reset(self, st: Stream, code: int = F.CANCEL) -> None:
        """Abort one stream (RST_STREAM); its handler is not called back."""
        if st.closed:
            return
        self._write(F.rst_stream(st.id, code))
        if self.streams.pop(st.id, None) is not None:
            self._forget(st)
            self._after_stream_closed()
        st.closed = True

    def _maybe_done(self, st: Stream) -> None:
        if st.local_closed and st.remote_closed and not st.closed:
            st.closed = True
            if self.streams.pop(st.id, None) is not None:
                self._forget(st)
                self._after_stream_closed()

    def _forget(self, st: Stream) -> None:
        st.closed = True
        self._discard(st)
        self._blocked.discard(st)

    def _after_stream_closed(self) -> None:
        if not self.streams and (self.goaway_sent is not None or self.goaway_received is not None):
            self.close()

    # ---- keepalive ------------------------------------------------------------------------------
    def keep_alive(self, interval_s: float, timeout_s: float) -> None:
        """PING a peer that has sent nothing for `interval_s`; if nothing (the ACK included)
        arrives within `timeout_s` more, send GOAWAY and close: its streams see LOST.  Why: a
        peer that vanished without a FIN (its host gone, the network cut) would otherwise hold
        its streams until TCP gives up, which takes hours; for the control server such a stream
        is a dead sidecar still registered as an endpoint."""
        self._keepalive = (interval_s, timeout_s)
        self.heard = False
        self._keepalive_timer = self.loop.call_later(interval_s, self._keepalive_check)

    def _keepalive_check(self) -> None:
        if self.closed:
            return
        interval_s, timeout_s = self._keepalive
        if self.heard:
            self.heard = False
            self._keepalive_timer = self.loop.call_later(interval_s, self._keepalive_check)
            return
        self.pings_sent += 1
        self._write(F.ping(b"keepaliv"))
        self._keepalive_timer = self.loop.call_later(timeout_s, self._keepalive_expired)

    def _keepalive_expired(self) -> None:
        if self.closed:
            return
        if self.heard:
            self._keepalive_check()
            return
        log.info("h2 connection: no answer to a keepalive PING within %gs; closing", self._keepalive[1])
        self._goaway_now(F.NO_ERROR, b"keepalive timeout")
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # not close(): a peer that reads nothing would hold it open

    # ---- connection level -----------------------------------------------------------------------
    def goaway(self, code: int = F.NO_ERROR, debug: bytes = b"") -> None:
        """Stop taking new streams; close once the open ones are done (graceful drain)."""
        if self.goaway_sent is None and not self.closed:
            self.goaway_sent = self.last_peer_stream
            self._write(F.goaway(self.last_peer_stream, code, debug))
        self._after_stream_closed()

    def fail(self, code: int, message: str) -> None:
        """Connection error: GOAWAY with the code, then close (streams see LOST)."""
        self.protocol_errors += 1
        log.info("h2 connection error, sending GOAWAY %s: %s", F.ERROR_NAMES.get(code, code), message)
        self._goaway_now(code, message.encode()[:200])
        self.close()

    def _goaway_now(self, code: int, debug: bytes) -> None:
        """GOAWAY written at once, ahead of closing the connection (not at the end of the round)."""
        if self.transport is not None and not self.closed:
            self.goaway_sent = self.last_peer_stream
            self._write(F.goaway(self.last_peer_stream, code, debug))
            self.flush_now()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush_now()
            self.transport.close()
        self.closed = True

    # ---- hooks ----------------------------------------------------------------------------------
    def on_request(self, st: Stream, headers, end_stream: bool) -> None:
        """Server role: a new stream.  Set `st.handler` and answer."""
        self.reset(st, F.REFUSED_STREAM)

    def on_headers_too_large(self, st: Stream, why: str) -> None:
        self.reset(st, F.PROTOCOL_ERROR)

    def on_settings(self) -> None:
        pass

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        pass

    def on_closed(self) -> None:
        pass
