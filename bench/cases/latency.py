"""Latency at low load: one connection, sequential requests.  Reports proxied − direct p50."""
from __future__ import annotations

import json
import subprocess

from bench import loadtools, procs
from bench.setup import TARGETS, summarize


def http_run(ctx, target, seconds: float) -> dict:
    url = f"http://127.0.0.1:{target.http_port}/"
    cmd = ["wrk", "-t1", "-c1", f"-d{max(1, round(seconds))}s", "--latency", url]
    return loadtools.parse_wrk(procs.run_pinned(cmd, procs.LOAD_CPU, timeout=seconds + 30,
                                                log=ctx.workdir / "wrk-latency.log"))


def grpc_run(ctx, target, seconds: float) -> dict:
    cmd = ["taskset", "-c", procs.LOAD_CPU, *ctx.py_cmd(
        "bench.grpc_load", "unary-seq", "--target", f"127.0.0.1:{target.grpc_port}",
        "--calls", 20000, "--duration", seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=ctx.py_env())
    if out.returncode != 0:
        raise RuntimeError(f"unary latency client failed: {out.stderr[-400:]}")
    return json.loads(out.stdout)


def run(ctx) -> dict:
    a = ctx.args
    seconds = max(2.0, a.duration / 2)
    http = {t: [] for t in TARGETS}
    grpc = {t: [] for t in TARGETS}
    for _ in range(a.repeat):
        for t in TARGETS:
            http[t].append(http_run(ctx, ctx.targets[t], seconds))
            grpc[t].append(grpc_run(ctx, ctx.targets[t], seconds))
    out = {"http": {t: summarize(http[t], ("p50_ms", "p99_ms", "req_per_s"), ("non_2xx", "socket_errors"))
                    for t in TARGETS},
           "grpc": {t: summarize(grpc[t], ("p50_ms", "p99_ms"), ("errors",)) for t in TARGETS}}
    for kind in ("http", "grpc"):
        d = out[kind]
        for proxy in ("envoy", "protomesh"):
            if d[proxy]["p50_ms"] is not None and d["direct"]["p50_ms"] is not None:
                d[f"{proxy}_added_p50_ms"] = d[proxy]["p50_ms"] - d["direct"]["p50_ms"]
                d[f"{proxy}_added_p99_ms"] = d[proxy]["p99_ms"] - d["direct"]["p99_ms"]
        d["added_p50_ms"] = d.get("protomesh_added_p50_ms")
    return out
