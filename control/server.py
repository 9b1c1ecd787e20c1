"""ADS (state of the world and Delta) and CSDS: the protocol, and its grpc.aio servicer.

The per-stream protocol (`open_stream` / `handle` / `close_stream`, pushes through
`Stream.send`) does not know what serves it: grpc.aio here (`--xds-engine grpcio`), or our own
HTTP/2 gRPC server by default (`ads_h2.py`).

Each stream gets its own `StreamState` (SotW) or `DeltaState` (Delta); a change of the mesh or of the registrations bumps the
generation and every stream is offered its new view — at once after a quiet spell, coalesced
during a burst of edits or reconnects (`coalesce.py`).  What is sent, and when, is decided by the
stream's state; the view depends on the node's flavour (see `views.py`).  SotW responses are
encoded once and shared by the streams that get the same one (`wire.py`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from control.coalesce import push_at
from control.delta import DeltaState, digest
from control.registry import Registration, RegistrationError, Registry, registration_from_node
from control.stream import StreamState
from control.translate.envoy import listen_overrides
from control.views import Views
from control.wire import SharedResponses
from protomesh import xdstypes

log = logging.getLogger("protomesh.control")

PUSH_SLICE = 64  # streams kicked per event-loop turn during a push


class Abort(Exception):
    """A protocol violation by the client; the stream ends with this status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Stream:
    """One ADS stream.  Responses leave through `send`: on grpc.aio, a queue the servicer's
    generator drains; on the h2 server (ads_h2.py), the call's own send, which wants bytes."""

    _ids = itertools.count(1)

    def __init__(self, peer: str, delta: bool = False, send=None):
        self.id = next(self._ids)
        self.peer = peer
        self.delta = delta
        self.node = None
        self.reg: Registration | None = None
        self.state: StreamState | DeltaState = DeltaState() if delta else StreamState()
        self.out: asyncio.Queue | None = asyncio.Queue() if send is None else None
        self.send = self.out.put_nowait if send is None else send
        self.wire = send is not None  # `send` takes encoded responses
        self.connected_at = time.time()
        self.resumed = False  # the node already had config when it connected
        self.overrides: tuple = ()  # gateway listen addresses the node asked for
        self.view: dict | None = None  # cached Views.for_node(...) as of `view_stamp`
        self.view_stamp: tuple | None = None


