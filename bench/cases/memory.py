"""Memory of the proxies: RSS now and its peak (VmHWM) so far, from /proc/<pid>/status."""
from __future__ import annotations

from bench import procs


def snapshot(ctx) -> dict:
    out = {}
    for name in ("envoy", "protomesh"):
        pid = ctx.targets[name].proxy_pid
        out[name] = procs.memory_mb(pid)
    return out
