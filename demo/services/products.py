"""The demo products service: plain HTTP/JSON on aiohttp, the mesh's non-gRPC workload.

Its API is documented by ``proto/demo/products/v1/products.proto``; the JSON is produced and
parsed with that message (proto field names, e.g. ``price_cents``) so the document cannot
drift from what is served. Every response carries ``x-served-by``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from demo.products.v1 import products_pb2
from demo.services import runtime
from demo.services.tracing import http_tracing_middleware

DEFAULT_LISTEN = "127.0.0.1:8081"

SEED_PRODUCTS = (
    ("p1", "Mechanical keyboard", 8900),
    ("p2", "Trackball mouse", 4500),
    ("p3", "27-inch monitor", 27900),
    ("p4", "USB-C dock", 13900),
    ("p5", "Desk lamp", 3200),
)

_STORE_KEY = web.AppKey("products", dict)
_REPLICA_KEY = web.AppKey("replica", str)


def to_json(product: products_pb2.Product) -> dict[str, Any]:
    return json_format.MessageToDict(
        product, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "status": code, "message": message}}, status=status
    )


def _served(request: web.Request, product: products_pb2.Product) -> dict[str, Any]:
    out = products_pb2.Product()
    out.CopyFrom(product)
    out.served_by = request.app[_REPLICA_KEY]
    return to_json(out)


async def list_products(request: web.Request) -> web.Response:
    store = request.app[_STORE_KEY]
    return web.json_response([_served(request, p) for p in store.values()])


async def get_product(request: web.Request) -> web.Response:
    pid = request.match_info["id"]
    product = request.app[_STORE_KEY].get(pid)
    if product is None:
        return _error(404, "NOT_FOUND", f"product {pid!r} not found")
    return web.json_response(_served(request, product))


def _parse_product(raw: bytes) -> products_pb2.Product:
    """The body of POST /v1/products; ValueError says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    body.pop("served_by", None)
    product = products_pb2.Product()
    try:
        json_format.ParseDict(body, product)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    if not product.name.strip():
        raise ValueError("name: must not be empty")
    if product.price_cents < 0:
        raise ValueError("price_cents: must not be negative")
    return product


def _make_create(next_id: itertools.count):
    async def create_product(request: web.Request) -> web.Response:
        try:
            product = _parse_product(await request.read())
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        store = request.app[_STORE_KEY]
        if not product.id:
            product.id = f"p{next(next_id)}"
            while product.id in store:
                product.id = f"p{next(next_id)}"
        elif product.id in store:
            return _error(409, "ALREADY_EXISTS", f"product {product.id!r} already exists")
        store[product.id] = product
        return web.json_response(
            _served(request, product), status=201,
            headers={"Location": f"/v1/products/{product.id}"},
        )

    return create_product


def make_app(replica: str) -> web.Application:
    @web.middleware
    async def served_by(request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405 for unknown routes
            exc.headers["x-served-by"] = replica
            raise
        response.headers["x-served-by"] = replica
        return response

    app = web.Application(middlewares=[http_tracing_middleware, served_by])
    app[_REPLICA_KEY] = replica
    app[_STORE_KEY] = {
        pid: products_pb2.Product(id=pid, name=name, price_cents=price)
        for pid, name, price in SEED_PRODUCTS
    }
    app.router.add_get("/v1/products", list_products)
    app.router.add_get("/v1/products/{id}", get_product)
    app.router.add_post("/v1/products", _make_create(itertools.count(len(SEED_PRODUCTS) + 1)))
    return app


class HttpServer:
    """A started aiohttp server; ``stop`` lets requests in flight finish."""

    def __init__(self, runner: web.AppRunner, port: int, replica: str) -> None:
        self.runner, self.port, self.replica = runner, port, replica

    async def stop(self, grace: float = 5.0) -> None:
        # ``grace`` is accepted for symmetry with GrpcServer.stop; aiohttp takes its drain
        # time from the runner's shutdown_timeout, fixed when the runner was created.
        await self.runner.cleanup()


async def start(listen: str = "127.0.0.1:0", replica: str | None = None) -> HttpServer:
    """Start serving in the running loop; the caller owns ``await server.stop()``."""
    replica = replica or runtime.default_replica()
    host, port = runtime.parse_hostport(listen)
    runner = web.AppRunner(make_app(replica), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return HttpServer(runner, bound_port, replica)


async def serve(
    listen: str = DEFAULT_LISTEN, replica: str | None = None, *, stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set, then drain and return."""
    running = await start(listen, replica)
    host, _ = runtime.parse_hostport(listen)
    runtime.announce("products", running.replica, host, running.port)
    await runtime.serve_until(stop, running)


def main(argv: list[str] | None = None) -> int:
    parser = runtime.base_parser(
        "products", DEFAULT_LISTEN, "Demo products service (HTTP/JSON: /v1/products)."
    )
    args = parser.parse_args(argv)
    replica = args.replica or runtime.default_replica()
    return runtime.run_service(
        "products", args, lambda stop: serve(args.listen, replica, stop=stop)
    )

