"""The demo orders service (gRPC). CreateOrder fans out through the mesh to users (gRPC) and
products (HTTP/JSON), so one trace shows a gRPC hop and an HTTP hop under the same order.

In the mesh ``--users`` is the local sidecar's outbound gRPC listener and ``--products`` its
outbound HTTP listener; the ``Host: products`` header is how that sidecar picks the route.
``--users xds:///users`` makes the users hop proxyless: grpc's xDS resolver asks the control
server (bootstrap from ``GRPC_XDS_BOOTSTRAP_CONFIG``) and dials the users endpoints itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import quote

import aiohttp
import grpc
from google.protobuf import json_format

from demo.orders.v1 import orders_pb2, orders_pb2_grpc
from demo.products.v1 import products_pb2
from demo.services import runtime, tracing
from demo.users.v1 import users_pb2, users_pb2_grpc

SERVICE_NAME = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name  # demo.orders.v1.Orders
DEFAULT_LISTEN = "127.0.0.1:50052"
DEFAULT_USERS = "127.0.0.1:50051"
DEFAULT_PRODUCTS = "127.0.0.1:8081"
PRODUCTS_HOST = "products"
# Used when the caller set no deadline, so a stuck dependency cannot hold a call forever.
DEFAULT_DEPENDENCY_TIMEOUT = 5.0

# A dependency's gRPC status → the status orders reports. Codes that describe the caller's
# request pass through; anything that is the dependency's own trouble becomes UNAVAILABLE or
# INTERNAL, since the caller can do nothing about, say, orders' credentials towards users.
_PASS_THROUGH = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
}
_AS_UNAVAILABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class DependencyError(Exception):
    """A dependency failed; carries the status orders answers with and a message naming it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _remaining(context: grpc.aio.ServicerContext) -> float:
    """Seconds the caller still allows; the default when it set no deadline."""
    remaining = context.time_remaining()
    # grpc.aio gives None without a deadline; sync grpcio gives a huge number instead.
    if remaining is None or remaining > 1e6:
        return DEFAULT_DEPENDENCY_TIMEOUT
    return max(remaining, 0.0)


class OrdersServicer(orders_pb2_grpc.OrdersServicer):
    def __init__(self, replica: str, users_addr: str, products_addr: str) -> None:
        self.replica = replica
        self._served_by = (("x-served-by", replica),)
        self._users_channel = grpc.aio.insecure_channel(users_addr)
        self._users = users_pb2_grpc.UsersStub(self._users_channel)
        self._products_base = f"http://{products_addr}"
        self._http: aiohttp.ClientSession | None = None
        self._orders: dict[str, orders_pb2.Order] = {}

    def _session(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; keeps connections to products alive.
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30)
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._users_channel.close()

    async def _get_user(self, user_id: str, timeout: float) -> users_pb2.User:
        name = "demo.users.v1.Users/GetUser"
        attrs = {"rpc.system": "grpc", "rpc.service": "demo.users.v1.Users", "rpc.method": "GetUser"}
        with tracing.client_span(name, attrs) as span:
            try:
                user = await self._users.GetUser(
                    users_pb2.GetUserRequest(id=user_id),
                    timeout=timeout,
                    metadata=tracing.outgoing_metadata(),
                )
            except grpc.aio.AioRpcError as err:
                span.set_attribute("rpc.grpc.status_code", err.code().value[0])
                code = err.code()
                if code not in _PASS_THROUGH:
                    code = (
                        grpc.StatusCode.UNAVAILABLE if code in _AS_UNAVAILABLE
                        else grpc.StatusCode.INTERNAL
                    )
                raise DependencyError(
                    code, f"users.GetUser({user_id!r}) failed: {err.code().name}: {err.details()}"
                ) from None
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            return user

    async def _get_product(self, product_id: str, timeout: float) -> products_pb2.Product:
        route = "/v1/products/{id}"
        url = f"{self._products_base}/v1/products/{quote(product_id, safe='')}"
        attrs = {"http.request.method": "GET", "url.full": url, "server.address": PRODUCTS_HOST}
        with tracing.client_span(f"GET {route}", attrs) as span:
            what = f"products GET /v1/products/{product_id}"
            try:
                async with self._session().get(
                    url,
                    headers=tracing.outgoing_headers({"Host": PRODUCTS_HOST, "Accept": "application/json"}),
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    span.set_attribute("http.response.status_code", resp.status)
                    body = await resp.read()
            except asyncio.TimeoutError:
                raise DependencyError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} failed: no answer within {timeout:.3f}s"
                ) from None
            except aiohttp.ClientError as exc:
                raise DependencyError(
                    grpc.StatusCode.UNAVAILABLE, f"{what} failed: {type(exc).__name__}: {exc}"
                ) from None
        if resp.status == 200:
            try:
                return json_format.ParseDict(
                    json.loads(body), products_pb2.Product(), ignore_unknown_fields=True
                )
            except (ValueError, json_format.ParseError) as exc:
                raise DependencyError(
                    grpc.StatusCode.INTERNAL, f"{what} returned an unreadable body: {exc}"
                ) from None
        reason = _http_error_reason(body)
        if resp.status == 404:
            code = grpc.StatusCode.NOT_FOUND
        elif resp.status in (502, 503, 504, 429):
            code = grpc.StatusCode.UNAVAILABLE
        else:
            code = grpc.StatusCode.INTERNAL
        raise DependencyError(code, f"{what} failed: HTTP {resp.status}: {reason}")

    async def CreateOrder(self, request, context):
        context.set_trailing_metadata(self._served_by)
        problems = []
        if not request.user_id:
            problems.append("user_id: must not be empty")
        if not request.product_id:
            problems.append("product_id: must not be empty")
        if request.quantity < 1:
            problems.append(f"quantity: must be at least 1, got {request.quantity}")
        if problems:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems), trailing_metadata=self._served_by
            )
        timeout = _remaining(context)
        results = await asyncio.gather(
            self._get_user(request.user_id, timeout),
            self._get_product(request.product_id, timeout),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, DependencyError):
                raise failure
        if failures:
            # One status has to win; the message keeps every dependency's reason.
            await context.abort(
                failures[0].code, "; ".join(str(f) for f in failures), trailing_metadata=self._served_by
            )
        user, product = results
        order = orders_pb2.Order(
            id=uuid.uuid4().hex[:12],
            user=user,
            product_id=product.id or request.product_id,
            product_name=product.name,
            unit_price_cents=product.price_cents,
            quantity=request.quantity,
            total_cents=product.price_cents * request.quantity,
            served_by=self.replica,
        )
        self._orders[order.id] = order
        return order

    async def GetOrder(self, request, context):
        context.set_trailing_metadata(self._served_by)
        order = self._orders.get(request.id)
        if order is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"order {request.id!r} not found on replica {self.replica} (orders are kept in memory per replica)",
                trailing_metadata=self._served_by,
            )
        out = orders_pb2.Order()
        out.CopyFrom(order)
        out.served_by = self.replica
        return out


