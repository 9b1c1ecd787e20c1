"""Control-plane convergence: one endpoint edit in mesh.yaml reaching N live ADS streams.

`protomesh control` owns the proxy core; N simulated sidecars (bench/control_sim.py) run in
several processes on the other core.  Once every stream is synced and nothing has arrived for a
second (registrations have settled), mesh.yaml's static endpoint of `bench` is rewritten, and each
stream's delay is the time from that write to its ACK of the EDS holding the new endpoint.
The control server polls mesh.yaml every 0.5 s, so up to 0.5 s of each delay is that poll.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import yaml

from bench import procs, profiling
from bench.mesh import start_control

SERVICES = 20


def _mesh(endpoint_port: int) -> str:
    services = {"bench": {"protocol": "http", "endpoints": [f"127.0.0.1:{endpoint_port}"]}}
    services.update({f"app-{k}": {"protocol": "http"} for k in range(SERVICES)})
    return yaml.safe_dump({"services": services}, sort_keys=False)


def _read(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reload_time(log_path) -> float | None:
    """Wall-clock time of the control server's last "mesh reloaded" log line."""
    try:
        lines = [l for l in log_path.read_text().splitlines() if "mesh reloaded" in l]
    except OSError:
        return None
    if not lines:
        return None
    stamp, _, ms = " ".join(lines[-1].split()[:2]).partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def run(ctx) -> dict:
    n = ctx.args.control_streams
    workers = 4 if n >= 100 else 1
    wd = ctx.workdir / "control-case"
    wd.mkdir(exist_ok=True)
    mesh_file = wd / "mesh.yaml"
    mesh_file.write_text(_mesh(1))
    marker = 2
    control, xds = start_control(ctx.procs, mesh_file, procs.PROXY_CPU, name="control-bench")
    sims, outs = [], []
    per = -(-n // workers)
    setup_timeout = ctx.args.control_setup_timeout
    try:
        for w in range(workers):
            first, count = w * per, min(per, n - w * per)
            if count <= 0:
                break
            out = wd / f"sim-{w}.json"
            outs.append(out)
            sims.append(ctx.procs.start(f"control-sim-{w}", [
                sys.executable, "-m", "bench.control_sim", "--xds", f"127.0.0.1:{xds}", "--first", first,
                "--count", count, "--services", SERVICES, "--marker-port", marker,
                "--timeout", setup_timeout + 60, "--out", out], cpus=procs.LOAD_CPU))
        t0 = time.monotonic()
        profile = None
        if ctx.args.profile:  # the control server while the streams connect and register
            time.sleep(3)
            profile = profiling.profile(ctx, "control", time.sleep, pid=control.pid)
        settled_after = None
        while time.monotonic() - t0 < setup_timeout:
            states = [_read(o.with_name(o.name + ".status")) for o in outs]
            if all(states):
                synced = sum(s["synced"] for s in states)
                quiet = time.time() - max(s["last_rx"] for s in states)
                if synced >= n and quiet > 1.0:
                    settled_after = time.monotonic() - t0
                    break
            if any(p.poll() is not None for p in sims):
                raise RuntimeError("a control_sim process exited early (see control-sim-*.log)")
            time.sleep(0.25)
        synced = sum(s["synced"] for s in (_read(o.with_name(o.name + ".status")) or {"synced": 0} for o in outs))
        if settled_after is None:
            ctx.notes.append(f"control: only {synced} of {n} streams were synced after {setup_timeout:.0f}s; "
                             "the edit was measured on those")
        cpu0 = procs.cpu_seconds(control.pid)
        rss_control = procs.memory_mb(control.pid)
        edit_at = time.time()
        mesh_file.write_text(_mesh(marker))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.poll() is None for p in sims):
            states = [_read(o.with_name(o.name + ".status")) or {"marked": 0} for o in outs]
            if sum(s["marked"] for s in states) >= synced:
                break
            time.sleep(0.1)
        cpu_push = procs.cpu_seconds(control.pid) - cpu0
    finally:
        for p in sims:
            ctx.procs.stop(p)
        ctx.procs.stop(control)
    marks, errors, samples = [], 0, []
    for o in outs:
        r = _read(o) or {"marker_at": [], "error_count": 0, "errors": ["no result file"]}
        marks += [(t - edit_at) * 1000 for t, s in zip(r["marker_at"], r.get("synced_at", []))
                  if t is not None and s is not None and s < edit_at]
        errors += r["error_count"]
        samples += r["errors"]
    marks.sort()
    reload_at = _reload_time(ctx.workdir / "control-bench.log")
    reload_ms = (reload_at - edit_at) * 1000 if reload_at else None

    def pct(q):
        return marks[min(len(marks) - 1, int(q * len(marks)))] if marks else None
    return {"streams": n, "processes": len(outs), "synced_before_edit": synced, "converged": len(marks),
            "stream_errors": errors, "error_samples": samples[:5], "settle_s": settled_after,
            "setup_timeout_s": setup_timeout, "profile_during_connect": profile,
            "push_first_ms": marks[0] if marks else None, "push_p50_ms": pct(0.5),
            "push_p99_ms": pct(0.99), "push_max_ms": marks[-1] if marks else None,
            "push_mean_ms": statistics.fmean(marks) if marks else None,
            "file_poll_ms": reload_ms,  # edit -> the control server noticed it (log line, ms resolution)
            "push_p50_after_reload_ms": pct(0.5) - reload_ms if marks and reload_ms is not None else None,
            "push_p99_after_reload_ms": pct(0.99) - reload_ms if marks and reload_ms is not None else None,
            "control_cpu_s_for_push": cpu_push, "control_rss_mb": rss_control.get("VmRSS"),
            "note": "delay = mesh.yaml write -> stream ACKs the new EDS; includes the control "
                    "server's 0.5 s file poll and 50 ms debounce"}
