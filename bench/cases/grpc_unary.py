"""gRPC unary (h2load, gRPC-framed body): calls/s and calls per proxy CPU-second.

h2load ignores `grpc-status`, so successes are counted where the call ends: nginx's access log
(one line per call it answered).  h2load's own count is kept to show the difference.
"""
from __future__ import annotations

from bench import loadtools, procs, profiling, upstreams
from bench.setup import TARGETS, summarize

CLIENTS, STREAMS = 8, 16  # 128 calls in flight


def one_run(ctx, target, seconds: float) -> dict:
    body = ctx.workdir / "unary-request.bin"
    if not body.exists():
        body.write_bytes(upstreams.grpc_frame(b"\x0a\x01x"))  # Msg{payload: "x"}
    url = f"http://127.0.0.1:{target.grpc_port}{upstreams.ECHO_PATH}"
    pid = target.proxy_pid or ctx.nginx.proc.pid
    served0 = upstreams.wait_served_flushed(ctx.nginx)
    watch = procs.CpuWatch([pid] + ([ctx.nginx.proc.pid] if target.proxy_pid else []))
    cpu0 = procs.cpu_seconds(pid)
    out = procs.run_pinned(loadtools.h2load_cmd(url, str(body), CLIENTS, STREAMS, seconds), procs.LOAD_CPU,
                           timeout=seconds + 30, log=ctx.workdir / "h2load.log")
    cpu = procs.cpu_seconds(pid) - cpu0
    served = upstreams.wait_served_flushed(ctx.nginx) - served0
    r = loadtools.parse_h2load(out)
    r.update(cpu_s=cpu, served=served, foreign_cpu_s=watch.foreign_cpu_s(), calls_per_cpu_s=served / cpu if cpu > 0 else None,
             calls_per_s=served / r["seconds"] if r.get("seconds") else None,
             not_served=max(0, r["succeeded"] - served))
    return r


def run(ctx) -> dict:
    a = ctx.args
    runs = {t: [] for t in TARGETS}
    for t in TARGETS:
        one_run(ctx, ctx.targets[t], 1)
    for _ in range(a.repeat):
        for t in TARGETS:
            runs[t].append(one_run(ctx, ctx.targets[t], a.duration))
    out = {t: summarize(runs[t], ("calls_per_s", "calls_per_cpu_s", "cpu_s", "foreign_cpu_s"),
                        ("served", "not_served", "failed", "errored", "timeout")) for t in TARGETS}
    out["direct"]["cpu_is"] = "nginx (the upstream)"
    out["in_flight"] = CLIENTS * STREAMS
    if a.profile:
        out["profile"] = profiling.profile(ctx, "grpc_unary", lambda s: one_run(ctx, ctx.targets["protomesh"], s))
    return out
