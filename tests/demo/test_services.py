"""The demo services, in-process on loopback with OS-assigned ports and no mesh in between.

Covers every users call kind, products' HTTP API, CreateOrder end to end, the error paths,
trace continuation from a caller's traceparent, and that each `main` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from demo.orders.v1 import orders_pb2, orders_pb2_grpc
from demo.services import SERVICES, orders, products, users
from demo.users.v1 import users_pb2, users_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0  # upper bound for every wait in this file

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Spans the services create, whatever global provider the session already installed."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        from protomesh.telemetry import setup_tracing

        provider = setup_tracing("demo-services-test", None, 1.0)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def wait_for_spans(exporter, predicate, minimum=1):
    """Finished spans matching predicate; polls with a bound instead of sleeping blindly."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        found = [s for s in exporter.get_finished_spans() if predicate(s)]
        if len(found) >= minimum or loop.time() > deadline:
            return found
        await asyncio.sleep(0.01)


@pytest.fixture
async def users_server():
    server = await users.start("127.0.0.1:0", replica="users-a")
    yield server
    await server.stop(grace=1)


@pytest.fixture
async def products_server():
    server = await products.start("127.0.0.1:0", replica="products-a")
    yield server
    await server.stop()


@pytest.fixture
async def orders_server(users_server, products_server):
    server = await orders.start(
        "127.0.0.1:0",
        replica="orders-a",
        users=f"127.0.0.1:{users_server.port}",
        products=f"127.0.0.1:{products_server.port}",
    )
    yield server
    await server.stop(grace=1)


@pytest.fixture
async def users_stub(users_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{users_server.port}") as channel:
        yield users_pb2_grpc.UsersStub(channel)


@pytest.fixture
async def orders_stub(orders_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orders_server.port}") as channel:
        yield orders_pb2_grpc.OrdersStub(channel)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


# --- users: all four call kinds -------------------------------------------------------------


async def test_get_user_unary_reports_replica(users_stub):
    call = users_stub.GetUser(users_pb2.GetUserRequest(id="3"), timeout=WAIT)
    user = await call
    assert (user.id, user.name, user.served_by) == ("3", "Grace Hopper", "users-a")
    assert ("x-served-by", "users-a") in tuple(await call.trailing_metadata())


async def test_get_user_unknown_id_is_not_found(users_stub):
    call = users_stub.GetUser(users_pb2.GetUserRequest(id="99"), timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "user '99' not found" in info.value.details()
    assert ("x-served-by", "users-a") in tuple(info.value.trailing_metadata())


async def test_list_users_server_streaming(users_stub):
    ids = [u.id async for u in users_stub.ListUsers(users_pb2.ListUsersRequest(), timeout=WAIT)]
    assert ids == ["1", "2", "3", "4", "5"]
    limited = users_stub.ListUsers(users_pb2.ListUsersRequest(page_size=2), timeout=WAIT)
    assert [u.served_by async for u in limited] == ["users-a", "users-a"]


async def test_create_users_client_streaming(users_stub):
    async def batch():
        for name in ("Ken Thompson", "Dennis Ritchie", "Margaret Hamilton"):
            yield users_pb2.CreateUserRequest(name=name, email=f"{name.split()[0].lower()}@example.com")

    summary = await users_stub.CreateUsers(batch(), timeout=WAIT)
    assert summary.created_count == 3
    assert summary.served_by == "users-a"
    assert [u.id for u in summary.users] == ["6", "7", "8"]
    fetched = await users_stub.GetUser(users_pb2.GetUserRequest(id="7"), timeout=WAIT)
    assert fetched.name == "Dennis Ritchie"


async def test_create_users_rejects_the_whole_batch_on_a_bad_message(users_stub):
    async def batch():
        yield users_pb2.CreateUserRequest(name="ok")
        yield users_pb2.CreateUserRequest(name="  ")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await users_stub.CreateUsers(batch(), timeout=WAIT)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "message #2" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError):
        await users_stub.GetUser(users_pb2.GetUserRequest(id="6"), timeout=WAIT)


async def test_chat_bidi_answers_each_message_before_the_next_is_sent(users_stub):
    call = users_stub.Chat(timeout=WAIT)
    for seq, text in enumerate(("hello", "mesh", "bye"), start=1):
        await call.write(users_pb2.ChatRequest(text=text))
        reply = await call.read()
        assert (reply.text, reply.seq, reply.served_by) == (text, seq, "users-a")
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def test_users_health_is_serving(users_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{users_server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service="demo.users.v1.Users"), timeout=WAIT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- products: HTTP/JSON ----------------------------------------------------------------------


async def test_products_list_and_get(products_server, http):
    base = f"http://127.0.0.1:{products_server.port}"
    async with http.get(f"{base}/v1/products") as resp:
        assert resp.status == 200
        assert resp.headers["x-served-by"] == "products-a"
        listed = await resp.json()
    assert [p["id"] for p in listed] == ["p1", "p2", "p3", "p4", "p5"]
    async with http.get(f"{base}/v1/products/p2") as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "id": "p2", "name": "Trackball mouse", "price_cents": 4500, "served_by": "products-a",
        }


async def test_products_unknown_id_is_404_with_json_error(products_server, http):
    async with http.get(f"http://127.0.0.1:{products_server.port}/v1/products/nope") as resp:
        assert resp.status == 404
        assert resp.headers["x-served-by"] == "products-a"
        body = await resp.json()
    assert body["error"]["status"] == "NOT_FOUND"
    assert "product 'nope' not found" in body["error"]["message"]


async def test_products_create_and_reject_malformed(products_server, http):
    base = f"http://127.0.0.1:{products_server.port}/v1/products"
    async with http.post(base, json={"name": "Headset", "price_cents": 5900}) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert created["name"] == "Headset" and created["id"]
    async with http.get(f"{base}/{created['id']}") as resp:
        assert (await resp.json())["price_cents"] == 5900

    bad_bodies = {
        b"{not json": "malformed JSON",
        b'{"name": "x", "price_cents": "lots"}': "price_cents",
        b'{"price_cents": 1}': "name",
    }
    for raw, reason in bad_bodies.items():
        async with http.post(base, data=raw, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, raw
            body = await resp.json()
        assert body["error"]["status"] == "INVALID_ARGUMENT"
        assert reason in body["error"]["message"], (raw, body)


# --- orders: end to end ------------------------------------------------------------------------


async def test_create_order_end_to_end(orders_stub):
    call = orders_stub.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id="1", product_id="p3", quantity=2), timeout=WAIT
    )
    order = await call
    assert order.user.name == "Ada Lovelace"
    assert order.user.served_by == "users-a"
    assert (order.product_name, order.unit_price_cents) == ("27-inch monitor", 27900)
    assert order.total_cents == 2 * 27900
    assert order.served_by == "orders-a"
    assert ("x-served-by", "orders-a") in tuple(await call.trailing_metadata())

    again = await orders_stub.GetOrder(orders_pb2.GetOrderRequest(id=order.id), timeout=WAIT)
    assert again.total_cents == order.total_cents and again.user.id == "1"


