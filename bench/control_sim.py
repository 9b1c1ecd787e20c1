"""Simulated protomesh sidecars: real ADS (SotW) streams against `protomesh control`.

One process runs `--count` streams, each on its own channel (own TCP connection, as separate
sidecars would have).  Each stream does what `sidecar/xds/client.py` does: the first request
carries a node whose metadata registers it like `sidecar/app.py:build_node`; it subscribes to
CDS and LDS (wildcard), then to EDS for every EDS cluster and RDS for every route config the
listeners name, and ACKs every response with its version and nonce.

Every 0.5 s the process writes a status file (streams synced, last time anything arrived) so the
orchestrator can wait for the mesh to settle before it edits mesh.yaml.  For each stream it
records the wall-clock time it ACKed an EDS whose `bench` cluster holds the endpoint with
`--marker-port`.  It exits when every stream has seen it, on SIGTERM, or at `--timeout`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from protomesh import xdstypes

MARKER_CLUSTER = "bench"


def sim_node(i: int, services: int) -> base_pb2.Node:
    service = f"app-{i % services}"
    node = base_pb2.Node(id=f"sim-{i}", cluster=service, user_agent_name="protomesh")
    meta = struct_pb2.Struct()
    meta.update({xdstypes.META_ROLE: "sidecar", xdstypes.META_FLAVOUR: "protomesh",
                 xdstypes.META_SERVICE: service, xdstypes.META_PROTOCOL: "http",
                 # Addresses nobody dials: the control plane only publishes them.
                 xdstypes.META_INBOUND: f"127.0.0.1:{20000 + i}",
                 "protomesh.advertise": f"127.0.0.1:{20000 + i}",
                 xdstypes.META_APP: f"127.0.0.1:{30000 + i}",
                 xdstypes.META_OUTBOUND_HTTP: "127.0.0.1:15001",
                 xdstypes.META_OUTBOUND_GRPC: "127.0.0.1:15002",
                 xdstypes.META_LABELS: {"sim": "1"}})
    node.metadata.CopyFrom(meta)
    return node


def eds_names(resources) -> list[str]:
    out = []
    for any_msg in resources:
        c = cluster_pb2.Cluster()
        any_msg.Unpack(c)
        if c.type == cluster_pb2.Cluster.EDS:
            out.append(c.name)
    return sorted(out)


def rds_names(resources) -> list[str]:
    out = []
    for any_msg in resources:
        lis = listener_pb2.Listener()
        any_msg.Unpack(lis)
        for chain in lis.filter_chains:
            for f in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if f.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                    out.append(hcm.rds.route_config_name)
    return sorted(out)


def has_marker(resources, port: int) -> bool:
    for any_msg in resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_msg.Unpack(cla)
        if cla.cluster_name != MARKER_CLUSTER:
            continue
        return any(lb.endpoint.address.socket_address.port_value == port
                   for group in cla.endpoints for lb in group.lb_endpoints)
    return False


class Subscriber:
    """What one simulated sidecar holds and subscribes to, and the requests that follow from a
    response: its ACK, then new EDS/RDS subscriptions when the clusters or listeners changed."""

    DEPENDENTS = {xdstypes.CLUSTER: (xdstypes.ENDPOINT, eds_names), xdstypes.LISTENER: (xdstypes.ROUTE, rds_names)}

    def __init__(self, node: base_pb2.Node):
        self.node = node
        self.held: dict[str, str] = {}  # type -> last ACKed version (what a sidecar persists)
        self.nonce: dict[str, str] = {}
        self.names: dict[str, list[str]] = {xdstypes.ENDPOINT: [], xdstypes.ROUTE: []}

    def opening(self) -> list[discovery_pb2.DiscoveryRequest]:
        """First requests of a stream: wildcard CDS/LDS, named EDS/RDS if already known, each
        with the version held (a resumed sidecar), the node on the first."""
        self.nonce = {}  # nonces belong to one stream
        out = []
        for t in (xdstypes.CLUSTER, xdstypes.LISTENER, xdstypes.ENDPOINT, xdstypes.ROUTE):
            if t in self.names and not self.names[t]:
                continue
            out.append(discovery_pb2.DiscoveryRequest(type_url=t, version_info=self.held.get(t, ""),
                                                      resource_names=self.names.get(t, [])))
        out[0].node.CopyFrom(self.node)
        return out

    def answer(self, resp: discovery_pb2.DiscoveryResponse) -> list[discovery_pb2.DiscoveryRequest]:
        t = resp.type_url
        self.held[t], self.nonce[t] = resp.version_info, resp.nonce
        out = [discovery_pb2.DiscoveryRequest(type_url=t, version_info=resp.version_info,
                                              response_nonce=resp.nonce, resource_names=self.names.get(t, []))]
        dep = self.DEPENDENTS.get(t)
        if dep:
            dep_type, names_of = dep
            wanted = names_of(resp.resources)
            if wanted != self.names[dep_type]:
                self.names[dep_type] = wanted
                out.append(discovery_pb2.DiscoveryRequest(
                    type_url=dep_type, version_info=self.held.get(dep_type, ""),
                    response_nonce=self.nonce.get(dep_type, ""), resource_names=wanted))
        return out


async def run_stream(xds: str, sub: Subscriber, stop: asyncio.Event, on_response, options=(),
                     wait_for_ready: bool = False) -> str:
    """One ADS stream: send `sub.opening()`, then for every response call `on_response(resp)`
    and send `sub.answer(resp)`; until `stop` or the stream ends.  Returns the error, or ""."""
    outbox: asyncio.Queue = asyncio.Queue()
    for req in sub.opening():
        outbox.put_nowait(req)

    async def requests():
        while True:
            item = await outbox.get()
            if item is None:
                return
            yield item

    opts = [("grpc.use_local_subchannel_pool", 1), *options]
    async with grpc.aio.insecure_channel(xds, options=opts) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
            requests(), wait_for_ready=wait_for_ready)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    call.cancel()
                    return ""
                resp = read.result()
                if resp is grpc.aio.EOF:
                    return "stream ended"
                on_response(resp)
                for req in sub.answer(resp):
                    outbox.put_nowait(req)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            stopper.cancel()
            outbox.put_nowait(None)


class Sim:
    def __init__(self, i: int, args):
        self.i, self.args = i, args
        self.seen_types: set[str] = set()
        self.marker_at: float | None = None
        self.synced_at: float | None = None
        self.error = ""

    async def run(self, stop: asyncio.Event, progress) -> None:
        a = self.args

        def seen(resp) -> None:
            t = resp.type_url
            progress.rx = time.time()
            self.seen_types.add(t)
            if self.synced_at is None and len(self.seen_types) == 4:
                self.synced_at = time.time()
            if t == xdstypes.ENDPOINT and self.marker_at is None and has_marker(resp.resources, a.marker_port):
                self.marker_at = time.time()
                progress.marked += 1
                if progress.marked >= progress.total:
                    stop.set()

        self.error = await run_stream(a.xds, Subscriber(sim_node(self.i, a.services)), stop, seen)


class Progress:
    def __init__(self, total: int):
        self.total, self.rx, self.marked = total, 0.0, 0


async def main(args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.timeout, stop.set)
    sims = [Sim(i, args) for i in range(args.first, args.first + args.count)]
    progress = Progress(len(sims))
    status = Path(args.out + ".status")

    async def report():
        while True:
            synced = sum(1 for s in sims if len(s.seen_types) == 4)
            status.write_text(json.dumps({"synced": synced, "last_rx": progress.rx, "marked": progress.marked,
                                          "errors": sum(1 for s in sims if s.error)}))
            await asyncio.sleep(0.5)

    reporter = asyncio.ensure_future(report())
    tasks = []
    for n, s in enumerate(sims):
        tasks.append(asyncio.ensure_future(s.run(stop, progress)))
        if n % 50 == 49:
            await asyncio.sleep(0.01)  # let the first connections through before the next batch
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    Path(args.out).write_text(json.dumps({
        "marker_at": [s.marker_at for s in sims],
        "synced_at": [s.synced_at for s in sims],
        # a stream that never connected is cancelled at exit: only errors after sync count
        "errors": [s.error for s in sims if s.error and s.synced_at][:10],
        "error_count": sum(1 for s in sims if s.error and s.synced_at),
        "synced": sum(1 for s in sims if len(s.seen_types) == 4)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--xds", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=250)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--marker-port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--out", required=True)
    asyncio.run(main(ap.parse_args()))
