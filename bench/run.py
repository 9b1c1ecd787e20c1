"""`make bench`: direct, Envoy and protomesh side by side in one run; prints the table and ratios.

    python -m bench.run [--quick] [--only http,grpc_unary,grpc_stream,latency,control]
                        [--duration S] [--repeat K] [--control-streams N] [--no-profile]

Writes bench/results/latest.json and latest.png; a full run (no --quick, no --only) also
rewrites README.md's performance section.  Every process started is stopped by PID at the end,
on errors and Ctrl-C too.  Scratch files and logs stay in a temp dir, printed at the end.
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import chart, machine, procs, readme, report
from bench.cases import control, grpc_stream, grpc_unary, http, latency, memory, workers
from bench.setup import Ctx, start_all

CASES = ("http", "grpc_unary", "grpc_stream", "latency", "control", "workers")
DATA_PLANE = {"http", "grpc_unary", "grpc_stream", "latency", "workers"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="make bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (3 s, 1 repeat, 200 control streams)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--duration", type=float, help="seconds per load run (default 8; quick 3)")
    ap.add_argument("--repeat", type=int, help="repeats per case, median reported (default 3; quick 1)")
    ap.add_argument("--control-streams", type=int, help="simulated sidecar ADS streams (default 5000, the target; quick 200)")
    ap.add_argument("--control-setup-timeout", type=float, default=None,
                    help="seconds the streams get to connect and settle before the edit (default 300)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the py-spy profiles of the protomesh gateway / control server")
    a = ap.parse_args(argv)
    a.duration = a.duration or (3.0 if a.quick else 8.0)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.control_streams = a.control_streams or (200 if a.quick else 5000)
    a.control_setup_timeout = a.control_setup_timeout or (60.0 if a.quick else 300.0)
    a.only = {c.strip() for c in a.only.split(",") if c.strip()} or set(CASES)
    unknown = a.only - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    if a.quick:
        a.profile = False
    return a


def check_tools(a) -> None:
    need = {"taskset": "util-linux"}
    if a.only & DATA_PLANE:
        need.update(wrk="wrk", h2load="nghttp2-client", nginx="nginx")
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in need.items()
               if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        sys.exit("bench: missing tools: " + ", ".join(missing) + " — `make bench` installs them when run as root")


def access_log_summary(path: Path) -> dict:
    """Every access-log line that is not a plain success, grouped (status, grpc_status, reason)."""
    total, odd = 0, collections.Counter()
    try:
        with open(path, "rb") as f:
            for line in f:
                total += 1
                if b'"status":200,' in line and b'"reason":""' in line and (
                        b'"grpc_status":0,' in line or b'"grpc_status":null' in line):
                    continue
                try:
                    r = json.loads(line)
                    odd[f"status={r.get('status')} grpc_status={r.get('grpc_status')} reason={r.get('reason')}"] += 1
                except ValueError:
                    odd["unparseable line"] += 1
    except OSError:
        return {"lines": 0}
    return {"lines": total, "not_ok": dict(odd)}


def log_problems(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [l for l in lines if " ERROR " in l or " WARNING " in l or "Traceback" in l or "Exception" in l]
    return bad[:limit] + ([f"... {len(bad) - limit} more"] if len(bad) > limit else [])


def run(a) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="protomesh-bench-"))
    ctx = Ctx(a, workdir, procs.Procs(workdir))
    results: dict = {"machine": machine.info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "args": {"quick": a.quick, "only": sorted(a.only), "duration_s": a.duration,
                              "repeat": a.repeat, "control_streams": a.control_streams},
                     "pinning": f"proxy on CPU {procs.PROXY_CPU}; load generators and upstreams on CPU {procs.LOAD_CPU}",
                     "scratch_dir": str(workdir)}
    print(f"bench: scratch dir {workdir}", flush=True)
    try:
        if a.only & DATA_PLANE:
            start_all(ctx)
            time.sleep(1.0)
            idle = memory.snapshot(ctx)
            results["memory"] = {"idle_rss_mb": idle["protomesh"]["VmRSS"], "envoy_idle_rss_mb": idle["envoy"]["VmRSS"]}
            for name, mod in (("http", http), ("grpc_unary", grpc_unary), ("grpc_stream", grpc_stream),
                              ("latency", latency)):
                if name not in a.only:
                    continue
                print(f"bench: {name} ...", flush=True)
                t0 = time.monotonic()
                results[name] = mod.run(ctx)
                results[name]["wall_s"] = round(time.monotonic() - t0, 1)
                if name == "http" or "loaded_rss_mb" not in results["memory"]:
                    peak = memory.snapshot(ctx)
                    results["memory"].update(loaded_rss_mb=peak["protomesh"]["VmHWM"],
                                             envoy_loaded_rss_mb=peak["envoy"]["VmHWM"],
                                             loaded_after=name)
            if "workers" in a.only:
                print("bench: workers ...", flush=True)
                results["workers"] = workers.run(ctx)
            time.sleep(1.0)  # the gateway flushes its access log twice a second
            results["protomesh_access_log"] = access_log_summary(ctx.mesh.access_log)
            results["protomesh_log_problems"] = log_problems(workdir / "gateway.log")
            results["envoy_log_problems"] = log_problems(workdir / "envoy.log")
            ctx.procs.stop_all()
        if "control" in a.only:
            print(f"bench: control ({a.control_streams} streams) ...", flush=True)
            results["control"] = control.run(ctx)
            results["control_log_problems"] = log_problems(workdir / "control-bench.log")
        results["notes"] = ctx.notes
    finally:
        ctx.procs.stop_all()
    return results


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    a = parse_args(argv)
    check_tools(a)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(a)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    table = report.table(results)
    results["table"] = table.splitlines()
    path = report.write_json(results)
    png = chart.draw(results, report.RESULTS / "latest.png")
    print()
    print(table)
    for note in results.get("notes", []):
        print(f"note: {note}")
    al = results.get("protomesh_access_log")
    if al:
        print(f"protomesh access log: {al['lines']} lines, not OK: {al.get('not_ok') or 'none'}")
    for key in ("protomesh_log_problems", "control_log_problems"):
        if results.get(key):
            print(f"{key}:\n  " + "\n  ".join(results[key]))
    print(f"\nresults: {path}" + (f", chart: {png}" if png else " (no chart: matplotlib missing)"))
    if not a.quick and set(CASES) <= a.only:
        command = "make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
        readme.update(readme.section(table, results["machine"], command, results["started"]))
        print("README.md performance section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
