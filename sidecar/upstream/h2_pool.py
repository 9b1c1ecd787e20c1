"""Pooled, multiplexed HTTP/2 client connections per upstream endpoint (the h2 gRPC engine).

Why multiplexed: one connection carries many calls at once, as Envoy's H2 pool does; another
connection to the same endpoint is opened only when every open one is at the peer's
SETTINGS_MAX_CONCURRENT_STREAMS.  A connection that received GOAWAY takes no new streams and
leaves the pool; its streams still in flight finish on it.

The hot path (`ready`) is synchronous: when a connection with room exists the proxy opens its
stream inside the same callback.  Only a connect goes through a coroutine (`connect`), shared by
every call that waits for the same endpoint.
"""
from __future__ import annotations

import asyncio

from sidecar.h2.connection import H2Connection


class UpstreamH2(H2Connection):
    """The client role towards one endpoint."""

    def __init__(self, pool: "H2Pool", address: str):
        super().__init__(client=True, max_concurrent_streams=100)
        self.pool = pool
        self.address = address

    def has_room(self) -> bool:
        return (not self.closed and self.goaway_received is None and self.goaway_sent is None
                and len(self.streams) < self.peer_max_streams)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self.pool._forget(self)

    def on_closed(self) -> None:
        self.pool._forget(self)


class H2Pool:
    def __init__(self, max_connections_per_endpoint: int = 16):
        self.max_per_endpoint = max_connections_per_endpoint
        self._conns: dict[str, list[UpstreamH2]] = {}
        self._connecting: dict[str, asyncio.Future] = {}

    def ready(self, address: str) -> UpstreamH2 | None:
        """An open connection with room for one more stream, or None (then `connect`)."""
        conns = self._conns.get(address)
        if conns:
            for c in conns:
                if c.has_room():
                    return c
        return None

    async def connect(self, address: str, timeout_s: float) -> UpstreamH2:
        """A connection with room, opening one if needed; concurrent callers share one
        connect.  Raises OSError (refused, unreachable, closed at once) or asyncio.TimeoutError."""
        for _ in range(3):
            conn = self.ready(address)
            if conn is not None:
                return conn
            conns = self._conns.get(address)
            if conns and len(conns) >= self.max_per_endpoint:
                return min(conns, key=lambda c: len(c.streams))  # at the cap: the peer may refuse
            fut = self._connecting.get(address)
            if fut is None:
                fut = asyncio.ensure_future(self._open(address, timeout_s))
                self._connecting[address] = fut
                fut.add_done_callback(lambda f, a=address: self._connecting.pop(a, None))
            conn = await asyncio.shield(fut)
            if conn.has_room():
                return conn
        raise ConnectionError(f"connections to {address} close as soon as they open")

    async def _open(self, address: str, timeout_s: float) -> UpstreamH2:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamH2(self, address), host.strip("[]"), int(port)), timeout_s)
        self._conns.setdefault(address, []).append(conn)
        return conn

    def _forget(self, conn: UpstreamH2) -> None:
        conns = self._conns.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.address]

    async def retain(self, addresses: set[str]) -> None:
        """Drain connections to endpoints no longer in any cluster (after a config swap)."""
        for address in [a for a in self._conns if a not in addresses]:
            for conn in self._conns.pop(address):
                conn.goaway()

    def stats(self) -> dict[str, str]:
        return {a: f"{len(cs)} connections, {sum(len(c.streams) for c in cs)} streams"
                for a, cs in self._conns.items()}

    async def close(self) -> None:
        for conns in list(self._conns.values()):
            for conn in conns:
                conn.close()
        self._conns.clear()
