"""Control-plane convergence: one endpoint change reaching N live ADS streams, made two ways.

`protomesh control` owns the proxy core; N simulated sidecars (bench/control_sim.py) run in
several processes on the other core.  Once every stream is synced and nothing has arrived for a
second (registrations have settled):

1. registration (the headline figure, `push_*`): one more sidecar of service `bench` opens its
   ADS stream (`control_sim.Registrant`) — how endpoints change in a running mesh.  Each stream's
   delay is from the moment that stream is opened (connect and first request included) until it
   has written its ACK of the EDS holding the new endpoint.  No file poll is involved; the
   server's 100 ms push debounce is.
2. mesh.yaml edit (`edit_*`): `bench`'s static endpoint is rewritten.  Delay from the write; the
   control server polls the file every 0.5 s (`--watch-interval`), so up to 0.5 s of each delay
   is that poll (`edit_file_poll_ms` says how much it was this time).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import time
import urllib.request

import yaml

from bench import procs, profiling
from bench.control_sim import Registrant
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


def _marked(outs, port: int) -> int:
    states = [_read(o.with_name(o.name + ".status")) or {} for o in outs]
    return sum(s.get("marked", {}).get(str(port), 0) for s in states)


def _wait_marked(outs, sims, port: int, want: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in sims):
        if _marked(outs, port) >= want:
            return
        time.sleep(0.05)


def _delays(outs, port: int, since: float, before: float, key: str = "marker_at") -> list[float]:
    """ms from `since` until each stream had ACKed `port` (`key` "received_at": had received
    it), for streams synced before `before`."""
    out = []
    for o in outs:
        r = _read(o) or {}
        marks = r.get(key, {}).get(str(port), [])
        out += [(t - since) * 1000 for t, s in zip(marks, r.get("synced_at", []))
                if t is not None and s is not None and s < before]
    return sorted(out)


def _admin_port(log_path) -> int | None:
    m = re.search(r"admin on port (\d+)", log_path.read_text(errors="replace")) if log_path.exists() else None
    return int(m.group(1)) if m else None


def _server_acks(admin: int | None, since: float) -> tuple[list[float], int]:
    """The control server's own view (/nodes): ms from `since` to the arrival of each simulated
    stream's last EDS ACK, and how many streams are not in sync (sent != acked)."""
    if admin is None:
        return [], -1
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/nodes", timeout=30) as resp:
        nodes = json.loads(resp.read())
    eds = [n["types"].get("EDS", {}) for n in nodes if n["node"].startswith("sim-")]
    delays = sorted((e["acked_at"] - since) * 1000 for e in eds if e.get("acked_at", 0) > since)
    return delays, sum(1 for e in eds if e.get("pending") or e.get("acked") != e.get("sent"))


def _stats(prefix: str, marks: list[float]) -> dict:
    def pct(q):
        return marks[min(len(marks) - 1, int(q * len(marks)))] if marks else None
    return {f"{prefix}_first_ms": marks[0] if marks else None, f"{prefix}_p50_ms": pct(0.5),
            f"{prefix}_p99_ms": pct(0.99), f"{prefix}_max_ms": marks[-1] if marks else None,
            f"{prefix}_mean_ms": statistics.fmean(marks) if marks else None}


