"""Control server process wiring: mesh watcher → views → ADS/CSDS (on our HTTP/2 gRPC server,
or on grpc.aio with `--xds-engine grpcio`); admin on aiohttp."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from envoy.service.status.v3 import csds_pb2_grpc

from control import ads_h2
from control.gcwatch import GcWatch
from control.registry import Registry
from control.server import ControlPlane
from control.sources.meshfile import MeshWatcher
from control.views import Views
from control.wire import add_ads_to_server
from protomesh.admin import AdminServer
from sidecar.h2.grpcserver import GrpcH2Server

log = logging.getLogger("protomesh.control")


@dataclasses.dataclass
class ControlOptions:
    mesh: str
    xds: str = "0.0.0.0:15010"
    admin: str = "0.0.0.0:15000"
    grace_s: float = 5.0
    warmup_s: float = 0.0
    debounce_s: float = 0.1
    watch_interval_s: float = 0.5
    xds_engine: str = "h2"  # or "grpcio" (sidecar/listeners/grpc_engine.py chooses)
    # A sidecar silent this long is PINGed; no answer within the timeout ends its streams (and,
    # after the grace, its endpoints).  0 disables.  The h2 engine only.
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0


def only_endpoints_differ(old, new) -> bool:
    """True when two meshes differ at most in services' static endpoints — the common edit,
    which then costs one EDS rebuild instead of rebuilding every node's whole view."""
    if (old.gateway, old.telemetry, old.proto_paths) != (new.gateway, new.telemetry, new.proto_paths) \
            or old.services.keys() != new.services.keys():
        return False
    return all(dataclasses.replace(old.services[n], endpoints=()) == dataclasses.replace(new.services[n], endpoints=())
               for n in old.services)


class ControlServer:
    def __init__(self, opts: ControlOptions):
        self.opts = opts
        self.registry = Registry(opts.grace_s)
        self.watcher = MeshWatcher(opts.mesh, self._on_mesh, opts.watch_interval_s)
        mesh = self.watcher.load_initial()  # raises MeshError on a broken mesh
        self.views = Views(mesh, self.registry)
        self.plane = ControlPlane(self.views, self.registry, opts.debounce_s, opts.warmup_s)
        self.gc = GcWatch()
        self.plane.on_push_done = self.gc.after_push
        self.plane.on_push_start = self.gc.before_push
        self.admin = AdminServer(self.ready, self.metrics, {
            "/nodes": self.plane.status, "/config_dump": self.config_dump})
        self.server: grpc.aio.Server | None = None
        self.h2: GrpcH2Server | None = None
        self.xds_port = 0
        self.started = time.time()

    def _on_mesh(self, mesh) -> None:
        if only_endpoints_differ(self.views.mesh, mesh):
            services = {n for n, s in mesh.services.items() if s.endpoints != self.views.mesh.services[n].endpoints}
            self.views.mesh = mesh  # same listeners, routes and clusters: only EDS changes
            self.plane.changed(endpoints_only=True, services=services)
        else:
            self.plane.changed(mesh)

    def ready(self) -> tuple[bool, str]:
        return (self.xds_port != 0, "starting" if self.xds_port == 0 else "")

    def metrics(self) -> str:
        lines = ["# TYPE protomesh_control_streams gauge",
                 f"protomesh_control_streams {len(self.plane.streams)}",
                 "# TYPE protomesh_control_pushes_total counter",
                 f"protomesh_control_pushes_total {self.plane.pushes}",
                 "# TYPE protomesh_control_nacks_total counter",
                 f"protomesh_control_nacks_total {self.plane.nacks}",
                 "# TYPE protomesh_control_mesh_reloads_total counter",
                 f"protomesh_control_mesh_reloads_total {self.watcher.reloads}",
                 "# TYPE protomesh_control_mesh_rejected_total counter",
                 f"protomesh_control_mesh_rejected_total {self.watcher.rejected}",
                 "# TYPE protomesh_control_generation gauge",
                 f"protomesh_control_generation {self.views.generation}",
                 "# TYPE protomesh_control_gc_pause_seconds_total counter",
                 *(f'protomesh_control_gc_pause_seconds_total{{generation="{g}"}} {s:.3f}'
                   for g, s in enumerate(self.gc.pauses_s))]
        return "\n".join(lines) + "\n"

    def config_dump(self) -> dict:
        mesh = self.views.mesh
        return {
            "mesh_file": mesh.source, "generation": self.views.generation,
            "mesh_error": self.watcher.error,
            "services": {n: {"protocol": s.protocol, "lb": s.lb, "timeout_s": s.timeout_s,
                             "static_endpoints": [f"{h}:{p}" for h, p in s.endpoints],
                             "grpc_services": [g.full_name for g in s.grpc_services],
                             "registered": [r.node_id for r in self.registry.endpoints(n)]}
                         for n, s in mesh.services.items()},
            "gateway": dataclasses.asdict(mesh.gateway) if mesh.gateway else None,
        }

    async def start(self) -> None:
        self.gc.install()
        keepalive = (self.opts.keepalive_s, self.opts.keepalive_timeout_s) if self.opts.keepalive_s > 0 else None
        if self.opts.xds_engine == "grpcio":
            # No keepalive here: given grpc-core's keepalive options, a grpc.aio server still
            # kept a peer that stopped answering PINGs for 30 s and more (tests/control/test_ads_h2.py
            # checks the h2 engine only).
            server = grpc.aio.server()
            add_ads_to_server(self.plane, server)  # shared pre-encoded responses pass through
            csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(self.plane, server)
            port = server.add_insecure_port(self.opts.xds)
            if not port:
                raise OSError(f"cannot listen for xDS on {self.opts.xds}")
            await server.start()
            self.server = server
        else:
            self.h2 = GrpcH2Server(ads_h2.methods(self.plane), keepalive=keepalive)
            host, _, port_text = self.opts.xds.rpartition(":")
            try:
                port = await self.h2.start(host.strip("[]"), int(port_text))
            except (OSError, ValueError) as exc:
                raise OSError(f"cannot listen for xDS on {self.opts.xds}: {exc}") from None
        self.xds_port = port
        host, _, port = self.opts.admin.rpartition(":")
        await self.admin.start(host, int(port))
        self._tasks = [asyncio.ensure_future(self.watcher.run()),
                       asyncio.ensure_future(self.plane.expire_registrations()),
                       asyncio.ensure_future(self._full_collections())]
        log.info("control server: xDS on port %d (%s engine), admin on port %d, mesh %s", self.xds_port,
                 self.opts.xds_engine, self.admin.port, self.opts.mesh)

    async def _full_collections(self) -> None:
        """Reclaim cyclic garbage among frozen objects now and then, between pushes."""
        while True:
            await asyncio.sleep(30)
            self.gc.maybe_full_collect(self.plane.busy())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.h2 is not None:
            await self.h2.stop(grace_s=1.0)
        await self.admin.stop()
        self.gc.remove()

    async def run(self, stop: asyncio.Event) -> int:
        await self.start()
        await stop.wait()
        await self.stop()
        return 0