class ControlPlane(ads_pb2_grpc.AggregatedDiscoveryServiceServicer,
                   csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):
    def __init__(self, views: Views, registry: Registry, debounce_s: float = 0.1, warmup_s: float = 0.0,
                 max_delay_s: float = 1.0):
        """`warmup_s`: after a restart, nodes that come back with config (their first request
        carries a version) are answered only after this long.  Registrations live only in
        streams, so a restarted control server knows no endpoints until sidecars reconnect; the
        first node back must not be told that its peers' services are empty, and it loses
        nothing by waiting (it serves its last config).  New nodes, which have nothing, are
        answered at once."""
        self.views = views
        self.warm_at = time.monotonic() + warmup_s
        self._warm_handle = None
        self.registry = registry
        self.debounce_s = debounce_s
        self.max_delay_s = max_delay_s
        self._first_unpushed: float | None = None
        self._last_push: float | None = None
        self.streams: dict[int, Stream] = {}
        self.pushes = 0
        self.nacks = 0
        self._push_handle: asyncio.TimerHandle | None = None
        self._push_task: asyncio.Task | None = None
        self.responses = SharedResponses()
        # True once registered by `wire.add_ads_to_server`, whose serializer passes bytes through;
        # registered with the generated helper, SotW responses are yielded as messages.
        self.encoded_responses = False
        self.on_push_done = None  # called when a push pass ends and none is pending
        self.on_push_start = None  # called as a push pass begins
        self._expiry_task: asyncio.Task | None = None

    # ---- change propagation -------------------------------------------------------------------
    def changed(self, mesh=None, endpoints_only: bool = False, registrations_only: bool = False,
                services: set[str] | None = None) -> None:
        """Mesh or registrations changed: new generation, and a push — at once after a quiet
        spell, else once changes pause for `debounce_s` but no later than `max_delay_s` after the
        first unpushed one (`coalesce.push_at`)."""
        self.views.invalidate(mesh, endpoints_only, registrations_only, services)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._first_unpushed is None:
            self._first_unpushed = now
        when = push_at(now, self._first_unpushed, self._last_push, self.debounce_s, self.max_delay_s)
        if self._push_handle is not None:
            self._push_handle.cancel()
        self._push_handle = loop.call_at(when, self._push_all)

    def _push_all(self) -> None:
        self._last_push = asyncio.get_running_loop().time()
        self._push_handle = None
        self._first_unpushed = None
        self._warm_handle = None
        if self.on_push_start is not None:
            self.on_push_start()
        self.views.refresh()
        if self._push_task is not None:
            self._push_task.cancel()  # the new pass covers every stream; kicks are idempotent
        self._push_task = asyncio.ensure_future(self._push_in_slices(list(self.streams.values())))

    async def _push_in_slices(self, streams: list[Stream]) -> None:
        """Kick the streams a slice at a time and yield to the loop in between, so the first
        responses are written (and ACKed by clients elsewhere) while the rest are prepared.  One
        synchronous pass over thousands of streams held every write back until the last response
        was built, and the clients idled meanwhile."""
        for i in range(0, len(streams), PUSH_SLICE):
            for stream in streams[i:i + PUSH_SLICE]:
                if stream.id in self.streams:
                    self._kick(stream)
            await asyncio.sleep(0)
        self._push_task = None
        if self.on_push_done is not None and not self.busy():
            self.on_push_done()

    def busy(self) -> bool:
        """A push is pending or going out."""
        return self._push_handle is not None or self._push_task is not None or self._warm_handle is not None

    def _kick(self, stream: Stream) -> None:
        if stream.reg is None:
            return
        wait = self.warm_at - time.monotonic()
        if wait > 0 and stream.resumed:
            if self._warm_handle is None:
                self._warm_handle = asyncio.get_running_loop().call_later(wait, self._push_all)
            return
        view = self._view(stream)
        if stream.delta:
            for response in stream.state.next_responses(view):
                stream.send(response.SerializeToString() if stream.wire else response)
                self.pushes += 1
            return
        encoded = stream.wire or self.encoded_responses
        for type_url, version, resources in stream.state.next_sends(view):
            nonce, data = self.responses.get(type_url, version, resources,
                                             stream.state.types[type_url].sent_nonce)
            stream.state.mark_sent(type_url, version, nonce)
            stream.send(data if encoded else discovery_pb2.DiscoveryResponse.FromString(data))
            self.pushes += 1

    def _view(self, stream: Stream) -> dict:
        """The stream's view, asked of `Views` only when views changed: looking it up hashes the
        node's registration, and a stream asks on every request it sends (ACKs included)."""
        stamp = self.views.stamp()
        if stream.view_stamp != stamp:
            stream.view = self.views.for_node(stream.reg, stream.overrides)
            stream.view_stamp = self.views.stamp()  # for_node may have built the shared parts
        return stream.view

    async def expire_registrations(self) -> None:
        """Remove endpoints of sidecars whose stream ended more than the grace period ago."""
        while True:
            nxt = self.registry.next_expiry()
            await asyncio.sleep(0.5 if nxt is None else max(0.01, min(0.5, nxt - time.time())))
            if self.registry.expire(time.time()):
                self.changed(registrations_only=True)

    # ---- ADS ------------------------------------------------------------------------------------
    async def StreamAggregatedResources(self, request_iterator, context):
        async for response in self._serve(Stream(context.peer()), request_iterator, context):
            yield response

    async def DeltaAggregatedResources(self, request_iterator, context):
        async for response in self._serve(Stream(context.peer(), delta=True), request_iterator, context):
            yield response

    async def _serve(self, stream: Stream, request_iterator, context):
        """grpc.aio: read requests in a task, yield what `_kick` queues."""
        self.open_stream(stream)
        reader = asyncio.ensure_future(self._read(stream, request_iterator))
        reader.add_done_callback(lambda _: stream.out.put_nowait(None))
        try:
            while True:
                response = await stream.out.get()
                if response is None:
                    break
                yield response
            exc = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(exc, Abort):
                await context.abort(exc.code, exc.message)
            elif exc is not None:
                raise exc
        finally:
            reader.cancel()
            self.close_stream(stream)

    async def _read(self, stream: Stream, request_iterator) -> None:
        async for req in request_iterator:
            self.handle(stream, req)

    # ---- one stream, whatever serves it (grpc.aio above, ads_h2.py) --------------------------------
    def open_stream(self, stream: Stream) -> None:
        self.streams[stream.id] = stream

    def close_stream(self, stream: Stream) -> None:
        """The stream ended (any way): forget it; its node's endpoints outlive it by the grace."""
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.reg is not None:
            self.registry.disconnect(stream.reg.node_id, time.time())
            log.info("stream %d of node %s closed", stream.id, stream.reg.node_id)

    def handle(self, stream: Stream, req) -> None:
        """One DiscoveryRequest (or DeltaDiscoveryRequest) of `stream`: register the node on its
        first, record ACK/NACK, and send what follows.  Raises Abort for a protocol violation."""
        if stream.reg is None:
            if not req.node.id:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first DiscoveryRequest must carry node.id")
            try:
                reg = registration_from_node(req.node)
            except RegistrationError as exc:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            stream.node = req.node
            stream.reg = reg
            stream.overrides = listen_overrides(req.node)
            stream.resumed = bool(req.initial_resource_versions if stream.delta else req.version_info)
            if reg.service and reg.service not in self.views.mesh.services:
                log.warning("node %s registers service %r which mesh.yaml does not define; "
                            "it gets config but no peer will route to it", reg.node_id, reg.service)
            if self.registry.connect(reg):
                self.changed(registrations_only=True)
            log.info("stream %d: node %s (%s %s) from %s", stream.id, reg.node_id, reg.role,
                     reg.service or "-", stream.peer)
        error = req.error_detail.message if req.HasField("error_detail") else None
        if stream.delta:
            outcome = stream.state.on_request(req)
            refused = req.response_nonce
        else:
            outcome = stream.state.on_request(req.type_url, list(req.resource_names), req.response_nonce,
                                              req.version_info, error)
            if outcome == "ack":
                stream.state.types[req.type_url].acked_at = time.time()
            refused = outcome == "nack" and stream.state.types[req.type_url].nacked_version
        if outcome == "nack":
            self.nacks += 1
            log.warning("NACK from %s for %s %s %s: %s", stream.reg.node_id,
                        xdstypes.SHORT.get(req.type_url, req.type_url),
                        "nonce" if stream.delta else "version", refused, error)
        self._kick(stream)

    # ---- CSDS -----------------------------------------------------------------------------------
    async def FetchClientStatus(self, request, context):
        return csds_pb2.ClientStatusResponse(config=self.client_configs(request.exclude_resource_contents))

    async def StreamClientStatus(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.FetchClientStatus(request, context)

    def client_configs(self, exclude_contents: bool = True) -> list[csds_pb2.ClientConfig]:
        out = []
        for stream in sorted(self.streams.values(), key=lambda s: s.reg.node_id if s.reg else ""):
            if stream.reg is None:
                continue
            cfg = csds_pb2.ClientConfig(node=stream.node)
            if xdstypes.META_FLAVOUR not in cfg.node.metadata.fields:  # e.g. grpc: say what we decided
                cfg.node.metadata.update({xdstypes.META_FLAVOUR: stream.reg.flavour,
                                          xdstypes.META_ROLE: stream.reg.role})
            view = self.views.for_node(stream.reg, stream.overrides)
            for type_url, name, version, status, error, rejected in stream.state.resource_status(view):
                g = cfg.generic_xds_configs.add(type_url=type_url, name=name, version_info=version)
                g.client_status = config_dump_shared_pb2.ClientResourceStatus.Value(status)
                g.config_status = {"NACKED": csds_pb2.ERROR, "ACKED": csds_pb2.SYNCED,
                                   "DOES_NOT_EXIST": csds_pb2.SYNCED}.get(
                    status, csds_pb2.STALE if version else csds_pb2.NOT_SENT)
                if status == "NACKED":
                    g.error_state.details = error
                    g.error_state.version_info = rejected
                if not exclude_contents and name in view.get(type_url, {}):
                    g.xds_config.CopyFrom(view[type_url][name])
            out.append(cfg)
        return out

    def status(self) -> list[dict]:
        nodes = []
        for s in sorted(self.streams.values(), key=lambda s: s.reg.node_id if s.reg else ""):
            if s.reg is None:
                continue
            nodes.append({
                "node": s.reg.node_id, "role": s.reg.role, "service": s.reg.service,
                "flavour": s.reg.flavour, "peer": s.peer, "connected_at": s.connected_at,
                "api": "delta" if s.delta else "sotw",
                "types": {xdstypes.SHORT[t]: self._type_status(st)
                          for t, st in s.state.types.items() if st.subscribed},
            })
        return nodes

    @staticmethod
    def _type_status(st) -> dict:
        if hasattr(st, "known"):  # Delta: versions are per resource; acked/sent digest them
            after = {**st.known, **st.sent} if st.pending else st.known
            after = {n: v for n, v in after.items() if not (st.pending and n in st.sent_removed)}
            return {"acked": digest(st.known), "sent": digest(after), "pending": st.pending,
                    "nacked": st.nacked_nonce if st.error else "", "error": st.error, "sends": st.sends,
                    "resources": dict(st.known), "wildcard": st.wildcard}
        return {"acked": st.acked_version, "sent": st.sent_version, "pending": st.pending,
                "nacked": st.nacked_version, "error": st.error, "sends": st.sends, "acked_at": st.acked_at}
