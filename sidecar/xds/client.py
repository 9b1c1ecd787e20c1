"""ADS (state of the world) client: subscribe, ACK or NACK each response, reconnect with jitter.

The stream is the sidecar's registration too: the node metadata announces the service, and the
control server keeps this sidecar as an endpoint while the stream lives.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from protomesh import xdstypes
from sidecar.config.errors import ConfigError
from sidecar.config.model import RuntimeConfig
from sidecar.xds.persist import LastGood
from sidecar.xds.store import WILDCARD, Store

log = logging.getLogger("protomesh.sidecar.xds")


def backoff_delays(base: float = 0.2, cap: float = 5.0, rand: Callable[[], float] = random.random):
    """Full-jitter exponential backoff: each delay is uniform in [0, min(cap, base * 2**n)]."""
    n = 0
    while True:
        yield rand() * min(cap, base * (2 ** n))
        n += 1


class XdsClient:
    def __init__(self, node: base_pb2.Node, control: list[str], on_config: Callable[[RuntimeConfig], None],
                 last_good: LastGood | None = None):
        self.node = node
        self.control = control
        self.on_config = on_config
        self.store = Store()
        self.last_good = last_good
        self.connected_to = ""
        self.connects = 0
        self._stop = asyncio.Event()

    # ---- public -----------------------------------------------------------------------------
    def restore(self) -> bool:
        """Serve the persisted last-good config before the control server answers."""
        if self.last_good is None:
            return False
        saved = self.last_good.load()
        if not saved:
            return False
        try:
            for type_url in xdstypes.PUSH_ORDER:
                if type_url in saved:
                    version, resources = saved[type_url]
                    if type_url not in WILDCARD:
                        self.store.types[type_url].names = self.store.wanted_names()[type_url]
                    self.store.apply(type_url, version, resources)
        except ConfigError as exc:
            log.warning("persisted config %s is unusable (%s); waiting for the control server",
                        self.last_good.path, exc)
            self.store = Store()
            return False
        self.on_config(self.store.config())
        return True

    async def run(self) -> None:
        delays = backoff_delays()
        index = 0
        while not self._stop.is_set():
            target = self.control[index % len(self.control)]
            index += 1
            try:
                await self._session(target)
                delays = backoff_delays()  # a stream that worked resets the backoff
            except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.info("xds stream to %s ended: %s", target, detail)
            self.connected_to = ""
            if self._stop.is_set():
                break
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=next(delays))
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()

    # ---- one stream ---------------------------------------------------------------------------
    async def _session(self, target: str) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            first = True
            for type_url in (xdstypes.CLUSTER, xdstypes.LISTENER, xdstypes.ENDPOINT, xdstypes.ROUTE):
                st = self.store.types[type_url]
                if type_url in WILDCARD or st.names:
                    req = self._request(type_url, st.version, "", st.names)
                    if first:
                        req.node.CopyFrom(self.node)
                        first = False
                    outbox.put_nowait(req)

            async def requests():
                while True:
                    item = await outbox.get()
                    if item is None:
                        return
                    yield item

            stream = stub.StreamAggregatedResources(requests())
            stop_task = asyncio.ensure_future(self._stop.wait())
            try:
                self.connected_to = target
                self.connects += 1
                while True:
                    read = asyncio.ensure_future(stream.read())
                    done, _ = await asyncio.wait({read, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                    if stop_task in done:
                        read.cancel()
                        stream.cancel()
                        return
                    response = read.result()
                    if response is grpc.aio.EOF:
                        return
                    self._handle(response, outbox)
            finally:
                stop_task.cancel()
                outbox.put_nowait(None)

    def _handle(self, resp: discovery_pb2.DiscoveryResponse, outbox: asyncio.Queue) -> None:
        type_url = resp.type_url
        state = self.store.types.get(type_url)
        if state is None:
            outbox.put_nowait(self._nack(type_url, "", resp.nonce, (),
                                         f"resource type {type_url} is not supported"))
            return
        state.nonce = resp.nonce
        try:
            self.store.apply(type_url, resp.version_info, list(resp.resources))
        except ConfigError as exc:
            state.error = str(exc)
            log.warning("NACK %s version %s: %s", xdstypes.SHORT[type_url], resp.version_info, exc)
            outbox.put_nowait(self._nack(type_url, state.version, resp.nonce, state.names, str(exc)))
            return
        config = self.store.config()
        self.on_config(config)
        if self.last_good is not None:
            self.last_good.save(self.store)
        outbox.put_nowait(self._request(type_url, state.version, resp.nonce, state.names))
        for dep_type, names in self.store.wanted_names().items():
            dep = self.store.types[dep_type]
            if names != dep.names:
                dep.names = names
                outbox.put_nowait(self._request(dep_type, dep.version, dep.nonce, names))

    @staticmethod
    def _request(type_url: str, version: str, nonce: str, names) -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version,
                                              response_nonce=nonce, resource_names=list(names))

    def _nack(self, type_url, version, nonce, names, message) -> discovery_pb2.DiscoveryRequest:
        req = self._request(type_url, version, nonce, names)
        req.error_detail.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                    message=message))
        return req

    def status(self) -> dict:
        return {
            "connected_to": self.connected_to,
            "connects": self.connects,
            "types": {xdstypes.SHORT[t]: {"version": s.version, "names": list(s.names),
                                          "resources": sorted(s.parsed), "nack": s.error}
                      for t, s in self.store.types.items()},
        }
