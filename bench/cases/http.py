"""HTTP/1.1 small GET at 64 connections (wrk): req/s, p99, requests per proxy CPU-second."""
from __future__ import annotations

from bench import loadtools, procs, profiling
from bench.setup import TARGETS, summarize

CONNECTIONS = 64


def _cpu_pid(ctx, target) -> int:
    return target.proxy_pid or ctx.nginx.proc.pid


def one_run(ctx, target, seconds: float) -> dict:
    url = f"http://127.0.0.1:{target.http_port}/"
    pid = _cpu_pid(ctx, target)
    watch = procs.CpuWatch([pid] + ([ctx.nginx.proc.pid] if target.proxy_pid else []))
    cpu0 = procs.cpu_seconds(pid)
    out = procs.run_pinned(loadtools.wrk_cmd(url, CONNECTIONS, seconds), procs.LOAD_CPU,
                           timeout=seconds + 30, log=ctx.workdir / "wrk.log")
    cpu = procs.cpu_seconds(pid) - cpu0
    r = loadtools.parse_wrk(out)
    r["cpu_s"] = cpu
    r["foreign_cpu_s"] = watch.foreign_cpu_s()
    r["req_per_cpu_s"] = r["requests"] / cpu if cpu > 0 else None
    return r


def run(ctx) -> dict:
    a = ctx.args
    runs = {t: [] for t in TARGETS}
    for t in TARGETS:  # warm-up: connections, pools, caches
        one_run(ctx, ctx.targets[t], 1)
    for _ in range(a.repeat):
        for t in TARGETS:
            runs[t].append(one_run(ctx, ctx.targets[t], a.duration))
    out = {t: summarize(runs[t], ("req_per_s", "p50_ms", "p99_ms", "req_per_cpu_s", "cpu_s", "foreign_cpu_s"),
                        ("non_2xx", "socket_errors")) for t in TARGETS}
    out["direct"]["cpu_is"] = "nginx (the upstream)"
    out["connections"] = CONNECTIONS
    if a.profile:
        out["profile"] = profiling.profile(ctx, "http", lambda s: one_run(ctx, ctx.targets["protomesh"], s))
    return out
