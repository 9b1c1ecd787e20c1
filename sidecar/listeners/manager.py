"""Keeps the running listeners equal to the config: start new ones, drain removed or moved ones.

A listener is identified by name; the same name at the same address and protocol keeps its
socket across updates (only its routes change, through the dataplane), so a route or cluster
change never resets a connection.
"""
from __future__ import annotations

import asyncio
import logging

from sidecar.config.model import Listener, RuntimeConfig
from sidecar.dataplane import Dataplane
from sidecar.listeners import grpc_engine as engines
from sidecar.listeners.http import HttpListener
from sidecar.listeners.tcp import TcpListener
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.h2_pool import H2Pool
from sidecar.upstream.http_pool import HttpPool

log = logging.getLogger("protomesh.sidecar")


class ListenerManager:
    def __init__(self, dataplane: Dataplane, http_pool: HttpPool, grpc_pool: GrpcPool, h2_pool: H2Pool,
                 drain_timeout_s: float = 10.0, reuse_port: bool = False,
                 grpc_engine: str = engines.DEFAULT):
        self.dataplane = dataplane
        self.http_pool = http_pool
        self.grpc_pool = grpc_pool
        self.h2_pool = h2_pool
        self.grpc_engine = grpc_engine
        self.drain_timeout_s = drain_timeout_s
        self.reuse_port = reuse_port
        self.running: dict[str, tuple[Listener, object]] = {}
        self.errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def reconcile(self, config: RuntimeConfig) -> None:
        async with self._lock:
            wanted = config.listeners
            for name, (spec, server) in list(self.running.items()):
                new = wanted.get(name)
                if new is None or (new.host, new.port, new.protocol) != (spec.host, spec.port, spec.protocol):
                    del self.running[name]
                    asyncio.ensure_future(server.drain(self.drain_timeout_s))
                    log.info("listener %s at %s: draining", name, spec.address)
            for name, spec in wanted.items():
                if name in self.running:
                    self.running[name] = (spec, self.running[name][1])
                    continue
                if spec.protocol == "tcp":
                    server = TcpListener(name, self.dataplane)
                elif spec.protocol == "grpc":
                    server = engines.make(self.grpc_engine, name, self.dataplane, self.grpc_pool,
                                         self.h2_pool)
                else:
                    server = HttpListener(name, self.dataplane, self.http_pool, grpc_pool=self.grpc_pool)
                try:
                    await server.start(spec.host, spec.port, reuse_port=self.reuse_port)
                except OSError as exc:
                    self.errors[name] = f"cannot listen on {spec.address}: {exc}"
                    log.error("listener %s: %s", name, self.errors[name])
                    continue
                self.errors.pop(name, None)
                self.running[name] = (spec, server)
                log.info("listener %s: %s on %s", name, spec.protocol, spec.address)

    def serving(self, config: RuntimeConfig) -> bool:
        return bool(config.listeners) and all(n in self.running for n in config.listeners)

    async def drain_all(self, timeout_s: float) -> None:
        servers = [s for _, s in self.running.values()]
        self.running.clear()
        await asyncio.gather(*(s.drain(timeout_s) for s in servers), return_exceptions=True)
