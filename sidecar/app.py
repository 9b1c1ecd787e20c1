"""Sidecar process wiring: xDS client → parsed config → dataplane + listeners; admin; drain.

Lifecycle: restore the persisted config (serve at once if there is one), connect to the
control server, go ready when every listener of a complete config is up; on SIGTERM go unready,
wait the drain delay, drain listeners (in-flight calls finish), exit 0.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import logging
import os
import re
import signal
import socket
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from protomesh import xdstypes
from protomesh.admin import AdminServer
from sidecar.accesslog import AccessLog
from sidecar.config.model import RuntimeConfig
from sidecar.dataplane import Dataplane
from sidecar.listeners.manager import ListenerManager
from sidecar.span_export import SpanExporter
from sidecar.spans import SpanRecorder
from sidecar.stats import Stats
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.h2_pool import H2Pool
from sidecar.upstream.health import HealthChecker
from sidecar.upstream.http_pool import HttpPool
from sidecar.xds.client import XdsClient
from sidecar.xds.persist import LastGood

log = logging.getLogger("protomesh.sidecar")


@dataclasses.dataclass
class SidecarOptions:
    control: list[str]
    service: str = ""
    gateway: bool = False
    app: str = ""
    protocol: str = ""
    inbound: str = "0.0.0.0:15006"
    advertise: str = ""  # address peers use to reach our inbound listener
    outbound_http: str = "127.0.0.1:15001"
    outbound_grpc: str = "127.0.0.1:15002"
    admin: str = "0.0.0.0:15000"
    labels: dict = dataclasses.field(default_factory=dict)
    node_id: str = ""
    otlp: str | None = None
    sampling: float = 0.01  # as mesh.yaml's default (control/model.py DEFAULT_SAMPLING)
    state_dir: str | None = None
    access_log: str | None = "-"
    drain_delay_s: float = 0.0
    drain_timeout_s: float = 10.0
    workers: int = 1  # processes sharing the listeners through SO_REUSEPORT
    grpc_engine: str = "h2"  # sidecar/listeners/grpc_engine.py
    worker_index: int = 0


def build_node(opts: SidecarOptions) -> base_pb2.Node:
    """The node identity and the registration the control server reads from its metadata."""
    role = "gateway" if opts.gateway else "sidecar"
    name = "gateway" if opts.gateway else opts.service
    # The default id is stable across restarts (it names the persisted config) and unique per
    # host: two sidecars of one service on one machine differ by their inbound port.
    default_id = f"{name}~{socket.gethostname()}" + ("" if opts.gateway else f"~{opts.inbound.rpartition(':')[2]}")
    node_id = opts.node_id or default_id
    if opts.workers > 1:
        node_id += f"~w{opts.worker_index}"
    node = base_pb2.Node(id=node_id, cluster=name,
                         user_agent_name="protomesh")
    meta = struct_pb2.Struct()
    meta.update({xdstypes.META_ROLE: role, xdstypes.META_FLAVOUR: "protomesh",
                 "protomesh.worker": opts.worker_index})
    if not opts.gateway:
        inbound_host, _, inbound_port = opts.inbound.rpartition(":")
        advertise = opts.advertise or (
            f"{'127.0.0.1' if inbound_host in ('0.0.0.0', '') else inbound_host}:{inbound_port}")
        meta.update({xdstypes.META_SERVICE: opts.service, xdstypes.META_INBOUND: opts.inbound,
                     "protomesh.advertise": advertise, xdstypes.META_APP: opts.app,
                     xdstypes.META_OUTBOUND_HTTP: opts.outbound_http,
                     xdstypes.META_OUTBOUND_GRPC: opts.outbound_grpc,
                     xdstypes.META_LABELS: dict(opts.labels)})
        if opts.protocol:
            meta.update({xdstypes.META_PROTOCOL: opts.protocol})
    node.metadata.CopyFrom(meta)
    return node


class Sidecar:
    def __init__(self, opts: SidecarOptions):
        self.opts = opts
        self.node = build_node(opts)
        self.stats = Stats()
        log_path = opts.access_log
        if log_path not in (None, "-") and opts.workers > 1:
            log_path = f"{log_path}.w{opts.worker_index}"
        self.dataplane = Dataplane(self.node.id, self.stats, AccessLog(log_path))
        self.health = HealthChecker(self.dataplane)
        self.dataplane.on_swap = self.health.reconcile  # active health checks follow every config
        self.http_pool = HttpPool()
        self.grpc_pool = GrpcPool()
        self.h2_pool = H2Pool()
        self.listeners = ListenerManager(self.dataplane, self.http_pool, self.grpc_pool, self.h2_pool,
                                         drain_timeout_s=opts.drain_timeout_s, reuse_port=opts.workers > 1,
                                         grpc_engine=opts.grpc_engine)
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", self.node.id)
        state = Path(opts.state_dir) / f"{safe_id}.xds" if opts.state_dir else None
        self.xds = XdsClient(self.node, opts.control, self._on_config, LastGood(state) if state else None)
        self.admin = AdminServer(self.ready, self.metrics, {
            "/config_dump": self.config_dump, "/clusters": self.clusters})
        self.draining = False
        self._tracing: tuple | None = None
        self.span_exporter: SpanExporter | None = None
        self._pending: asyncio.Task | None = None
        self._gc_frozen = False  # gc.freeze() once the first complete config serves

    # ---- config updates ---------------------------------------------------------------------
    def _on_config(self, config: RuntimeConfig) -> None:
        self._apply_tracing(config)
        self.dataplane.swap(config)
        self.stats.inc("config_updates")
        prev = self._pending
        self._pending = asyncio.ensure_future(self._apply(prev, config))

    def _apply_tracing(self, config: RuntimeConfig | None) -> None:
        """--otlp (or OTEL_EXPORTER_OTLP_ENDPOINT) wins; else the tracing config the control
        server pushes with the listeners (mesh.yaml `telemetry`), applied live when it changes."""
        endpoint = self.opts.otlp or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        sampling = self.opts.sampling
        if endpoint is None and config is not None:
            pushed = next((l.tracing for l in config.listeners.values() if l.tracing), None)
            if pushed is not None:
                endpoint, sampling = pushed.otlp_endpoint, pushed.sampling
        if (endpoint, sampling) == self._tracing:
            return
        old = self.span_exporter
        self.span_exporter = SpanExporter(endpoint, f"sidecar.{self.node.cluster}") if endpoint else None
        self.dataplane.spans = SpanRecorder(sampling, self.span_exporter.add if self.span_exporter else None)
        self._tracing = (endpoint, sampling)
        if old is not None:
            asyncio.get_running_loop().run_in_executor(None, old.shutdown)  # flushes what it holds
        log.info("tracing: %s, sampling %g", f"OTLP to {endpoint}" if endpoint else "not exported", sampling)

    async def _apply(self, prev: asyncio.Task | None, config: RuntimeConfig) -> None:
        if prev is not None:
            await asyncio.shield(prev)
        if self.draining:
            return
        await self.listeners.reconcile(config)
        addresses = {ep.address for c in config.clusters.values() if c.http2
                     for ep in config.endpoints_for(c)}
        await self.grpc_pool.retain(addresses)
        await self.h2_pool.retain(addresses)
        if not self._gc_frozen and self.listeners.serving(config):
            # Everything alive now (modules, protos, the first config) lives as long as the
            # process: keep it out of the cyclic GC's full collections, each of which otherwise
            # walks it (~10 ms here, a pause every request in flight waits out).  Requests
            # themselves make no cycles; their objects are freed by reference counting.
            self._gc_frozen = True
            gc.freeze()

    # ---- admin pages --------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        config = self.dataplane.config
        if self.draining:
            return False, "draining"
        if not config.versions.get("LDS") or not config.versions.get("CDS"):
            return False, "waiting for the first config from the control server"
        missing = config.missing()
        if missing:
            return False, "waiting for " + ", ".join(missing)
        if self.listeners.errors:
            return False, "; ".join(f"{k}: {v}" for k, v in self.listeners.errors.items())
        if not self.listeners.serving(config):
            return False, "listeners starting"
        return True, ""

    def metrics(self) -> str:
        self.stats.set("xds_connected", (), 1.0 if self.xds.connected_to else 0.0)
        self.stats.set("ready", (), 1.0 if self.ready()[0] else 0.0)
        self.dataplane.sweep_all()
        for name, st in self.dataplane.clusters.items():
            for addr, n in st.balancer.active.items():
                self.stats.set("upstream_active_requests", (("cluster", name), ("endpoint", addr)), n)
            self.stats.set("upstream_ejected", (("cluster", name),), len(st.outlier.ejected) if st.outlier else 0)
            self.stats.set("upstream_unhealthy", (("cluster", name),), len(st.hc_unhealthy))
            self.stats.set("upstream_rq_active", (("cluster", name),), st.breaker.requests)
            self.stats.set("upstream_rq_pending", (("cluster", name),), st.breaker.pending)
            self.stats.set("upstream_rq_retries_active", (("cluster", name),), st.breaker.retries)
        return self.stats.render()

    def config_dump(self) -> dict:
        return {"node": {"id": self.node.id, "cluster": self.node.cluster},
                "xds": self.xds.status(), "config": dump_config(self.dataplane.config)}

    def clusters(self) -> dict:
        config = self.dataplane.config
        self.dataplane.sweep_all()
        now = self.dataplane.clock()
        out = {}
        for name, cluster in config.clusters.items():
            st = self.dataplane.clusters.get(name)
            b = st.balancer if st else None

            def health(ep):
                if st is not None and st.outlier is not None and ep.address in st.outlier.ejected:
                    return "ejected"
                return "unhealthy" if st is not None and ep.address in st.hc_unhealthy else "healthy"
            out[name] = {
                "lb_policy": cluster.lb_policy, "protocol": "grpc" if cluster.http2 else "http",
                "circuit_breakers": {"requests": st.breaker.requests, "pending": st.breaker.pending,
                                     "retries": st.breaker.retries, "overflows": dict(st.breaker.overflows),
                                     "max_requests": cluster.breaker.max_requests} if st else {},
                "endpoints": [{"address": ep.address, "weight": ep.weight, "priority": ep.priority,
                               "health": health(ep),
                               "outlier": st.outlier.state(ep.address, now) if st and st.outlier else None,
                               "active_health": self.health.state(name, ep.address),
                               "active_requests": b.active.get(ep.address, 0) if b else 0,
                               "served": b.served.get(ep.address, 0) if b else 0,
                               "labels": dict(ep.labels)}
                              for ep in config.endpoints_for(cluster)],
            }
        return {"clusters": out, "http_pool": self.http_pool.stats(), "grpc_channels": self.grpc_pool.stats(),
                "h2_connections": self.h2_pool.stats()}

    # ---- lifecycle ------------------------------------------------------------------------
    async def _flush_access_log(self, every_s: float = 0.5) -> None:
        """The access log is block-buffered (a write per request would cost a syscall each);
        flushing twice a second keeps it near real time for whoever tails it."""
        while True:
            await asyncio.sleep(every_s)
            self.dataplane.access_log.flush()

    async def run(self, stop: asyncio.Event) -> int:
        self._apply_tracing(None)
        host, _, port = self.opts.admin.rpartition(":")
        port = int(port) + self.opts.worker_index if int(port) else 0  # worker k: admin port + k
        await self.admin.start(host, port)
        if self.xds.restore():
            log.info("serving the persisted config while the control server is reached")
        xds_task = asyncio.ensure_future(self.xds.run())
        flusher = asyncio.ensure_future(self._flush_access_log())
        log.info("sidecar %s: admin on %s:%d, control %s", self.node.id, host, self.admin.port,
                 ",".join(self.opts.control))
        await stop.wait()
        flusher.cancel()
        self.draining = True
        log.info("draining: readiness off, waiting %.1fs before closing listeners", self.opts.drain_delay_s)
        if self.opts.drain_delay_s:
            await asyncio.sleep(self.opts.drain_delay_s)
        await self.listeners.drain_all(self.opts.drain_timeout_s)
        self.xds.stop()
        await xds_task
        closing = self.http_pool.close()
        if inspect.isawaitable(closing):
            await closing
        await self.health.close()
        await self.grpc_pool.close()
        await self.h2_pool.close()
        await self.admin.stop()
        self.dataplane.access_log.close()
        if self.span_exporter is not None:
            await asyncio.to_thread(self.span_exporter.shutdown)
        return 0


def dump_config(config: RuntimeConfig) -> dict:
    def clean(v):
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if not f.name.startswith("_") and f.name != "regex"}
        if isinstance(v, (tuple, list)):
            return [clean(x) for x in v]
        if isinstance(v, dict) or hasattr(v, "items"):
            return {k: clean(x) for k, x in v.items()}
        return v
    return clean(config)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
