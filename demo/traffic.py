"""Real traffic through the gateway: HTTP, HTTP/JSON transcoded to gRPC (unary, a JSON body, an
NDJSON stream) and all four gRPC call kinds, each call its own trace.

Every call is wrapped in a client span of the `demo-client` service, so the summary can name the
trace id of each request and the trace shows the whole path from the first hop.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind

from demo.orders.v1 import orders_pb2, orders_pb2_grpc
from demo.users.v1 import users_pb2, users_pb2_grpc


@dataclass
class Outcome:
    route: str
    status: str
    ms: float
    served_by: str
    trace_id: str


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, route, status, started, served_by, trace_id):
        self.outcomes.append(Outcome(route, str(status), (time.perf_counter() - started) * 1000, served_by, trace_id))

    def by_route(self) -> dict[str, list[Outcome]]:
        out = defaultdict(list)
        for o in self.outcomes:
            out[o.route].append(o)
        return dict(out)

    def served(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for o in self.outcomes:
            for who in o.served_by.split(","):
                if who:
                    out[who.rsplit("-", 1)[0]][who] += 1
        return dict(out)


def _span(tracer, name: str):
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT)


def _trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


class Driver:
    def __init__(self, http_base: str, grpc_target: str, results: Results):
        self.http_base = http_base
        self.grpc_target = grpc_target
        self.results = results
        self.tracer = trace.get_tracer("demo-client")

    async def run(self, rounds: int, concurrency: int = 8) -> None:
        async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(self.grpc_target) as channel:
            users = users_pb2_grpc.UsersStub(channel)
            orders = orders_pb2_grpc.OrdersStub(channel)
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int):
                async with sem:
                    await self.product(http, i)
                    await self.json_get_user(http, i)
                    await self.json_create_order(http, i)
                    await self.get_user(users, i)
                    await self.create_order(orders, i)
                    if i % 5 == 0:
                        await self.list_users(users)
                        await self.json_list_users(http)
                        await self.create_users(users, i)
                        await self.chat(users, i)
            await asyncio.gather(*(one(i) for i in range(rounds)))

    async def product(self, http: aiohttp.ClientSession, i: int) -> None:
        pid = "p999" if i % 25 == 24 else f"p{i % 3 + 1}"  # an unknown id now and then: a real 404
        with _span(self.tracer, "GET /v1/products/{id}"):
            headers: dict = {}
            inject(headers)
            started = time.perf_counter()
            try:
                async with http.get(f"{self.http_base}/v1/products/{pid}", headers=headers) as resp:
                    await resp.read()
                    self.results.add("HTTP GET /v1/products/{id}", resp.status, started,
                                     resp.headers.get("x-served-by", ""), _trace_id())
            except aiohttp.ClientError as exc:
                self.results.add("HTTP GET /v1/products/{id}", type(exc).__name__, started, "", _trace_id())

    async def _json(self, http, route: str, method: str, path: str, served_by, body=None, accept: str = "") -> None:
        """HTTP/JSON through the gateway's transcoder (google.api.http rules of the protos)."""
        with _span(self.tracer, route):
            headers: dict = {"accept": accept} if accept else {}
            inject(headers)
            started = time.perf_counter()
            try:
                async with http.request(method, f"{self.http_base}{path}", json=body, headers=headers) as resp:
                    raw = await resp.read()
                    who = ""
                    if resp.status == 200:
                        try:
                            who = served_by(raw)
                        except (ValueError, KeyError, IndexError):
                            who = ""
                    self.results.add(route, resp.status, started, who, _trace_id())
            except aiohttp.ClientError as exc:
                self.results.add(route, type(exc).__name__, started, "", _trace_id())

    async def json_get_user(self, http, i: int) -> None:
        uid = "42" if i % 25 == 7 else str(i % 5 + 1)  # an unknown id now and then: a transcoded 404
        await self._json(http, "JSON GET /v1/users/{id} (→ gRPC)", "GET", f"/v1/users/{uid}",
                         lambda raw: json.loads(raw)["servedBy"])

    async def json_create_order(self, http, i: int) -> None:
        body = {"userId": str(i % 5 + 1), "productId": f"p{i % 3 + 1}", "quantity": 1 + i % 2}
        await self._json(http, "JSON POST /v1/orders (→ gRPC)", "POST", "/v1/orders",
                         lambda raw: json.loads(raw)["servedBy"], body=body)

    async def json_list_users(self, http) -> None:
        await self._json(http, "JSON GET /v1/users (NDJSON stream)", "GET", "/v1/users?pageSize=5",
                         lambda raw: json.loads(raw.splitlines()[0])["servedBy"], accept="application/x-ndjson")

    async def _grpc(self, route: str, call, served_by):
        with _span(self.tracer, route):
            md: dict = {}
            inject(md)
            started = time.perf_counter()
            try:
                result = await call(tuple(md.items()))
                self.results.add(route, "OK", started, served_by(result), _trace_id())
            except grpc.aio.AioRpcError as err:
                self.results.add(route, err.code().name, started, "", _trace_id())

    async def get_user(self, users, i: int) -> None:
        uid = "42" if i % 25 == 12 else str(i % 5 + 1)  # unknown id now and then: NOT_FOUND
        await self._grpc("gRPC Users/GetUser", lambda md: users.GetUser(
            users_pb2.GetUserRequest(id=uid), metadata=md, timeout=5), lambda r: r.served_by)

    async def list_users(self, users) -> None:
        async def call(md):
            return [u async for u in users.ListUsers(users_pb2.ListUsersRequest(page_size=5), metadata=md, timeout=5)]
        await self._grpc("gRPC Users/ListUsers (server stream)", call, lambda r: r[0].served_by if r else "")

    async def create_users(self, users, i: int) -> None:
        async def requests():
            for j in range(3):
                yield users_pb2.CreateUserRequest(name=f"demo-{i}-{j}", email=f"demo{i}{j}@example.com")
        await self._grpc("gRPC Users/CreateUsers (client stream)",
                         lambda md: users.CreateUsers(requests(), metadata=md, timeout=5), lambda r: r.served_by)

    async def chat(self, users, i: int) -> None:
        async def call(md):
            stream = users.Chat(metadata=md, timeout=5)
            replies = []
            for j in range(3):
                await stream.write(users_pb2.ChatRequest(text=f"hello {i}.{j}"))
                replies.append(await stream.read())
            await stream.done_writing()
            return replies
        await self._grpc("gRPC Users/Chat (bidi stream)", call, lambda r: r[0].served_by if r else "")

    async def create_order(self, orders, i: int) -> None:
        req = orders_pb2.CreateOrderRequest(user_id=str(i % 5 + 1), product_id=f"p{i % 3 + 1}", quantity=1 + i % 3)
        await self._grpc("gRPC Orders/CreateOrder (→ users + products)",
                         lambda md: orders.CreateOrder(req, metadata=md, timeout=5),
                         lambda r: f"{r.served_by},{r.user.served_by}")
