"""Our HTTP/2 gRPC server against a real grpcio client on loopback."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from sidecar.h2.connection import H2Connection, IgnoreStream
from sidecar.h2.grpcserver import GrpcH2Server
from tests.waiting import until

WAIT = 10.0
ident = (lambda b: b)  # noqa: E731  (messages stay bytes on both sides)


class Echo:
    """Answers each message with itself upper-cased; 'boom' raises; 'bye' ends with a status."""

    log: list = []

    def __init__(self, call):
        self.call = call
        Echo.log.append(("open", call.metadata.get("x-who", "")))

    def on_message(self, data: bytes) -> None:
        if data == b"boom":
            raise ZeroDivisionError("a bug")
        if data == b"bye":
            self.call.finish(9, "as you wish")
            return
        self.call.send(data.upper())

    def on_end(self) -> None:
        self.call.finish()

    def on_cancel(self) -> None:
        Echo.log.append(("cancel",))


@pytest.fixture
async def server():
    Echo.log = []
    srv = GrpcH2Server({"/t.Echo/Chat": Echo, "/t.Echo/Once": Echo}, max_message=1000)
    port = await srv.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield srv, channel
    await channel.close()
    await srv.stop(0)


def chat(channel):
    return channel.stream_stream("/t.Echo/Chat", request_serializer=ident, response_deserializer=ident)


async def test_bidi_stream_echoes_in_order_and_ends_ok(server):
    _, channel = server
    call = chat(channel)(metadata=(("x-who", "me"),))
    for word in (b"a", b"bc", b"x" * 900):
        await call.write(word)
        assert await asyncio.wait_for(call.read(), WAIT) == word.upper()
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.OK
    assert Echo.log == [("open", "me")]


async def test_unary_call(server):
    _, channel = server
    once = channel.unary_unary("/t.Echo/Once", request_serializer=ident, response_deserializer=ident)
    assert await asyncio.wait_for(once(b"hi"), WAIT) == b"HI"


async def test_status_chosen_by_the_method_reaches_the_client(server):
    _, channel = server
    call = chat(channel)()
    await call.write(b"bye")
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.FAILED_PRECONDITION
    assert await call.details() == "as you wish"


async def test_unknown_method_is_unimplemented_and_named(server):
    _, channel = server
    other = channel.unary_unary("/t.Echo/Nope", request_serializer=ident, response_deserializer=ident)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(other(b"x"), WAIT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/t.Echo/Nope" in err.value.details()


async def test_compressed_requests_are_refused_with_the_fix(server):
    _, channel = server
    once = channel.unary_unary("/t.Echo/Once", request_serializer=ident, response_deserializer=ident)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(once(b"x", compression=grpc.Compression.Gzip), WAIT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "uncompressed" in err.value.details()


async def test_a_bug_in_the_method_is_internal_and_the_server_keeps_serving(server):
    _, channel = server
    call = chat(channel)()
    await call.write(b"boom")
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in await call.details()
    await until(lambda: ("cancel",) in Echo.log, "the handler to be cancelled")
    await test_unary_call(server)


async def test_oversized_message_is_resource_exhausted(server):
    _, channel = server
    call = chat(channel)()
    await call.write(b"x" * 1001)
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the limit of 1000" in await call.details()


async def test_client_cancel_reaches_the_method(server):
    _, channel = server
    call = chat(channel)()
    await call.write(b"a")
    await asyncio.wait_for(call.read(), WAIT)
    call.cancel()
    await until(lambda: ("cancel",) in Echo.log, "the handler to be cancelled")


async def test_stop_cancels_calls_still_open_after_the_grace(server):
    srv, channel = server
    call = chat(channel)()
    await call.write(b"a")
    await asyncio.wait_for(call.read(), WAIT)
    await srv.stop(0.05)
    await until(lambda: ("cancel",) in Echo.log, "the handler to be cancelled")
    assert await asyncio.wait_for(call.code(), WAIT) != grpc.StatusCode.OK
    await until(lambda: srv.connections == 0, "connections to close")


# ---- keepalive ---------------------------------------------------------------------------------


async def keepalive_server():
    Echo.log = []
    srv = GrpcH2Server({"/t.Echo/Chat": Echo}, keepalive=(0.05, 0.1))
    return srv, await srv.start("127.0.0.1", 0)


async def test_keepalive_pings_a_quiet_peer_and_keeps_one_that_answers():
    srv, port = await keepalive_server()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = chat(channel)()
        await call.write(b"a")
        assert await asyncio.wait_for(call.read(), WAIT) == b"A"
        (conn,) = srv._conns
        await until(lambda: conn.pings_sent >= 3, "three keepalive PINGs")  # grpcio answers them
        await call.write(b"b")
        assert await asyncio.wait_for(call.read(), WAIT) == b"B"
        assert Echo.log == [("open", "")]
    finally:
        await channel.close()
        await srv.stop(0)


async def test_keepalive_closes_a_peer_that_stopped_answering_and_cancels_its_calls():
    srv, port = await keepalive_server()
    try:
        _, client = await asyncio.get_running_loop().create_connection(
            lambda: H2Connection(client=True), "127.0.0.1", port)  # ours: it can be made to stop reading
        st = client.open_stream(IgnoreStream)
        client.send_headers(st, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.Echo/Chat"),
                                 (b":authority", b"t"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
        await until(lambda: Echo.log == [("open", "")], "the call to open")
        client.transport.pause_reading()  # a sidecar whose host vanished: PINGs go unanswered
        await until(lambda: ("cancel",) in Echo.log, "the call to be cancelled")
        await until(lambda: srv.connections == 0, "the connection to be closed")
        client.close()
    finally:
        await srv.stop(0)
