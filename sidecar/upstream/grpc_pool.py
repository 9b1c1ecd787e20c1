"""One grpc.aio channel per upstream endpoint, reused across calls and config swaps.

A channel is an HTTP/2 connection manager (it reconnects by itself); keeping one per endpoint
address lets many concurrent calls multiplex over it, as Envoy does with its H2 pool.
"""
from __future__ import annotations

import grpc

_CHANNEL_OPTIONS = (
    ("grpc.enable_retries", 0),  # retries are the mesh's decision, not the channel's
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.primary_user_agent", "protomesh-sidecar"),
)


class GrpcPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return ch

    async def retain(self, addresses: set[str]) -> None:
        """Close channels to endpoints no longer in any cluster (after a config swap)."""
        for address in [a for a in self._channels if a not in addresses]:
            await self._channels.pop(address).close(grace=5.0)

    def stats(self) -> dict[str, str]:
        return {a: str(ch.get_state(try_to_connect=False)).rsplit(".", 1)[-1]
                for a, ch in self._channels.items()}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels.clear()