def run(ctx) -> dict:
    n = ctx.args.control_streams
    # Simulator processes, all on the load core; four were no faster than two at 5,000 streams
    # (more processes, more switching between them on one core).
    workers = 2 if n >= 100 else 1
    wd = ctx.workdir / "control-case"
    wd.mkdir(exist_ok=True)
    mesh_file = wd / "mesh.yaml"
    mesh_file.write_text(_mesh(1))
    reg_port, edit_port = 2, 3  # markers: the registered endpoint, then the edited static one
    control, xds = start_control(ctx.procs, mesh_file, procs.PROXY_CPU, name="control-bench")
    sims, outs = [], []
    per = -(-n // workers)
    setup_timeout = ctx.args.control_setup_timeout
    registrant = None
    try:
        for w in range(workers):
            first, count = w * per, min(per, n - w * per)
            if count <= 0:
                break
            out = wd / f"sim-{w}.json"
            outs.append(out)
            sims.append(ctx.procs.start(f"control-sim-{w}", [
                sys.executable, "-m", "bench.control_sim", "--xds", f"127.0.0.1:{xds}", "--first", first,
                "--count", count, "--services", SERVICES, "--marker-port", reg_port, "--marker-port", edit_port,
                "--timeout", setup_timeout + 90, "--out", out], cpus=procs.LOAD_CPU))
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
                             "the change was measured on those")
        rss_control = procs.memory_mb(control.pid)
        cpu0, sim_cpu0 = procs.cpu_seconds(control.pid), _cpu(sims)
        before_change = time.time()
        registrant = Registrant(f"127.0.0.1:{xds}", reg_port)
        registrant.start()
        _wait_marked(outs, sims, reg_port, synced)
        cpu_push, sim_cpu_push = procs.cpu_seconds(control.pid) - cpu0, _cpu(sims) - sim_cpu0
        time.sleep(0.5)  # ACKs written by the last streams reach the server
        server_acks, unsynced = _server_acks(_admin_port(ctx.workdir / "control-bench.log"),
                                             registrant.started_at or before_change)
        time.sleep(1.0)  # let the ACKs settle before the second change
        cpu1 = procs.cpu_seconds(control.pid)
        edit_at = time.time()
        mesh_file.write_text(_mesh(edit_port))
        _wait_marked(outs, sims, edit_port, synced)
        cpu_edit = procs.cpu_seconds(control.pid) - cpu1
    finally:
        if registrant is not None:
            registrant.close()
        for p in sims:
            ctx.procs.stop(p)
        ctx.procs.stop(control)
    change_at = registrant.started_at or before_change
    errors, samples = 0, []
    retries, retried, gave_up, gave_up_samples, retry_errors = 0, 0, 0, [], {}
    for o in outs:
        r = _read(o) or {"error_count": 0, "errors": ["no result file"]}
        errors += r["error_count"]
        samples += r["errors"]
        retries += r.get("connect_retries", 0)
        retried += r.get("streams_retried", 0)
        gave_up += r.get("gave_up", 0)
        gave_up_samples += r.get("gave_up_errors", [])
        for k, v in r.get("retry_errors", {}).items():
            retry_errors[k] = retry_errors.get(k, 0) + v
    marks = _delays(outs, reg_port, change_at, before_change)
    received = _delays(outs, reg_port, change_at, before_change, "received_at")
    edits = _delays(outs, edit_port, edit_at, before_change)
    reload_at = _reload_time(ctx.workdir / "control-bench.log")
    reload_ms = (reload_at - edit_at) * 1000 if reload_at else None
    result = {"streams": n, "processes": len(outs), "synced_before_edit": synced, "converged": len(marks),
              "edit_converged": len(edits), "stream_errors": errors, "error_samples": samples[:5],
              "connect_retries": retries, "retry_errors": retry_errors, "streams_retried": retried, "streams_gave_up": gave_up,
              "gave_up_errors": sorted(set(gave_up_samples))[:5], "registrant_error": registrant.error,
              "settle_s": settled_after, "setup_timeout_s": setup_timeout, "profile_during_connect": profile,
              "trigger": "registration: a new `bench` sidecar opens its ADS stream; delay from the "
                         "moment it opens (connect included) until each stream has written its ACK of the new EDS",
              **_stats("push", marks), **_stats("edit", edits),
              # the same change seen by the server: its receipt of each stream's ACK (/nodes), and
              # by the simulators: their receipt of the EDS (before writing the ACK)
              **_stats("push_server_ack", server_acks), "server_acks": len(server_acks),
              "streams_not_in_sync_after_push": unsynced, **_stats("push_received", received),
              "edit_file_poll_ms": reload_ms,  # edit -> the control server noticed it (log line, ms resolution)
              "control_cpu_s_for_push": cpu_push, "control_cpu_s_for_edit": cpu_edit,
              # the simulators share one core: near 1 s per second of push, they were the limit
              "sims_cpu_s_for_push": sim_cpu_push,
              "control_rss_mb": rss_control.get("VmRSS"),
              "note": "push_* = registration -> ACK of the new EDS written (no file poll; 100 ms debounce); edit_* = "
                      "mesh.yaml write -> ACK written (includes the 0.5 s file poll and the debounce)"}
    ctx.notes.append(
        f"control: the change is a sidecar registration (no file poll): {len(marks)} streams got it, ms from "
        f"its stream opening p50 {_f(result['push_p50_ms'])} p99 {_f(result['push_p99_ms'])} max "
        f"{_f(result['push_max_ms'])} (the server had {len(server_acks)} of their ACKs: p99 "
        f"{_f(result['push_server_ack_p99_ms'])}; EDS received p99 {_f(result['push_received_p99_ms'])}); a mesh.yaml edit (0.5 s poll) reached {len(edits)}: p50 "
        f"{_f(result['edit_p50_ms'])} p99 {_f(result['edit_p99_ms'])} max {_f(result['edit_max_ms'])} "
        f"(file poll {_f(reload_ms)}); connect retries {retries} on {retried} streams, {gave_up} gave up")
    return result


def _cpu(sims) -> float:
    return sum(procs.cpu_seconds(p.pid) for p in sims if p.poll() is None)


def _f(v) -> str:
    return "-" if v is None else f"{v:,.0f}"
