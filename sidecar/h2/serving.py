"""What every listening side of our HTTP/2 shares (the gateway's gRPC listener, the gRPC server):
the connections it accepted, and a graceful drain of them."""
from __future__ import annotations

import asyncio


class Serving:
    """Mixed into a listener: its connections report `connection_opened` / `connection_closed`."""

    def __init__(self) -> None:
        self._server: asyncio.AbstractServer | None = None
        self._conns: set = set()
        self._all_closed: asyncio.Event | None = None

    def connection_opened(self, conn) -> None:
        self._conns.add(conn)

    def connection_closed(self, conn) -> None:
        self._conns.discard(conn)
        if not self._conns and self._all_closed is not None:
            self._all_closed.set()

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def drain_connections(self, timeout_s: float) -> None:
        """Stop accepting, GOAWAY to every client, let streams in flight finish for up to
        `timeout_s`, then close what is left (its streams see the connection lost)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._all_closed = asyncio.Event()
        for conn in list(self._conns):
            conn.goaway()
        if self._conns and timeout_s > 0:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        for conn in list(self._conns):
            conn.close()
