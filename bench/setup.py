"""Start everything the data-plane cases share: upstreams, one Envoy, the protomesh gateway.

Targets: `direct` (straight at the upstreams), `envoy`, `protomesh`.  Each names the ports the
load goes to and the PID whose CPU time counts (the proxy; for `direct`, the upstream).
"""
from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import envoy, gen, mesh, procs, upstreams

TARGETS = ("direct", "envoy", "protomesh")


@dataclass
class Target:
    name: str
    http_port: int
    grpc_port: int     # bench.v1.Unary (nginx behind)
    stream_port: int   # bench.v1.Stream (Python upstream behind)
    proxy_pid: int | None  # None for direct


@dataclass
class Ctx:
    args: object
    workdir: Path
    procs: procs.Procs
    gen_dir: Path | None = None
    nginx: upstreams.Nginx | None = None
    stream_pid: int | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    mesh: mesh.Mesh | None = None
    notes: list[str] = field(default_factory=list)

    def py_env(self) -> dict:
        return {**os.environ, "PYTHONPATH": f"{self.gen_dir}:{Path(__file__).resolve().parent.parent}"}

    def py_cmd(self, module: str, *args) -> list[str]:
        return [sys.executable, "-m", module, *map(str, args)]


def start_all(ctx: Ctx) -> None:
    p, wd = ctx.procs, ctx.workdir
    ctx.gen_dir = gen.generate(wd / "gen")
    ctx.nginx = upstreams.start_nginx(p, wd)
    stream_proc, stream_port = upstreams.start_grpc_upstream(p, ctx.gen_dir)
    ctx.stream_pid = stream_proc.pid
    ng = ctx.nginx
    ctx.targets["direct"] = Target("direct", ng.http_port, ng.grpc_port, stream_port, None)
    eh, eg, es = procs.free_port(), procs.free_port(), procs.free_port()
    eproc, _ = envoy.start_envoy(p, wd, "envoy", [("http", eh, ng.http_port, False),
                                                  ("grpc", eg, ng.grpc_port, True),
                                                  ("stream", es, stream_port, True)])
    ctx.targets["envoy"] = Target("envoy", eh, eg, es, eproc.pid)
    ctx.mesh = mesh.start_mesh(p, wd, ng.http_port, ng.grpc_port, stream_port)
    m = ctx.mesh
    ctx.targets["protomesh"] = Target("protomesh", m.http_port, m.grpc_port, m.grpc_port, m.gateway.pid)


def median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], keys: tuple[str, ...], totals: tuple[str, ...] = ()) -> dict:
    """Median of each key over the repeats, sums of the error counters, and the raw runs."""
    out = {k: median(runs, k) for k in keys}
    out.update({k: sum(r.get(k, 0) for r in runs) for k in totals})
    out["runs"] = runs
    return out