@pytest.mark.parametrize(
    ("user_id", "product_id", "quantity", "code", "words"),
    [
        ("42", "p1", 1, grpc.StatusCode.NOT_FOUND, ("users.GetUser", "user '42' not found")),
        ("1", "p42", 1, grpc.StatusCode.NOT_FOUND, ("products", "HTTP 404", "product 'p42' not found")),
        ("1", "p1", 0, grpc.StatusCode.INVALID_ARGUMENT, ("quantity",)),
    ],
)
async def test_create_order_failures_name_the_cause(orders_stub, user_id, product_id, quantity, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await orders_stub.CreateOrder(
            orders_pb2.CreateOrderRequest(user_id=user_id, product_id=product_id, quantity=quantity),
            timeout=WAIT,
        )
    assert info.value.code() is code
    for word in words:
        assert word in info.value.details()


async def test_create_order_with_dependencies_down_is_unavailable(users_server):
    # Ports that were just bound and released: nothing listens there any more.
    dead_users = await users.start("127.0.0.1:0", replica="gone")
    dead_users_port = dead_users.port
    await dead_users.stop(grace=0)
    dead_products = await products.start("127.0.0.1:0", replica="gone")
    dead_products_port = dead_products.port
    await dead_products.stop()

    server = await orders.start(
        "127.0.0.1:0", replica="orders-b",
        users=f"127.0.0.1:{users_server.port}", products=f"127.0.0.1:{dead_products_port}",
    )
    server2 = await orders.start(
        "127.0.0.1:0", replica="orders-c",
        users=f"127.0.0.1:{dead_users_port}", products=f"127.0.0.1:{dead_products_port}",
    )
    try:
        for srv, names in ((server, ("products",)), (server2, ("users.GetUser", "products"))):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = orders_pb2_grpc.OrdersStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.CreateOrder(
                        orders_pb2.CreateOrderRequest(user_id="1", product_id="p1", quantity=1),
                        timeout=WAIT,
                    )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            for name in names:
                assert name in info.value.details()
    finally:
        await server.stop(grace=0)
        await server2.stop(grace=0)


async def test_create_order_forwards_the_callers_deadline_to_users(products_server):
    seen: list[float | None] = []

    class RecordingUsers(users_pb2_grpc.UsersServicer):
        async def GetUser(self, request, context):
            seen.append(context.time_remaining())
            return users_pb2.User(id=request.id, name="Deadline Tester", served_by="recorder")

    fake = grpc.aio.server()
    users_pb2_grpc.add_UsersServicer_to_server(RecordingUsers(), fake)
    fake_port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    server = await orders.start(
        "127.0.0.1:0", replica="orders-d",
        users=f"127.0.0.1:{fake_port}", products=f"127.0.0.1:{products_server.port}",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            order = await orders_pb2_grpc.OrdersStub(channel).CreateOrder(
                orders_pb2.CreateOrderRequest(user_id="1", product_id="p1", quantity=1), timeout=2.5
            )
        assert order.user.served_by == "recorder"
        assert len(seen) == 1 and seen[0] is not None
        # The caller's budget, not orders' 5 s default. grpc rounds the grpc-timeout header
        # up at each hop, hence the small allowance above 2.5 s.
        assert 0 < seen[0] <= 2.6, seen
    finally:
        await server.stop(grace=0)
        await fake.stop(0)


async def test_get_order_unknown_is_not_found(orders_stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await orders_stub.GetOrder(orders_pb2.GetOrderRequest(id="missing"), timeout=WAIT)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "order 'missing' not found" in info.value.details()


# --- tracing -------------------------------------------------------------------------------------


def _hex_trace(span) -> str:
    return format(span.context.trace_id, "032x")


async def test_users_continues_the_callers_trace(spans, users_stub):
    await users_stub.GetUser(
        users_pb2.GetUserRequest(id="2"), timeout=WAIT, metadata=(("traceparent", TRACEPARENT),)
    )
    found = await wait_for_spans(
        spans, lambda s: s.name == "demo.users.v1.Users/GetUser" and _hex_trace(s) == TRACE_ID
    )
    assert found, [s.name for s in spans.get_finished_spans()]
    span = found[0]
    assert span.kind is SpanKind.SERVER
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == "demo.users.v1.Users"
    assert span.attributes["rpc.method"] == "GetUser"
    assert span.attributes["rpc.grpc.status_code"] == 0


async def test_products_continues_the_callers_trace(spans, products_server, http):
    url = f"http://127.0.0.1:{products_server.port}/v1/products/nope"
    async with http.get(url, headers={"traceparent": TRACEPARENT}) as resp:
        assert resp.status == 404
    found = await wait_for_spans(
        spans, lambda s: s.name == "GET /v1/products/{id}" and _hex_trace(s) == TRACE_ID
    )
    assert found, [s.name for s in spans.get_finished_spans()]
    span = found[0]
    assert span.kind is SpanKind.SERVER
    assert span.attributes["http.route"] == "/v1/products/{id}"
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.response.status_code"] == 404


async def test_create_order_is_one_trace_across_all_three_services(spans, orders_stub):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    await orders_stub.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id="4", product_id="p1", quantity=1),
        timeout=WAIT,
        metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),),
    )
    wanted = {"demo.orders.v1.Orders/CreateOrder", "demo.users.v1.Users/GetUser", "GET /v1/products/{id}"}
    found = await wait_for_spans(
        spans,
        lambda s: s.kind is SpanKind.SERVER and s.name in wanted and _hex_trace(s) == trace_id,
        minimum=3,
    )
    by_name = {s.name: s for s in found}
    assert set(by_name) == wanted, [s.name for s in spans.get_finished_spans()]
    orders_span = by_name["demo.orders.v1.Orders/CreateOrder"]
    assert format(orders_span.parent.span_id, "016x") == "b7ad6b7169203331"
    # users and products are children of orders' CLIENT spans, which are children of CreateOrder.
    client_spans = {
        s.context.span_id: s for s in spans.get_finished_spans()
        if s.kind is SpanKind.CLIENT and _hex_trace(s) == trace_id
    }
    for name in ("demo.users.v1.Users/GetUser", "GET /v1/products/{id}"):
        client = client_spans[by_name[name].parent.span_id]
        assert client.parent.span_id == orders_span.context.span_id


# --- process entry points ------------------------------------------------------------------------

RUN_SERVICE = "import sys; from demo.services import SERVICES; sys.exit(SERVICES[sys.argv[1]](sys.argv[2:]))"


def test_services_registry():
    assert SERVICES == {"users": users.main, "orders": orders.main, "products": products.main}


@pytest.mark.parametrize("name", ["users", "orders", "products"])
async def test_main_serves_until_sigterm_then_exits_zero(name):
    proc = await asyncio.create_subprocess_exec(
        # Dispatch through SERVICES exactly as `protomesh service <name>` does.
        sys.executable, "-c", RUN_SERVICE, name, "--listen", "127.0.0.1:0", "--replica", f"{name}-proc",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        assert f"{name} replica={name}-proc listening on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        stderr = (await asyncio.wait_for(proc.stderr.read(), WAIT)).decode()
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_main_on_a_taken_port_exits_1_without_traceback(users_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_SERVICE, "users", "--listen", f"127.0.0.1:{users_server.port}",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert "cannot listen" in err.decode() and "Traceback" not in err.decode()
