"""Simulated protomesh sidecars: real ADS (SotW) streams against `protomesh control`.

One process runs `--count` streams, each on its own TCP connection (as separate sidecars would
have), spoken by `bench/ads_client.py`: a small gRPC client on the project's own HTTP/2 stack
rather than grpc.aio, whose per-message machinery cost the simulators more CPU per push than the
control server spent (a load generator that costs more than the system under test measures
itself).  Each stream does what `sidecar/xds/client.py` does: the first request carries a node
whose metadata registers it like `sidecar/app.py:build_node`; it subscribes to CDS and LDS
(wildcard), then to EDS for every EDS cluster and RDS for every route config the listeners
name, and ACKs every response with its version and nonce.

A stream whose connect or first exchange fails (no response arrived) tries again after a
full-jitter exponential backoff, as `sidecar/xds/client.py` does, a bounded number of times
within a bounded time (`RetryPolicy`); retries are counted and reported.  A stream that fails
after it got a response is not retried: that is an error the benchmark reports.

Every 0.5 s the process writes a status file (streams synced, last time anything arrived) so the
orchestrator can wait for the mesh to settle before it makes a change.  For each stream it
records, per `--marker-port` (one per change the orchestrator makes), the wall-clock times it
received, and had written its ACK of, the EDS whose `bench` cluster holds an endpoint with that
port.  The simulator runs on uvloop and freezes its heap once all its streams are synced, so
its own collector pauses are not measured as the control server's latency.
It exits when every stream has seen every marker, on SIGTERM, or at `--timeout`.

`Registrant` is the other side of a change: one more sidecar of service `bench` registering
with the control server on its own ADS stream — a real endpoint change in a mesh, no file poll.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from bench import ads_client
from protomesh import xdstypes
from sidecar.xds.client import backoff_delays

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


def marker_ports(resources) -> set[int]:
    """Ports of the `bench` cluster's endpoints in an EDS response (empty if it is not there)."""
    for any_msg in resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_msg.Unpack(cla)
        if cla.cluster_name == MARKER_CLUSTER:
            return {lb.endpoint.address.socket_address.port_value
                    for group in cla.endpoints for lb in group.lb_endpoints}
    return set()


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
                     wait_for_ready: bool = False, on_acked=None) -> str:
    """One ADS stream on its own connection: send `sub.opening()`, then for every response call
    `on_response(resp)`, send `sub.answer(resp)` and call `on_acked(resp)` once the ACK has been
    written to the socket (`ads_client.AdsConnection`); until `stop` or the stream ends.
    Returns the error ("UNAVAILABLE: connect failed: ...", a gRPC status name and message,
    "stream ended"), or "" when stopped.  `options` are grpc channel options, of which the
    reconnect backoff (for `wait_for_ready`, which retries the connect for a bounded time) and
    the receive limit apply.

    Everything after the connect happens in the connection's callbacks; this coroutine only
    waits for the end: thousands of these share one core in the benchmark, and a simulator
    that spends more per message than the control server measures itself, not the server."""
    if stop.is_set():
        return ""
    settings = ads_client.ChannelSettings.from_options(options)
    opening = sub.opening()  # also clears the stream's nonces, connected or not (see run_stream_with_retry)
    stopped = asyncio.get_running_loop().create_future()
    unwatch = ads_client.StopWatch.add(stop, lambda: stopped.done() or stopped.set_result(None))
    conn = None
    try:
        conn = await ads_client.connect(xds, stopped, settings, wait_for_ready)
        if conn is None:
            return ""

        def reply(resp):
            on_response(resp)
            return sub.answer(resp)

        conn.open(xds, opening, reply, on_acked)
        await asyncio.wait((conn.ended, stopped), return_when=asyncio.FIRST_COMPLETED)
        error = conn.ended.result() if conn.ended.done() else ""  # raises what a callback raised
        return "" if stop.is_set() else error
    except ads_client.ConnectFailed as exc:
        return "" if stop.is_set() else f"UNAVAILABLE: {exc}"
    finally:
        unwatch()
        if conn is not None:
            conn.shut()


