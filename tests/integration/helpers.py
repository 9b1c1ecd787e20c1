"""Small blocking clients for the integration tests (HTTP via urllib, gRPC via grpcio)."""
from __future__ import annotations

import http.client
import json

import grpc

from demo.orders.v1 import orders_pb2, orders_pb2_grpc
from demo.users.v1 import users_pb2, users_pb2_grpc


def http_get(port: int, path: str, headers: dict | None = None, host: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        hdrs = dict(headers or {})
        if host:
            hdrs["Host"] = host
        conn.request("GET", path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def http_json(port: int, path: str, **kw):
    status, headers, body = http_get(port, path, **kw)
    return status, headers, json.loads(body) if body else None


class GrpcClients:
    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.users = users_pb2_grpc.UsersStub(self.channel)
        self.orders = orders_pb2_grpc.OrdersStub(self.channel)

    def get_user(self, uid: str = "1", metadata=(), timeout: float = 5.0):
        return self.users.GetUser(users_pb2.GetUserRequest(id=uid), metadata=metadata, timeout=timeout)

    def create_order(self, metadata=(), timeout: float = 5.0):
        return self.orders.CreateOrder(orders_pb2.CreateOrderRequest(user_id="2", product_id="p1", quantity=2),
                                       metadata=metadata, timeout=timeout)

    def close(self):
        self.channel.close()
