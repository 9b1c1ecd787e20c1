"""protomesh as users run it: `protomesh control --mesh mesh.yaml` + `protomesh sidecar --gateway`.

The gateway is the full sidecar: access log on (a file in the scratch dir), metrics on, tracing
at the default sampling (mesh.yaml `telemetry` names only the endpoint), with sampled spans
exported over OTLP to a real receiver (`protomesh collector`, on the load core).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import procs
from bench.gen import PROTO_DIR

ROOT = Path(__file__).resolve().parent.parent
PROTOMESH = ROOT / ".venv" / "bin" / "protomesh"


def mesh_doc(http_upstream: int, unary_upstream: int, stream_upstream: int,
             http_port: int, grpc_port: int, otlp: str | None = None) -> dict:
    doc = {
        "proto_paths": [str(PROTO_DIR)],
        "services": {
            "bench": {"protocol": "http", "endpoints": [f"127.0.0.1:{http_upstream}"]},
            "bench-unary": {"protocol": "grpc", "proto": "bench.proto", "timeout": "0s",
                            "endpoints": [f"127.0.0.1:{unary_upstream}"]},
            "bench-stream": {"protocol": "grpc", "proto": "bench_stream.proto", "timeout": "0s",
                             "endpoints": [f"127.0.0.1:{stream_upstream}"]},
        },
        "gateway": {
            "http": f"127.0.0.1:{http_port}",
            "grpc": f"127.0.0.1:{grpc_port}",
            "routes": [
                {"match": {"path_prefix": "/"}, "to": "bench"},
                {"match": {"grpc_service": "bench.v1.Unary"}, "to": "bench-unary"},
                {"match": {"grpc_service": "bench.v1.Stream"}, "to": "bench-stream"},
            ],
        },
    }
    if otlp:
        doc["telemetry"] = {"otlp_endpoint": otlp}  # sampling: the default
    return doc


def start_collector(p: procs.Procs) -> str:
    """An OTLP/gRPC receiver for the gateway's spans, on the load core; returns its endpoint."""
    port = procs.free_port()
    proc = p.start("collector", [PROTOMESH, "collector", "--listen", f"127.0.0.1:{port}"], cpus=procs.LOAD_CPU)
    procs.wait_until(lambda: procs.port_open(port), 30, "collector", proc)
    return f"http://127.0.0.1:{port}"


@dataclass
class Mesh:
    control: object
    gateway: object
    http_port: int
    grpc_port: int
    admin_port: int
    access_log: Path


def start_control(p: procs.Procs, mesh_file: Path, cpus: str, name: str = "control") -> tuple[object, int]:
    xds, admin = procs.free_port(), procs.free_port()
    proc = p.start(name, [PROTOMESH, "control", "--mesh", mesh_file, "--xds", f"127.0.0.1:{xds}",
                          "--admin", f"127.0.0.1:{admin}"], cpus=cpus)
    procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{admin}/healthz"), 30, name, proc)
    return proc, xds


def start_mesh(p: procs.Procs, workdir: Path, http_upstream: int, unary_upstream: int,
               stream_upstream: int) -> Mesh:
    http_port, grpc_port, admin = procs.free_port(), procs.free_port(), procs.free_port()
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(mesh_doc(http_upstream, unary_upstream, stream_upstream,
                                                 http_port, grpc_port, start_collector(p)), sort_keys=False))
    # The control server is idle during the load; it shares the load core, not the proxy's.
    control, xds = start_control(p, mesh_file, procs.LOAD_CPU)
    access_log = workdir / "gateway-access.log"
    gateway = p.start("gateway", [PROTOMESH, "sidecar", "--gateway", "--control", f"127.0.0.1:{xds}",
                                  "--admin", f"127.0.0.1:{admin}", "--access-log", access_log],
                      cpus=procs.PROXY_CPU)
    procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "protomesh gateway", gateway)
    return Mesh(control, gateway, http_port, grpc_port, admin, access_log)
