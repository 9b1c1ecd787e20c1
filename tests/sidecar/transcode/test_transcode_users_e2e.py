"""End to end against the real demo users service (in-process grpc.aio, loopback, OS port):
the bytes request_message builds are what the service expects, and its replies and statuses
come back as the JSON an HTTP client should see."""
from __future__ import annotations

import json

import grpc
import pytest

from demo.services import users
from sidecar.transcode import Transcoder
from tests.sidecar.transcode.protoset import DEMO_SERVICES, demo_set

WAIT = 10.0


@pytest.fixture
async def users_channel():
    server = await users.start("127.0.0.1:0", replica="users-t")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


async def unary(channel, path, payload: bytes):
    """What the gateway will do: a generic bytes call, then transcode the reply or the status."""
    call = channel.unary_unary(path)
    try:
        return 200, await call(payload, timeout=WAIT)
    except grpc.aio.AioRpcError as err:
        details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
        return err.code().value[0], (err.details(), details)


async def test_users_over_http_json(users_channel):
    t = Transcoder.from_descriptor_set(demo_set(), DEMO_SERVICES)

    m = t.match("GET", "/v1/users/2")
    code, reply = await unary(users_channel, m.grpc_path, t.request_message(m, "", b"", ""))
    assert code == 200
    ctype, body = t.response_body(m, reply)
    assert ctype == "application/json"
    assert json.loads(body) == {"id": "2", "name": "Alan Turing", "email": "alan@example.com", "servedBy": "users-t"}

    m = t.match("GET", "/v1/users/nobody")
    code, (message, details) = await unary(users_channel, m.grpc_path, t.request_message(m, "", b"", ""))
    status, ctype, body = t.error_body(code, message, details)
    assert (status, ctype) == (404, "application/json")
    assert json.loads(body) == {"code": 5, "message": "user 'nobody' not found", "details": []}

    # Server streaming with a query parameter, as NDJSON and as SSE.
    m = t.match("GET", "/v1/users")
    request = t.request_message(m, "page_size=2", b"", "")
    stream = users_channel.unary_stream(m.grpc_path)
    frames = [t.stream_frame(m, msg, sse=False) async for msg in stream(request, timeout=WAIT)]
    assert [json.loads(f)["id"] for f in frames] == ["1", "2"] and all(f.endswith(b"\n") for f in frames)
    events = [t.stream_frame(m, msg, sse=True) async for msg in stream(t.request_message(m, "pageSize=1", b"", ""),
                                                                       timeout=WAIT)]
    assert len(events) == 1 and events[0].startswith(b'data: {"id":"1",') and events[0].endswith(b"\n\n")

    code, (message, details) = await unary_stream_error(users_channel, m.grpc_path, t.request_message(m, "pageSize=-1", b"", ""))
    assert t.error_body(code, message, details)[0] == 400

    # Client streaming: a JSON array body is the stream of request messages.
    m = t.match("POST", "/v1/users:batch")
    msgs = t.request_messages(m, "", b'[{"name": "Kristen Nygaard"}, {"name": "Ole-Johan Dahl", "email": "o@x"}]',
                              "application/json")
    call = users_channel.stream_unary(m.grpc_path)
    reply = await call(iter(msgs), timeout=WAIT)
    out = json.loads(t.response_body(m, reply)[1])
    assert out["createdCount"] == 2 and [u["name"] for u in out["users"]] == ["Kristen Nygaard", "Ole-Johan Dahl"]


async def unary_stream_error(channel, path, payload):
    try:
        async for _ in channel.unary_stream(path)(payload, timeout=WAIT):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code().value[0], (err.details(), None)
    raise AssertionError("expected the stream to fail")
