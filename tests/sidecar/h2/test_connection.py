"""H2Connection over real loopback sockets: a raw-frame peer against the server role, and our
client role against our server role.  Protocol errors must give GOAWAY / RST_STREAM with the
right code (never a traceback), flow control must hold both ways."""
from __future__ import annotations

import asyncio

import pytest

from sidecar.h2 import frames as F
from sidecar.h2.connection import LOST, H2Connection
from sidecar.h2.hpack import Decoder, Encoder

REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/e.E/Echo"), (b":authority", b"t")]


class Echo:
    """Echoes request DATA back; trailers once the request ended."""

    def __init__(self, conn):
        self.conn = conn

    def on_headers(self, st, fields, end):
        if end:
            self.conn.send_headers(st, [(b"grpc-status", b"0")], True)

    def on_data(self, st, data, end):
        n = self.conn.send_data(st, data)
        if n:
            self.conn.consume(st, n)
        if end:
            self.conn.send_headers(st, [(b"grpc-status", b"0")], True)

    def on_sent(self, st, n):
        self.conn.consume(st, n)

    def on_reset(self, st, code):
        self.conn.resets.append(code)


class EchoServer(H2Connection):
    def __init__(self, **kw):
        super().__init__(client=False, **kw)
        self.resets: list[int] = []

    def on_request(self, st, headers, end):
        st.handler = Echo(self)
        self.send_headers(st, [(b":status", b"200")])
        if end:
            self.send_headers(st, [(b"grpc-status", b"0")], True)


@pytest.fixture
async def server():
    made = []

    async def start(**kw):
        loop = asyncio.get_running_loop()
        conns = []
        srv = await loop.create_server(lambda: conns.append(EchoServer(**kw)) or conns[-1], "127.0.0.1", 0)
        made.append(srv)
        return srv.sockets[0].getsockname()[1], conns

    yield start
    for srv in made:
        srv.close()


