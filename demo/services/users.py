"""The demo users service (gRPC): one rpc of each call kind, so the mesh proves it carries all four.

Every answer names the replica that produced it, in ``served_by`` and in the ``x-served-by``
trailing metadata, so load balancing across replicas is visible from the caller.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from demo.services import runtime
from demo.users.v1 import users_pb2, users_pb2_grpc

SERVICE_NAME = users_pb2.DESCRIPTOR.services_by_name["Users"].full_name  # demo.users.v1.Users
DEFAULT_LISTEN = "127.0.0.1:50051"

SEED_USERS = (
    ("1", "Ada Lovelace", "ada@example.com"),
    ("2", "Alan Turing", "alan@example.com"),
    ("3", "Grace Hopper", "grace@example.com"),
    ("4", "Edsger Dijkstra", "edsger@example.com"),
    ("5", "Barbara Liskov", "barbara@example.com"),
)


class UsersServicer(users_pb2_grpc.UsersServicer):
    """In-memory users; each replica has its own copy of the seed data."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._served_by = (("x-served-by", replica),)
        self._users = {uid: users_pb2.User(id=uid, name=n, email=e) for uid, n, e in SEED_USERS}
        self._next_id = itertools.count(len(SEED_USERS) + 1)

    def _reply(self, user: users_pb2.User) -> users_pb2.User:
        out = users_pb2.User()
        out.CopyFrom(user)
        out.served_by = self.replica
        return out

    async def _abort(self, context, code: grpc.StatusCode, message: str):
        await context.abort(code, message, trailing_metadata=self._served_by)

    async def GetUser(self, request, context):
        context.set_trailing_metadata(self._served_by)
        if not request.id:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "id: must not be empty")
        user = self._users.get(request.id)
        if user is None:
            await self._abort(
                context, grpc.StatusCode.NOT_FOUND, f"user {request.id!r} not found"
            )
        return self._reply(user)

    async def ListUsers(self, request, context) -> AsyncIterator[users_pb2.User]:
        context.set_trailing_metadata(self._served_by)
        if request.page_size < 0:
            await self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be 0 or more"
            )
        users = sorted(self._users.values(), key=lambda u: (len(u.id), u.id))
        if request.page_size:
            users = users[: request.page_size]
        for user in users:
            yield self._reply(user)

    async def CreateUsers(self, request_iterator, context):
        context.set_trailing_metadata(self._served_by)
        # Validate the whole batch before storing any of it: a bad message rejects the batch.
        pending: list[users_pb2.User] = []
        index = 0
        async for req in request_iterator:
            index += 1
            if not req.name.strip():
                await self._abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT,
                    f"message #{index}: name must not be empty",
                )
            pending.append(users_pb2.User(name=req.name, email=req.email))
        created = []
        for user in pending:
            user.id = str(next(self._next_id))
            self._users[user.id] = user
            created.append(self._reply(user))
        return users_pb2.CreateUsersResponse(
            created_count=len(created), users=created, served_by=self.replica
        )

    async def Chat(self, request_iterator, context) -> AsyncIterator[users_pb2.ChatResponse]:
        context.set_trailing_metadata(self._served_by)
        seq = 0
        async for req in request_iterator:
            seq += 1
            yield users_pb2.ChatResponse(text=req.text, seq=seq, served_by=self.replica)


async def start(listen: str = "127.0.0.1:0", replica: str | None = None) -> runtime.GrpcServer:
    """Start serving in the running loop; the caller owns ``await server.stop()``."""
    servicer = UsersServicer(replica or runtime.default_replica())
    return await runtime.start_grpc_server(
        listen,
        servicer.replica,
        [SERVICE_NAME],
        lambda server: users_pb2_grpc.add_UsersServicer_to_server(servicer, server),
    )


async def serve(
    listen: str = DEFAULT_LISTEN, replica: str | None = None, *, stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set, then drain and return."""
    running = await start(listen, replica)
    host, _ = runtime.parse_hostport(listen)
    runtime.announce("users", running.replica, host, running.port)
    await runtime.serve_until(stop, running)


def main(argv: list[str] | None = None) -> int:
    parser = runtime.base_parser(
        "users", DEFAULT_LISTEN, "Demo users service (gRPC: demo.users.v1.Users)."
    )
    args = parser.parse_args(argv)
    replica = args.replica or runtime.default_replica()
    return runtime.run_service(
        "users", args, lambda stop: serve(args.listen, replica, stop=stop)
    )

