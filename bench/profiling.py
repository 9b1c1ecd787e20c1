"""py-spy profiles of the protomesh gateway under load, in extra runs that no median includes.

Two extra runs per case: one records a flame graph (bench/results/profile-<case>.svg), one
collapsed stacks, from which the top frames by own time and by inclusive time are listed.
`--nonblocking` keeps py-spy from pausing the gateway to sample it.
"""
from __future__ import annotations

import collections
from pathlib import Path

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
RESULTS = Path(__file__).resolve().parent / "results"
SECONDS = 5


def top_frames(collapsed: str, n: int = 12) -> dict:
    own, incl = collections.Counter(), collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c

    def fmt(counter):
        return [{"frame": f, "pct": round(100 * c / total, 1)} for f, c in counter.most_common(n)]
    return {"samples": total, "own": fmt(own), "inclusive": fmt(incl)}


def profile(ctx, name: str, load, pid: int | None = None) -> dict:
    """Profile `pid` (default: the protomesh gateway) while `load(seconds)` runs, twice."""
    if not PY_SPY.exists():
        return {"skipped": "py-spy is not installed in .venv"}
    pid = pid or ctx.targets["protomesh"].proxy_pid
    svg = RESULTS / f"profile-{name}.svg"
    raw = ctx.workdir / f"profile-{name}.collapsed"
    for fmt, path in (("flamegraph", svg), ("raw", raw)):
        spy = ctx.procs.start(f"py-spy-{name}", [PY_SPY, "record", "--nonblocking", "--rate", "200", "-f", fmt,
                                                 "-o", path, "--pid", pid, "--duration", SECONDS],
                              cpus=procs.LOAD_CPU)
        load(SECONDS + 2)
        try:
            spy.wait(timeout=30)
        finally:
            ctx.procs.stop(spy)
    if not raw.exists():
        return {"skipped": f"py-spy wrote nothing (see {ctx.workdir}/py-spy-{name}.log)"}
    out = top_frames(raw.read_text())
    out["flamegraph"] = str(svg.relative_to(ROOT)) if svg.exists() else None
    return out
