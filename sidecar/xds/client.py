"""ADS client: subscribe, ACK or NACK each response, reconnect with jitter.

Delta (incremental) xDS by default: after the first full exchange only changed resources travel,
and a reconnect tells the server what we hold (`initial_resource_versions`).  A control server
that answers Delta with UNIMPLEMENTED gets state of the world from then on (per address).

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
                 last_good: LastGood | None = None, api: str = "delta"):
        """`api`: "delta" (falls back to SotW per control address on UNIMPLEMENTED) or "sotw"."""
        self.node = node
        self.api = api
        self.sotw_only: set[str] = set()  # control addresses that do not speak Delta
        self.active_api = ""
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
        except Exception as exc:  # a corrupt or outdated file is no reason not to start
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
        if self.api == "delta" and target not in self.sotw_only:
            try:
                await self._delta_session(target)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            log.info("control server %s does not speak Delta xDS; using state of the world", target)
            self.sotw_only.add(target)
        await self._sotw_session(target)

    async def _pump(self, target: str, stream, outbox: asyncio.Queue, handle) -> None:
        """Read responses until the stream ends or stop() is called."""
        stop_task = asyncio.ensure_future(self._stop.wait())
        try:
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
                if not self.connected_to:  # first answer: this stream works
                    self.connected_to = target
                    self.connects += 1
                handle(response, outbox)
        finally:
            stop_task.cancel()
            outbox.put_nowait(None)

    @staticmethod
    async def _drain(outbox: asyncio.Queue):
        while True:
            item = await outbox.get()
            if item is None:
                return
            yield item

    async def _delta_session(self, target: str) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        first = True
        for type_url in (xdstypes.CLUSTER, xdstypes.LISTENER, xdstypes.ENDPOINT, xdstypes.ROUTE):
            st = self.store.types[type_url]
            if type_url not in WILDCARD and not st.names:
                continue
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=["*"] if type_url in WILDCARD else list(st.names),
                initial_resource_versions=st.versions)
            if first:
                req.node.CopyFrom(self.node)
                first = False
            outbox.put_nowait(req)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            stream = stub.DeltaAggregatedResources(self._drain(outbox))
            self.active_api = "delta"
            await self._pump(target, stream, outbox, self._handle_delta)

    def _handle_delta(self, resp: discovery_pb2.DeltaDiscoveryResponse, outbox: asyncio.Queue) -> None:
        type_url = resp.type_url
        state = self.store.types.get(type_url)

        def nack(message: str):
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=resp.nonce)
            req.error_detail.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                        message=message))
            outbox.put_nowait(req)
        if state is None:
            nack(f"resource type {type_url} is not supported")
            return
        try:
            self.store.apply_delta(type_url, resp.system_version_info, list(resp.resources),
                                   list(resp.removed_resources))
        except Exception as exc:  # ConfigError, or a parser bug: NACK either way, keep the stream
            exc = _as_config_error(exc)
            state.error = str(exc)
            log.warning("NACK %s nonce %s: %s", xdstypes.SHORT[type_url], resp.nonce, exc)
            nack(str(exc))
            return
        self._accepted()
        outbox.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=resp.nonce))
        for dep_type, names in self.store.wanted_names().items():
            dep = self.store.types[dep_type]
            if names != dep.names:
                old, new = set(dep.names), set(names)
                dep.names = names
                if old - new:
                    self.store.retain(dep_type, names)
                outbox.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=dep_type, resource_names_subscribe=sorted(new - old),
                    resource_names_unsubscribe=sorted(old - new)))

    def _accepted(self) -> None:
        self.on_config(self.store.config())
        if self.last_good is not None:
            self.last_good.save(self.store)

    async def _sotw_session(self, target: str) -> None:
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

            stream = stub.StreamAggregatedResources(self._drain(outbox))
            self.active_api = "sotw"
            await self._pump(target, stream, outbox, self._handle)

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
        except Exception as exc:  # ConfigError, or a parser bug: NACK either way, keep the stream
            exc = _as_config_error(exc)
            state.error = str(exc)
            log.warning("NACK %s version %s: %s", xdstypes.SHORT[type_url], resp.version_info, exc)
            outbox.put_nowait(self._nack(type_url, state.version, resp.nonce, state.names, str(exc)))
            return
        self._accepted()
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
            "api": self.active_api,
            "types": {xdstypes.SHORT[t]: {"version": s.version, "names": list(s.names),
                                          "resources": sorted(s.parsed), "nack": s.error}
                      for t, s in self.store.types.items()},
        }


def _as_config_error(exc: Exception) -> ConfigError:
    """A resource the parser could not handle is still only a NACK: the stream, and the last
    good config, survive a parser bug."""
    if isinstance(exc, ConfigError):
        return exc
    log.exception("xDS resource parsing failed unexpectedly; NACKing it")
    return ConfigError("resource", f"internal error while parsing: {exc!r}")
