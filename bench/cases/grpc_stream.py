"""gRPC bidi streaming: N streams × M messages each way through each target; echoes/s."""
from __future__ import annotations

import json
import subprocess

from bench import procs
from bench.setup import TARGETS, summarize


def one_run(ctx, target, streams: int, messages: int) -> dict:
    pid = target.proxy_pid or ctx.stream_pid
    watch = procs.CpuWatch([pid] + ([ctx.stream_pid] if target.proxy_pid else []))
    cpu0 = procs.cpu_seconds(pid)
    cmd = ["taskset", "-c", procs.LOAD_CPU, *ctx.py_cmd(
        "bench.grpc_load", "bidi", "--target", f"127.0.0.1:{target.stream_port}", "--streams", streams,
        "--messages", messages, "--timeout", 120)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ctx.py_env())
    cpu = procs.cpu_seconds(pid) - cpu0
    if out.returncode != 0:
        raise RuntimeError(f"bidi load generator failed: {out.stderr[-400:]}")
    r = json.loads(out.stdout)
    r.update(cpu_s=cpu, foreign_cpu_s=watch.foreign_cpu_s(), msgs_per_cpu_s=r["messages"] / cpu if cpu > 0 else None)
    return r


def run(ctx) -> dict:
    a = ctx.args
    streams, messages = (8, 500) if a.quick else (16, 2000)
    runs = {t: [] for t in TARGETS}
    for t in TARGETS:
        one_run(ctx, ctx.targets[t], 2, 50)
    for _ in range(a.repeat):
        for t in TARGETS:
            runs[t].append(one_run(ctx, ctx.targets[t], streams, messages))
    out = {t: summarize(runs[t], ("msgs_per_s", "msgs_per_cpu_s", "cpu_s", "foreign_cpu_s"), ("errors",)) for t in TARGETS}
    for t in TARGETS:
        out[t]["missing"] = sum(r["expected"] - r["messages"] for r in runs[t])
    out["direct"]["cpu_is"] = "the Python gRPC upstream"
    out.update(streams=streams, messages_each_way=messages)
    return out