def marker_node(port: int, node_id: str = "bench-registrant") -> base_pb2.Node:
    """A sidecar of service `bench` advertising 127.0.0.1:`port` and nothing else (no inbound
    or outbound listeners: it exists to be an endpoint)."""
    node = base_pb2.Node(id=node_id, cluster="bench", user_agent_name="protomesh")
    meta = struct_pb2.Struct()
    meta.update({xdstypes.META_ROLE: "sidecar", xdstypes.META_FLAVOUR: "protomesh",
                 xdstypes.META_SERVICE: "bench", xdstypes.META_PROTOCOL: "http",
                 "protomesh.advertise": f"127.0.0.1:{port}"})
    node.metadata.CopyFrom(meta)
    return node


class Registrant(threading.Thread):
    """Registers one `bench` endpoint by opening its ADS stream, in a thread with its own event
    loop so a synchronous orchestrator can make the change.  `started_at` is the wall-clock time
    just before the stream is opened: the moment of the change, which therefore includes the
    TCP connect and the first request, as a real sidecar's registration would."""

    def __init__(self, xds: str, port: int):
        super().__init__(daemon=True, name="bench-registrant")
        self.xds, self.port = xds, port
        self.started_at: float | None = None
        self.error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halt: asyncio.Event | None = None
        self._ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._halt = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        self.started_at = time.time()
        self.error = await run_stream(self.xds, Subscriber(marker_node(self.port)), self._halt, lambda _: None)

    def close(self, timeout: float = 5.0) -> None:
        if self._ready.wait(timeout) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._halt.set)
        self.join(timeout)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a stream tries to get its first response: `attempts` connects at most (the first
    included), none started later than `budget_s` after the first, full-jitter backoff between
    them from `base_s` doubling up to `cap_s` (the sidecar's defaults)."""
    attempts: int = 8
    budget_s: float = 90.0
    base_s: float = 0.2
    cap_s: float = 5.0


def next_attempt_delay(policy: RetryPolicy, failures: int, elapsed_s: float, delay: float) -> float | None:
    """Whether to try again after the `failures`-th failed first exchange, `elapsed_s` after the
    first attempt began; `delay` is the backoff drawn for it.  None means give up."""
    if failures >= policy.attempts or elapsed_s + delay > policy.budget_s:
        return None
    return delay


async def run_stream_with_retry(xds: str, sub: Subscriber, stop: asyncio.Event, on_response,
                                policy: RetryPolicy = RetryPolicy(), rng: random.Random | None = None,
                                clock=time.monotonic, options=(), on_retry=None, on_acked=None) -> tuple[str, int]:
    """`run_stream`, again after a backoff while an attempt ends before any response arrives
    (`on_retry(error)` is told each time).  Returns (the last error or "", retries made)."""
    rand = (rng or random.Random()).random
    delays = backoff_delays(policy.base_s, policy.cap_s, rand)
    started, failures = clock(), 0
    while True:
        error = await run_stream(xds, sub, stop, on_response, options=options, on_acked=on_acked)
        got = bool(sub.nonce)  # `opening()` clears it; any response on this attempt sets it
        if got or not error or stop.is_set():
            return error, failures
        failures += 1
        delay = next_attempt_delay(policy, failures, clock() - started, next(delays))
        if delay is None:
            return error, failures - 1
        if on_retry is not None:
            on_retry(error)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return error, failures - 1  # stopped while waiting
        except asyncio.TimeoutError:
            pass


class Sim:
    def __init__(self, i: int, args):
        self.i, self.args = i, args
        self.seen_types: set[str] = set()
        self.marker_at: dict[int, float] = {}  # marker port -> its EDS ACKed (written)
        self.received_at: dict[int, float] = {}  # marker port -> its EDS received
        self.arrived: tuple | list = ()  # markers of the response being answered
        self.synced_at: float | None = None
        self.error = ""
        self.retries = 0

    async def run(self, stop: asyncio.Event, progress) -> None:
        a = self.args

        def seen(resp) -> None:
            t = resp.type_url
            now = progress.rx = time.time()
            self.seen_types.add(t)
            if self.synced_at is None and len(self.seen_types) == 4:
                self.synced_at = now
            self.arrived = ()
            if t == xdstypes.ENDPOINT and len(self.marker_at) < len(a.marker_port):
                self.arrived = [p for p in marker_ports(resp.resources) & set(a.marker_port)
                                if p not in self.marker_at]
                for port in self.arrived:
                    self.received_at.setdefault(port, now)

        def acked(resp) -> None:
            """A marker counts once the ACK of the EDS holding it is written."""
            for port in self.arrived:
                self.marker_at[port] = time.time()
                progress.marked[port] += 1
                if all(n >= progress.total for n in progress.marked.values()):
                    stop.set()
            self.arrived = ()

        policy = RetryPolicy(attempts=a.connect_attempts, budget_s=a.connect_budget)
        self.error, self.retries = await run_stream_with_retry(
            a.xds, Subscriber(sim_node(self.i, a.services)), stop, seen, policy, random.Random(self.i),
            on_retry=lambda error: progress.retry_errors.update([error.split(":")[0]]), on_acked=acked)


class Progress:
    def __init__(self, total: int):
        self.total, self.rx = total, 0.0
        self.marked: dict[int, int] = {}
        self.retry_errors: collections.Counter = collections.Counter()  # status of failed first exchanges


async def main(args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.timeout, stop.set)
    sims = [Sim(i, args) for i in range(args.first, args.first + args.count)]
    progress = Progress(len(sims))
    progress.marked = {port: 0 for port in args.marker_port}
    status = Path(args.out + ".status")

    async def report():
        frozen = False
        while True:
            synced = sum(1 for s in sims if len(s.seen_types) == 4)
            if synced == len(sims) and not frozen:
                # Every stream's state is long-lived from here: keep it out of collections, whose
                # pauses would otherwise be measured as the control server's latency.
                gc.freeze()
                frozen = True
            status.write_text(json.dumps({"synced": synced, "last_rx": progress.rx, "marked": progress.marked,
                                          "errors": sum(1 for s in sims if s.error),
                                          "retries": sum(s.retries for s in sims)}))
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
        "marker_at": {str(port): [s.marker_at.get(port) for s in sims] for port in args.marker_port},
        "received_at": {str(port): [s.received_at.get(port) for s in sims] for port in args.marker_port},
        "synced_at": [s.synced_at for s in sims],
        # a stream that never connected is cancelled at exit: only errors after sync count
        "errors": [s.error for s in sims if s.error and s.synced_at][:10],
        "error_count": sum(1 for s in sims if s.error and s.synced_at),
        # first exchanges that failed and were tried again, and streams that gave up unsynced
        "connect_retries": sum(s.retries for s in sims),
        "retry_errors": dict(progress.retry_errors),
        "streams_retried": sum(1 for s in sims if s.retries),
        "gave_up": sum(1 for s in sims if s.error and not s.synced_at),
        "gave_up_errors": sorted({s.error for s in sims if s.error and not s.synced_at})[:5],
        "synced": sum(1 for s in sims if len(s.seen_types) == 4)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--xds", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=250)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--marker-port", type=int, action="append", required=True,
                    help="port of a `bench` endpoint to watch for (repeat for several changes)")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--out", required=True)
    ap.add_argument("--connect-attempts", type=int, default=RetryPolicy.attempts,
                    help="connects per stream before it gives up (first included)")
    ap.add_argument("--connect-budget", type=float, default=RetryPolicy.budget_s,
                    help="seconds after a stream's first connect in which it may start another")
    try:  # the sidecar runs on uvloop too; the simulators share one core, so every µs counts
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(ap.parse_args()))