def _http_error_reason(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace") or "(empty body)"


async def start(
    listen: str = "127.0.0.1:0",
    replica: str | None = None,
    users: str = DEFAULT_USERS,
    products: str = DEFAULT_PRODUCTS,
) -> runtime.GrpcServer:
    """Start serving in the running loop; the caller owns ``await server.stop()``."""
    servicer = OrdersServicer(replica or runtime.default_replica(), users, products)
    running = await runtime.start_grpc_server(
        listen,
        servicer.replica,
        [SERVICE_NAME],
        lambda server: orders_pb2_grpc.add_OrdersServicer_to_server(servicer, server),
    )
    running.on_stop(servicer.close)
    return running


async def serve(
    listen: str = DEFAULT_LISTEN,
    replica: str | None = None,
    users: str = DEFAULT_USERS,
    products: str = DEFAULT_PRODUCTS,
    *,
    stop: asyncio.Event,
) -> None:
    """Serve until ``stop`` is set, then drain and return."""
    running = await start(listen, replica, users, products)
    host, _ = runtime.parse_hostport(listen)
    runtime.announce("orders", running.replica, host, running.port)
    await runtime.serve_until(stop, running)


def main(argv: list[str] | None = None) -> int:
    parser = runtime.base_parser(
        "orders", DEFAULT_LISTEN, "Demo orders service (gRPC: demo.orders.v1.Orders)."
    )
    parser.add_argument(
        "--users", type=runtime.grpc_target_arg, default=DEFAULT_USERS,
        help=f"HOST:PORT for gRPC calls to users (the sidecar's outbound gRPC listener; default {DEFAULT_USERS}), "
             "or xds:///users to call users proxyless (needs a grpc xDS bootstrap in the environment)",
    )
    parser.add_argument(
        "--products", type=runtime.hostport_arg, default=DEFAULT_PRODUCTS,
        help=f"HOST:PORT for HTTP calls to products, sent with 'Host: products' (default {DEFAULT_PRODUCTS})",
    )
    args = parser.parse_args(argv)
    replica = args.replica or runtime.default_replica()
    return runtime.run_service(
        "orders", args,
        lambda stop: serve(args.listen, replica, args.users, args.products, stop=stop),
    )

