"""`--workers N` scaling: HTTP/1.1 req/s through a gateway with 1 and with 2 worker processes.

Each run starts its own control server and gateway (mesh.yaml with fresh gateway ports, the same
nginx upstream), unpinned so the workers can spread over both cores, and drives it with wrk
(64 connections).  On this 2-core machine the load generator and nginx share those cores, so
"when the cores are free" cannot hold here: the ratio shows what a second worker buys on a busy
2-core box, not the scaling on idle cores.

What can be measured here is what decides scaling on free cores: the requests per CPU-second of
the workers together (summed over every worker process) against one worker's.  Under a load
that keeps every worker busy, as wrk's 64 connections do (SO_REUSEPORT gives each worker ~32,
and a few suffice to fill a core), N workers on N free cores do N times one worker's work at
that efficiency; the report gives this projection next to the measured ratio, labelled as a
projection.  Each worker's share of the CPU is reported too: on this busy box it mostly shows
how the scheduler shared the cores, and on free cores an uneven connection split would show up
as latency, not throughput.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from bench import loadtools, procs
from bench.mesh import PROTOMESH, mesh_doc, start_control

CONNECTIONS = 64


def one(ctx, workers: int, seconds: float) -> dict:
    p = ctx.procs
    http_port, grpc_port, admin = procs.free_port(), procs.free_port(), procs.free_port_run(workers)
    mesh_file = ctx.workdir / f"mesh-workers{workers}.yaml"
    ng = ctx.nginx
    mesh_file.write_text(yaml.safe_dump(mesh_doc(ng.http_port, ng.grpc_port, ng.grpc_port, http_port, grpc_port),
                                        sort_keys=False))
    control, xds = start_control(p, mesh_file, procs.LOAD_CPU, name=f"control-workers{workers}")
    gateway = p.start(f"gateway-workers{workers}", [
        PROTOMESH, "sidecar", "--gateway", "--control", f"127.0.0.1:{xds}", "--admin", f"127.0.0.1:{admin}",
        "--access-log", "off", "--workers", workers])
    try:
        for k in range(workers):
            procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{admin + k}/ready"), 30,
                             f"gateway worker {k}", gateway)
        url = f"http://127.0.0.1:{http_port}/"
        procs.run_pinned(loadtools.wrk_cmd(url, CONNECTIONS, 1), "0,1", timeout=31)  # warm-up
        pids = worker_pids(gateway.pid)
        if len(pids) != workers:
            raise RuntimeError(f"--workers {workers}: found {len(pids)} worker processes ({pids})")
        cpu0 = [procs.cpu_seconds(pid) for pid in pids]
        out = procs.run_pinned(loadtools.wrk_cmd(url, CONNECTIONS, seconds), "0,1", timeout=seconds + 30,
                               log=ctx.workdir / f"wrk-workers{workers}.log")
        cpu = [procs.cpu_seconds(pid) - c for pid, c in zip(pids, cpu0)]
        r = loadtools.parse_wrk(out)
        total = sum(cpu)
        return {"req_per_s": r["req_per_s"], "p99_ms": r["p99_ms"], "non_2xx": r["non_2xx"],
                "cpu_s": round(total, 2), "req_per_cpu_s": round(r["requests"] / total) if total else None,
                "cpu_share": [round(c / total, 3) for c in cpu] if total else None}
    finally:
        p.stop(gateway, timeout=15)
        p.stop(control)


def projected_scaling(efficiency: float, workers: int = 2) -> float:
    """`workers` busy workers on as many free cores against one worker on one: each does one
    worker's work at the measured per-CPU efficiency (see the module docstring)."""
    return round(workers * efficiency, 2)


def worker_pids(first: int) -> list[int]:
    """Worker 0 (the process we started) and the workers it started (its children)."""
    children = Path(f"/proc/{first}/task/{first}/children").read_text().split()
    return [first, *map(int, children)]


def run(ctx) -> dict:
    a = ctx.args
    runs = {1: [], 2: []}
    for _ in range(a.repeat):
        for n in (1, 2):
            runs[n].append(one(ctx, n, a.duration))

    def median(n, key="req_per_s"):
        vals = sorted(r[key] for r in runs[n])
        return vals[len(vals) // 2]
    one_w, two_w = median(1), median(2)
    eff1, eff2 = median(1, "req_per_cpu_s"), median(2, "req_per_cpu_s")
    efficiency = round(eff2 / eff1, 2) if eff1 else None
    spread = min(min(r["cpu_share"]) for r in runs[2])
    return {"one_worker_req_per_s": one_w, "two_workers_req_per_s": two_w,
            "scaling": round(two_w / one_w, 2) if one_w else None,
            "one_worker_req_per_cpu_s": eff1, "two_workers_req_per_cpu_s": eff2,
            "efficiency_2_vs_1": efficiency,
            "smallest_worker_cpu_share": spread,
            "projected_scaling_free_cores": projected_scaling(efficiency) if efficiency else None,
            "runs": {str(k): v for k, v in runs.items()},
            "note": "unpinned; wrk and nginx share the same 2 cores, so the cores are not free"}