class RawPeer:
    """A hand-driven HTTP/2 client: writes whatever frames the test says, reads frames back."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.enc, self.dec = Encoder(), Decoder()

    @classmethod
    async def open(cls, port: int, preface: bool = True, settings=()):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        if preface:
            peer.send(F.PREFACE + F.settings(list(settings)))
        return peer

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    def headers(self, sid: int, fields=REQ, end=False) -> bytes:
        return F.headers(sid, self.enc.encode(fields), end)

    async def frame(self):
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length, ftype, flags, sid = F.parse_header(head)
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5) if length else b""
        return ftype, flags, sid, payload

    async def until(self, ftype: int, limit: int = 50):
        for _ in range(limit):
            got = await self.frame()
            if got[0] == ftype:
                return got
        raise AssertionError(f"no frame of type {ftype} in {limit} frames")

    async def goaway_then_eof(self) -> int:
        _, _, _, payload = await self.until(F.GOAWAY, limit=5000)
        assert await asyncio.wait_for(self.reader.read(), 5) == b""  # connection closed after
        return F.parse_goaway(payload)[1]

    def close(self):
        self.writer.close()


async def test_settings_ack_and_ping(server):
    port, _ = await server()
    peer = await RawPeer.open(port)
    ftype, flags, _, _ = await peer.until(F.SETTINGS)
    assert flags == 0  # the server's own SETTINGS
    peer.send(F.ping(b"pingpong"))
    _, flags, _, payload = await peer.until(F.PING)
    assert flags == F.FLAG_ACK and payload == b"pingpong"
    peer.close()


@pytest.mark.parametrize("frames_after_preface,code", [
    (F.frame(F.DATA, 0, 0, b"x"), F.PROTOCOL_ERROR),  # DATA on stream 0
    (F.frame(F.DATA, 0, 1, b"x" * 16385), F.FRAME_SIZE_ERROR),  # above the max frame size
    (F.frame(F.HEADERS, 0, 1, b"\x82") + F.ping(b"12345678"), F.PROTOCOL_ERROR),  # frame inside a header block
    (F.frame(F.CONTINUATION, F.FLAG_END_HEADERS, 1, b"\x82"), F.PROTOCOL_ERROR),
    (F.frame(F.HEADERS, F.FLAG_END_HEADERS, 2, b"\x83"), F.PROTOCOL_ERROR),  # even id from a client
    (F.frame(F.HEADERS, F.FLAG_END_HEADERS, 1, b"\xff\xff\xff"), F.COMPRESSION_ERROR),
    (F.frame(F.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), F.PROTOCOL_ERROR),
    (F.frame(F.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), F.FLOW_CONTROL_ERROR),  # 65535 + 2^31-1
    (F.frame(F.RST_STREAM, 0, 9, b"\0\0\0\x08"), F.PROTOCOL_ERROR),  # idle stream
    (F.frame(F.SETTINGS, 0, 0, b"\0\x04\0"), F.FRAME_SIZE_ERROR),
    (F.frame(F.PUSH_PROMISE, F.FLAG_END_HEADERS, 1, b"\0\0\0\x02\x82"), F.PROTOCOL_ERROR),
])
async def test_connection_errors_get_goaway(server, frames_after_preface, code):
    port, conns = await server()
    peer = await RawPeer.open(port)
    peer.send(frames_after_preface)
    assert await peer.goaway_then_eof() == code
    # The server goes on serving other connections.
    ok = await RawPeer.open(port)
    ok.send(ok.headers(1, end=True))
    _, flags, sid, _ = await ok.until(F.HEADERS)
    assert sid == 1
    ok.close()


async def test_bad_preface_and_missing_settings(server):
    port, _ = await server()
    peer = await RawPeer.open(port, preface=False)
    peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await peer.goaway_then_eof() == F.PROTOCOL_ERROR
    peer = await RawPeer.open(port, preface=False)
    peer.send(F.PREFACE + F.ping(b"12345678"))
    assert await peer.goaway_then_eof() == F.PROTOCOL_ERROR


async def test_stream_errors_reset_only_that_stream(server):
    port, conns = await server(stream_window=100)
    # The peer gives no window, so the echo cannot pass the data on nor return window.
    peer = await RawPeer.open(port, settings=[(F.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    peer.send(peer.headers(1) + F.data(1, b"x" * 60) + F.data(1, b"x" * 60))  # 120 > 100
    _, _, sid, payload = await peer.until(F.RST_STREAM)
    assert sid == 1 and F.parse_rst_stream(payload) == F.FLOW_CONTROL_ERROR
    peer.send(F.frame(F.PRIORITY, 0, 3, (3).to_bytes(4, "big") + b"\0"))  # depends on itself
    _, _, sid, payload = await peer.until(F.RST_STREAM)
    assert sid == 3 and F.parse_rst_stream(payload) == F.PROTOCOL_ERROR
    peer.send(peer.headers(5, end=True))
    ftype, flags, sid, _ = await peer.until(F.HEADERS)
    assert sid == 5
    assert not conns[0].closed


async def test_padded_data_is_stripped_and_counted(server):
    port, _ = await server()
    peer = await RawPeer.open(port)
    payload = bytes([4]) + b"hello" + b"\0" * 4
    peer.send(peer.headers(1) + F.frame(F.DATA, F.FLAG_PADDED | F.FLAG_END_STREAM, 1, payload))
    _, _, _, data = await peer.until(F.DATA)
    assert data == b"hello"


async def test_send_side_respects_the_peer_window(server):
    """The peer allows 10 octets per stream: the echo goes out in window-sized pieces, each only
    after a WINDOW_UPDATE, and the trailers wait behind the data."""
    port, _ = await server()
    peer = await RawPeer.open(port, settings=[(F.SETTINGS_INITIAL_WINDOW_SIZE, 10)])
    peer.send(peer.headers(1) + F.data(1, b"abcdefghijklmnopqrstuvwxy", True))
    got = b""
    _, _, _, data = await peer.until(F.DATA)
    got += data
    assert got == b"abcdefghij"
    peer.send(F.window_update(1, 10))
    _, _, _, data = await peer.until(F.DATA)
    got += data
    assert got == b"abcdefghijklmnopqrst"
    peer.send(F.window_update(1, 100))
    _, _, _, data = await peer.until(F.DATA)
    assert got + data == b"abcdefghijklmnopqrstuvwxy"
    ftype, flags, sid, _ = await peer.until(F.HEADERS)
    assert flags & F.FLAG_END_STREAM


async def test_window_updates_return_consumed_data(server):
    """Data the server consumed comes back as WINDOW_UPDATE before the window runs out."""
    port, _ = await server(stream_window=1000, conn_window=65535)
    peer = await RawPeer.open(port)
    peer.send(peer.headers(1))
    for _ in range(3):
        peer.send(F.data(1, b"y" * 400))
    updates = {}
    while sum(updates.values()) < 2 * 400 or 1 not in updates:
        ftype, _, sid, payload = await peer.frame()
        if ftype == F.WINDOW_UPDATE:
            updates[sid] = updates.get(sid, 0) + F.parse_window_update(payload, sid)
    assert updates[1] >= 500


class Collect:
    def __init__(self):
        self.heads, self.data, self.resets = [], b"", []
        self.done = asyncio.get_running_loop().create_future()

    def on_headers(self, st, fields, end):
        self.heads.append(list(fields))
        if end and not self.done.done():
            self.done.set_result(True)

    def on_data(self, st, data, end):
        self.data += data

    def on_sent(self, st, n):
        pass

    def on_reset(self, st, code):
        self.resets.append(code)
        if not self.done.done():
            self.done.set_result(False)


async def test_client_role_against_server_role(server):
    port, _ = await server()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: H2Connection(client=True), "127.0.0.1", port)
    results = []
    for i in range(3):  # several streams at once on one connection
        c = Collect()
        st = client.open_stream(c)
        client.send_headers(st, REQ)
        client.send_data(st, b"m%d" % i * 50000, True)  # beyond the default 65535 windows
        results.append((c, b"m%d" % i * 50000))
    for c, want in results:
        assert await asyncio.wait_for(c.done, 5)
        assert c.data == want
        assert c.heads[0] == [(b":status", b"200")] and c.heads[-1] == [(b"grpc-status", b"0")]
    client.close()


async def test_goaway_refuses_streams_above_last_id(server):
    """A peer's GOAWAY: streams it will not process are reset REFUSED_STREAM (safe to retry);
    the connection takes no new ones and closes when the rest are done."""
    loop = asyncio.get_running_loop()
    got = asyncio.Queue()

    async def fake_server(reader, writer):
        writer.write(F.settings())
        await reader.readexactly(24)
        writer.write(F.goaway(1, F.NO_ERROR))
        await got.put(True)
        await asyncio.sleep(5)

    srv = await asyncio.start_server(fake_server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(lambda: H2Connection(client=True), "127.0.0.1", port)
    c1, c3 = Collect(), Collect()
    s1, s3 = client.open_stream(c1), client.open_stream(c3)
    client.send_headers(s1, REQ)
    client.send_headers(s3, REQ)
    await asyncio.wait_for(got.get(), 5)
    assert await asyncio.wait_for(c3.done, 5) is False and c3.resets == [F.REFUSED_STREAM]
    assert client.goaway_received == 1
    client.reset(s1)
    await asyncio.wait_for(c1.done if c1.resets else asyncio.sleep(0), 5)
    for _ in range(50):
        if client.closed:
            break
        await asyncio.sleep(0.01)
    assert client.closed
    srv.close()


async def test_connection_loss_resets_streams_as_lost(server):
    port, conns = await server()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: H2Connection(client=True), "127.0.0.1", port)
    c = Collect()
    st = client.open_stream(c)
    client.send_headers(st, REQ)
    for _ in range(100):
        if conns and conns[0].streams:
            break
        await asyncio.sleep(0.01)
    conns[0].transport.abort()
    assert await asyncio.wait_for(c.done, 5) is False
    assert c.resets == [LOST]


async def test_dropped_queued_data_is_reported_so_its_source_gets_window_back(server):
    """The peer gives no window, so the echo queues; when the peer resets the stream, the
    queued octets are reported through on_sent (the proxy credits them to the other side)."""
    port, conns = await server()
    sent = []
    peer = await RawPeer.open(port, settings=[(F.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    peer.send(peer.headers(1) + F.data(1, b"q" * 3000))
    await peer.until(F.HEADERS)
    for _ in range(100):
        if conns and conns[0].streams and conns[0].streams[1].pending:
            break
        await asyncio.sleep(0.01)
    st = conns[0].streams[1]
    echo = st.handler
    echo.on_sent = lambda s, n: sent.append(n)
    peer.send(F.rst_stream(1, F.CANCEL))
    for _ in range(100):
        if sent:
            break
        await asyncio.sleep(0.01)
    assert sent == [3000] and conns[0].resets == [F.CANCEL]


async def test_data_before_response_headers_is_a_stream_error():
    """A server that sends DATA before HEADERS on a stream breaks gRPC framing: that stream is
    reset PROTOCOL_ERROR, the connection lives on."""
    loop = asyncio.get_running_loop()

    async def bad_server(reader, writer):
        writer.write(F.settings())
        await reader.readexactly(24)
        writer.write(F.data(1, b"early"))
        await asyncio.sleep(5)

    srv = await asyncio.start_server(bad_server, "127.0.0.1", 0)
    _, client = await loop.create_connection(lambda: H2Connection(client=True), "127.0.0.1",
                                             srv.sockets[0].getsockname()[1])
    c = Collect()
    st = client.open_stream(c)
    client.send_headers(st, REQ)
    assert await asyncio.wait_for(c.done, 5) is False
    assert c.resets == [F.PROTOCOL_ERROR] and c.data == b"" and not client.closed
    client.close()
    srv.close()


async def test_rapid_reset_flood_ends_the_connection(server):
    """Open a stream, reset it, again and again: after RESET_FLOOD such streams (more than half
    of all), the server answers GOAWAY ENHANCE_YOUR_CALM."""
    from sidecar.h2.connection import RESET_FLOOD
    port, conns = await server()
    peer = await RawPeer.open(port)
    burst = b"".join(peer.headers(sid) + F.rst_stream(sid, F.CANCEL)
                     for sid in range(1, 2 * (RESET_FLOOD + 10), 2))
    peer.send(burst)
    assert await peer.goaway_then_eof() == F.ENHANCE_YOUR_CALM
    assert conns[0].peer_resets == RESET_FLOOD


async def test_cancelling_some_calls_is_fine(server):
    port, conns = await server()
    peer = await RawPeer.open(port)
    frames_out = []
    for i, sid in enumerate(range(1, 4 * RESET_FLOOD_FOR_TEST, 2)):
        frames_out.append(peer.headers(sid, end=True) if i % 3 else peer.headers(sid) + F.rst_stream(sid, F.CANCEL))
    peer.send(b"".join(frames_out))
    peer.send(F.ping(b"finished"))
    for _ in range(5000):
        ftype, flags, _, payload = await peer.frame()
        assert ftype != F.GOAWAY
        if ftype == F.PING and payload == b"finished":
            break
    assert payload == b"finished" and not conns[0].closed


RESET_FLOOD_FOR_TEST = 300
