"""The demo mesh on one machine: control server, each service replica with its own sidecar, and
the gateway — every process real, on 127.0.0.1, on ports the OS hands out.

Used by `protomesh demo` and by the integration tests, so both exercise the same wiring a
deployment has (each app talks only to its own sidecar; sidecars find each other through the
control server).
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from protomesh.launch import Launcher, Proc, free_port, http_ok, tcp_open, wait_until

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = {"users": "grpc", "orders": "grpc", "products": "http"}


@dataclass
class Instance:
    service: str
    replica: str
    app_port: int
    inbound: int
    outbound_http: int
    outbound_grpc: int
    admin: int
    app: Proc | None = None
    sidecar: Proc | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"


@dataclass
class Topology:
    workdir: Path
    otlp: str | None = None
    mesh_extra: str = ""
    launcher: Launcher = None
    xds_port: int = 0
    control_admin: int = 0
    gateway_http: int = 0
    gateway_grpc: int = 0
    gateway_admin: int = 0
    instances: list[Instance] = field(default_factory=list)
    control: Proc | None = None
    gateway: Proc | None = None

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launcher = self.launcher or Launcher(self.workdir / "logs")
        self.xds_port, self.control_admin = free_port(), free_port()
        self.gateway_http, self.gateway_grpc, self.gateway_admin = free_port(), free_port(), free_port()

    @property
    def mesh_path(self) -> Path:
        return self.workdir / "mesh.yaml"

    @property
    def control_addr(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    def mesh_yaml(self, products_endpoints: list[str] | None = None) -> str:
        static = f", endpoints: {json.dumps(products_endpoints)}" if products_endpoints else ""
        otlp = f'telemetry: {{ otlp_endpoint: "{self.otlp}", sampling: 1.0 }}\n' if self.otlp else ""
        return (
            f"# Written by demo/topology.py for this run.\n"
            f"proto_paths: [{REPO / 'proto'}]\n"
            "services:\n"
            "  users:    { protocol: grpc, proto: demo/users/v1/users.proto, lb: round_robin, timeout: 5s }\n"
            "  orders:   { protocol: grpc, proto: demo/orders/v1/orders.proto, lb: least_request, timeout: 5s }\n"
            f"  products: {{ protocol: http, lb: round_robin, timeout: 5s{static} }}\n"
            "gateway:\n"
            f"  http: 127.0.0.1:{self.gateway_http}\n"
            f"  grpc: 127.0.0.1:{self.gateway_grpc}\n"
            "  routes:\n"
            "    - { name: products, match: { path_prefix: /v1/products }, to: products }\n"
            "    - { name: orders, match: { grpc_service: demo.orders.v1.Orders }, to: orders }\n"
            "    - { name: users, match: { grpc_service: demo.users.v1.Users }, to: users }\n"
            + self.mesh_extra + otlp
        )

    def write_mesh(self, text: str | None = None) -> None:
        tmp = self.mesh_path.with_suffix(".tmp")
        tmp.write_text(text if text is not None else self.mesh_yaml())
        tmp.replace(self.mesh_path)

    # ---- processes ----------------------------------------------------------------------------
    def start_control(self, grace_s: float = 2.0, warmup_s: float = 5.0) -> Proc:
        if not self.mesh_path.exists():
            self.write_mesh()
        self.control = self.launcher.start("control", [
            "control", "--mesh", str(self.mesh_path), "--xds", self.control_addr,
            "--admin", f"127.0.0.1:{self.control_admin}", "--grace", str(grace_s),
            "--warmup", str(warmup_s)])
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.control_admin}/ready"), 20,
                   "the control server to be ready", proc=self.control)
        return self.control

    def _otlp_args(self) -> list[str]:
        return ["--otlp", self.otlp] if self.otlp else []

    def start_instance(self, service: str, replica: str, *, state_dir: bool = True) -> Instance:
        inst = Instance(service, replica, free_port(), free_port(), free_port(), free_port(), free_port())
        app_args = ["service", service, "--listen", f"127.0.0.1:{inst.app_port}", "--replica", replica,
                    *self._otlp_args()]
        if service == "orders":
            app_args += ["--users", f"127.0.0.1:{inst.outbound_grpc}",
                         "--products", f"127.0.0.1:{inst.outbound_http}"]
        inst.app = self.launcher.start(replica, app_args)
        sidecar_args = [
            "sidecar", "--service", service, "--app", f"127.0.0.1:{inst.app_port}",
            "--control", self.control_addr, "--inbound", f"127.0.0.1:{inst.inbound}",
            "--outbound-http", f"127.0.0.1:{inst.outbound_http}",
            "--outbound-grpc", f"127.0.0.1:{inst.outbound_grpc}",
            "--admin", f"127.0.0.1:{inst.admin}", "--node-id", f"{replica}-sidecar",
            "--label", f"replica={replica}",
            "--access-log", str(self.workdir / "logs" / f"{replica}-sidecar.access.jsonl")]
        # No --otlp: sidecars take the tracing config the control server pushes (mesh.yaml telemetry).
        if state_dir:
            sidecar_args += ["--state-dir", str(self.workdir / "state")]
        inst.sidecar = self.launcher.start(f"{replica}-sidecar", sidecar_args)
        self.instances.append(inst)
        return inst

    def start_envoy_instance(self, service: str, replica: str, *, delta: bool = False,
                             users: str | None = None, app_env: dict | None = None) -> Instance:
        """One replica of `service` behind a real Envoy sidecar instead of ours: the app is the
        same, Envoy's listeners (inbound, outbound HTTP/gRPC) all come from the control server.
        For orders, `users` replaces the Envoy's outbound gRPC listener as the users target
        (e.g. `xds:///users`, proxyless, with the grpc xDS bootstrap in `app_env`).
        Needs `.venv-envoy` (`make envoy-venv`)."""
        from protomesh import envoy
        inst = Instance(service, replica, free_port(), free_port(), free_port(), free_port(), free_port())
        app_args = ["service", service, "--listen", f"127.0.0.1:{inst.app_port}", "--replica", replica,
                    *self._otlp_args()]
        if service == "orders":
            app_args += ["--users", users or f"127.0.0.1:{inst.outbound_grpc}",
                         "--products", f"127.0.0.1:{inst.outbound_http}"]
        meta = envoy.node_metadata(
            service=service, protocol=PROTOCOLS.get(service, ""), app=f"127.0.0.1:{inst.app_port}",
            inbound=f"127.0.0.1:{inst.inbound}", outbound_http=f"127.0.0.1:{inst.outbound_http}",
            outbound_grpc=f"127.0.0.1:{inst.outbound_grpc}", labels={"replica": replica})
        inst.app = self.launcher.start(replica, app_args, env=app_env)
        inst.sidecar = envoy.start(self.launcher, f"{replica}-envoy", envoy.bootstrap(
            f"{replica}-envoy", service, self.control_addr, inst.admin, meta, delta=delta))
        self.instances.append(inst)
        return inst

    def start_envoy_gateway(self, name: str = "envoy-gateway", *, delta: bool = False) -> dict:
        """A real Envoy as a second gateway: mesh.yaml's gateway routes, on its own ports (the
        node metadata moves the listeners).  Returns its ports and process."""
        from protomesh import envoy
        ports = {"http": free_port(), "grpc": free_port(), "admin": free_port()}
        meta = envoy.node_metadata(role="gateway", gateway_http=f"127.0.0.1:{ports['http']}",
                                   gateway_grpc=f"127.0.0.1:{ports['grpc']}")
        ports["proc"] = envoy.start(self.launcher, name, envoy.bootstrap(
            name, "gateway", self.control_addr, ports["admin"], meta, delta=delta))
        return ports

    def start_gateway(self) -> Proc:
        self.gateway = self.launcher.start("gateway", [
            "sidecar", "--gateway", "--control", self.control_addr, "--admin",
            f"127.0.0.1:{self.gateway_admin}", "--node-id", "gateway",
            "--access-log", str(self.workdir / "logs" / "gateway.access.jsonl"),
            "--state-dir", str(self.workdir / "state")])
        return self.gateway

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Every app listening and every sidecar ready (a sidecar's readiness says nothing about
        its app, as in Kubernetes, where the app has its own probe)."""
        for inst in self.instances:
            if inst.app is not None:
                wait_until(lambda: tcp_open("127.0.0.1", inst.app_port), timeout_s,
                           f"{inst.replica} to listen on {inst.app_port}", proc=inst.app)
            wait_until(lambda: http_ok(inst.admin_url + "/ready"), timeout_s,
                       f"sidecar of {inst.replica} to be ready", proc=inst.sidecar)
        if self.gateway is not None:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{self.gateway_admin}/ready"), timeout_s,
                       "the gateway to be ready", proc=self.gateway)

    def wait_endpoints(self, admin_port: int, cluster: str, count: int, timeout_s: float = 20.0,
                       at_least: bool = False) -> None:
        """Wait until a sidecar (by admin port) sees `count` (or, `at_least`, that many) endpoints."""
        def seen():
            n = len(admin_json(admin_port, "/clusters")["clusters"].get(cluster, {}).get("endpoints", []))
            return n >= count if at_least else n == count
        wait_until(seen, timeout_s, f"{count} endpoints of {cluster} on admin port {admin_port}")

    def start_all(self, users_replicas: int = 2, envoy_service: str | None = None) -> None:
        """The demo mesh; with `envoy_service`, that service's replicas run behind a real Envoy
        sidecar instead of ours (same control server, same mesh)."""
        from protomesh import envoy
        self.start_control()
        for service, replicas in (("users", users_replicas), ("orders", 1), ("products", 1)):
            start = self.start_envoy_instance if service == envoy_service else self.start_instance
            for i in range(replicas):
                start(service, f"{service}-{i + 1}")
        self.start_gateway()
        self.wait_ready()
        self.wait_endpoints(self.gateway_admin, "users", users_replicas)
        self.wait_endpoints(self.gateway_admin, "orders", 1)
        self.wait_endpoints(self.gateway_admin, "products", 1, at_least=True)
        for inst in self.instances:
            if inst.service != "orders":
                continue
            for cluster, count in (("users", users_replicas), ("products", 1)):
                if envoy_service == "orders":
                    wait_until(lambda: len(envoy.endpoints(inst.admin, cluster)) >= count, 20,
                               f"the orders Envoy to hold {cluster} endpoints", proc=inst.sidecar)
                else:
                    self.wait_endpoints(inst.admin, cluster, count, at_least=True)

    def stop_all(self) -> None:
        self.launcher.stop_all()


def admin_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())
