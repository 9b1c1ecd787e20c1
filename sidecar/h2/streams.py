"""The sending half of an HTTP/2 connection: DATA within the peer's windows (the rest queued
per stream), HEADERS behind queued DATA, window credit back to the peer, and frames batched
into one write per loop iteration.

Split from `connection.py` (which parses and dispatches what arrives) so each stays readable;
`StreamWriter` is only ever used as H2Connection's base and uses the state H2Connection sets up
(transport, loop, windows, encoder, peer settings).
"""
from __future__ import annotations

from sidecar.h2 import frames as F


class Stream:
    """One stream's state on one connection; `handler` is whoever relays it (duck-typed, see
    connection.py)."""

    __slots__ = ("id", "handler", "send_window", "recv_window", "unacked", "pending", "pending_end",
                 "trailers", "local_closed", "remote_closed", "closed", "head_seen")

    def __init__(self, stream_id: int, send_window: int, recv_window: int):
        self.id = stream_id
        self.handler = None
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0  # received and consumed, not yet returned by WINDOW_UPDATE
        self.pending: list[bytes] | None = None  # DATA waiting for window / a writable socket
        self.pending_end = False
        self.trailers = None  # trailers waiting behind pending DATA
        self.local_closed = False
        self.remote_closed = False
        self.closed = False
        self.head_seen = False  # a HEADERS frame arrived (the next one is trailers)


class StreamWriter:
    """Outbound frames and flow-control bookkeeping (see the module docstring)."""

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush_blocked()

    def send_headers(self, st: Stream, headers, end_stream: bool = False) -> None:
        if st.closed or st.local_closed:
            return
        if st.pending is not None:  # trailers go out after the DATA waiting for window
            st.trailers = headers
            return
        self._write(F.headers(st.id, self.encoder.encode(headers), end_stream, self.peer_max_frame))
        if end_stream:
            st.local_closed = True
            self._maybe_done(st)

    def send_data(self, st: Stream, data: bytes, end_stream: bool = False) -> int:
        """Write what the windows allow now; queue the rest (reported later by on_sent).
        Returns the octets written now."""
        if st.closed or st.local_closed:
            return 0
        if st.pending is not None or self._paused:
            self._queue(st, data, end_stream)
            return 0
        n = len(data)
        allowed = min(st.send_window, self.send_window)
        if n > allowed:
            if allowed <= 0:
                self._queue(st, data, end_stream)
                return 0
            view = memoryview(data)  # the queued tail refers to `data` instead of copying it
            self._write_data(st, view[:allowed], False)
            self._queue(st, view[allowed:], end_stream)
            return allowed
        self._write_data(st, data, end_stream)
        if end_stream:
            st.local_closed = True
            self._maybe_done(st)
        return n

    def _write_data(self, st: Stream, data: bytes, end: bool) -> None:
        n = len(data)
        st.send_window -= n
        self.send_window -= n
        mf = self.peer_max_frame
        if n <= mf:
            self._write(F.data(st.id, data, end))
            return
        for pos in range(0, n, mf):
            chunk = data[pos:pos + mf]
            self._write(F.data(st.id, chunk, end and pos + mf >= n))

    def _queue(self, st: Stream, data: bytes, end: bool) -> None:
        if st.pending is None:
            st.pending = []
        if data:
            st.pending.append(data)
        st.pending_end = st.pending_end or end
        self._blocked.add(st)

    def _flush_blocked(self) -> None:
        for st in list(self._blocked):
            if self._paused or self.send_window <= 0:
                return
            self._flush_stream(st)

    def _flush_stream(self, st: Stream) -> None:
        if self._paused or st.closed:
            return
        sent = 0
        pending = st.pending
        while pending:
            allowed = min(st.send_window, self.send_window)
            if allowed <= 0:
                break
            chunk = pending[0]
            if len(chunk) > allowed:
                if not isinstance(chunk, memoryview):
                    chunk = memoryview(chunk)
                pending[0] = chunk[allowed:]
                chunk = chunk[:allowed]
            else:
                pending.pop(0)
            self._write_data(st, chunk, False)
            sent += len(chunk)
        if not pending:
            st.pending = None
            self._blocked.discard(st)
            end, trailers = st.pending_end, st.trailers
            st.trailers = None
            if trailers is not None:
                self.send_headers(st, trailers, True)
            elif end:
                self._write(F.data(st.id, b"", True))
                st.local_closed = True
                self._maybe_done(st)
        if sent and st.handler is not None:
            st.handler.on_sent(st, sent)

    def consume(self, st: Stream | None, n: int) -> None:
        """`n` received DATA octets left our hands: give the peer that much window back, in
        batches (half a window) so WINDOW_UPDATEs stay rare."""
        self._consume_conn(n)
        if st is None or st.closed or st.remote_closed:
            return
        st.unacked += n
        if st.unacked >= self.stream_window >> 1:
            self._write(F.window_update(st.id, st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0

    def _consume_conn(self, n: int) -> None:
        self.conn_unacked += n
        if self.conn_unacked >= self.conn_window >> 1:
            self._write(F.window_update(0, self.conn_unacked))
            self.recv_window += self.conn_unacked
            self.conn_unacked = 0

    @staticmethod
    def _discard(st: Stream) -> None:
        """Queued DATA that will never go out is reported like sent data, so the connection it
        came from gets its window back (else every reset stream would shrink it for good)."""
        pending, st.pending = st.pending, None
        if pending:
            n = sum(map(len, pending))
            if n and st.handler is not None:
                st.handler.on_sent(st, n)

    def _write(self, b: bytes) -> None:
        """Frames written during one loop iteration leave in one send()."""
        self._out.append(b)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write what this round has queued (scheduled at the end of the round; called directly
        before a close, or when latency matters more than one write per round)."""
        self._flush_scheduled = False
        out = self._out
        if out:
            self._out = []
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(b"".join(out) if len(out) > 1 else out[0])
