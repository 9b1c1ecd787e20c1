"""`protomesh demo` / `make demo`: the whole mesh on this machine, real traffic, a readable summary.

It starts a trace collector (unless --otlp points at a running Jaeger), the control server, two
users replicas, orders and products — each behind its own sidecar — and the gateway; sends HTTP
and gRPC traffic through the gateway; prints per-route results, replica spread and trace ids;
then stops every process it started (by PID).  --serve keeps the mesh up until Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

from demo.topology import Topology, admin_json
from demo.traffic import Driver, Results
from protomesh.collector import Collector
from protomesh.telemetry import setup_tracing, shutdown_tracing


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def render_summary(results: Results, users_cluster: dict | None, trace_note: str, wall_s: float) -> str:
    lines = ["", "=" * 100, "protomesh demo — traffic through the gateway", "=" * 100]
    lines.append(f"{'route':48} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for route, outs in sorted(results.by_route().items()):
        ms = [o.ms for o in outs]
        statuses = {}
        for o in outs:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        st = ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items()))
        lines.append(f"{route:48} {len(outs):>6} {percentile(ms, .5):>8.2f} {percentile(ms, .99):>8.2f}  {st}")
    total = len(results.outcomes)
    lines.append(f"{total} calls in {wall_s:.1f}s")
    lines.append("")
    lines.append("Which replica served (from served_by / x-served-by):")
    for service, counter in sorted(results.served().items()):
        spread = ", ".join(f"{who}: {n}" for who, n in sorted(counter.items()))
        lines.append(f"  {service:10} {spread}")
    lines.append("")
    lines.append("Sidecar view of the users cluster at the gateway (/clusters):")
    if users_cluster is None:
        lines.append("  (unavailable)")
    else:
        for ep in users_cluster["endpoints"]:
            lines.append(f"  {ep['address']:22} {ep['labels'].get('replica', ''):10} served={ep['served']}")
        lines.append(f"  policy: {users_cluster['lb_policy']}")
    lines.append("")
    lines.append("A few traces (one per kind of call):")
    seen = set()
    for o in results.outcomes:
        if o.route not in seen and o.trace_id != "0" * 32:
            seen.add(o.route)
            lines.append(f"  {o.trace_id}  {o.route} [{o.status}]")
    lines.append(trace_note)
    return "\n".join(lines)


async def _collect(collector: Collector, results: Results, out: Path) -> str:
    """Wait (bounded) until the sidecars' spans of the demo's traces arrived; describe them."""
    wanted = {o.trace_id for o in results.outcomes}

    def gateway_spans_arrived(spans):
        seen = {s["trace_id"] for s in spans if s["service"].startswith("sidecar.gateway")}
        return len(seen & wanted) >= 0.9 * len(wanted)
    try:
        await collector.wait_for(gateway_spans_arrived, timeout=15)
    except TimeoutError as exc:
        print(f"(not every trace arrived: {exc})")
    spans = collector.spans()
    services = sorted({s["service"] for s in spans})
    hops = max((len({s["service"] for s in t}) for t in collector.traces().values()), default=0)
    (out / "summary.json").write_text(json.dumps({
        "calls": len(results.outcomes), "routes": {r: len(o) for r, o in results.by_route().items()},
        "served": {k: dict(v) for k, v in results.served().items()},
        "traces": len(collector.traces()), "spans": len(spans), "services": services}, indent=2))
    return (f"{len(spans)} spans in {len(collector.traces())} traces from {len(services)} services "
            f"(up to {hops} services in one trace) reached the demo's OTLP collector, saved to\n"
            f"  {out / 'traces.otlp.jsonl'} (OTLP/JSON, one export per line).\n"
            "Open them in Jaeger later: `docker compose -f deploy/docker-compose.yml up jaeger`, then "
            "Search → Upload JSON at http://localhost:16686;\nor run `make demo DEMO_ARGS=\"--otlp http://localhost:4317\"` "
            "while Jaeger runs.")


async def run_demo(args) -> int:
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    collector = None
    if args.otlp:
        otlp = args.otlp
        trace_note = f"Traces were exported to {otlp}; open Jaeger's UI (http://localhost:16686) and search by trace id."
    else:
        collector = Collector("127.0.0.1:0", out / "traces.otlp.jsonl")
        await collector.start()
        otlp = collector.endpoint
    setup_tracing("demo-client", otlp, 1.0)
    topo = Topology(out, otlp=otlp)
    results = Results()
    code = 0
    try:
        print(f"starting the mesh (logs in {out / 'logs'}) ...", flush=True)
        await asyncio.to_thread(topo.start_all, args.users_replicas, args.envoy)
        print(f"mesh ready: gateway http://127.0.0.1:{topo.gateway_http} (HTTP) and 127.0.0.1:{topo.gateway_grpc} (gRPC); "
              f"control xDS 127.0.0.1:{topo.xds_port}", flush=True)
        driver = Driver(f"http://127.0.0.1:{topo.gateway_http}", f"127.0.0.1:{topo.gateway_grpc}", results)
        started = time.perf_counter()
        await driver.run(args.rounds)
        wall = time.perf_counter() - started
        try:
            users_cluster = admin_json(topo.gateway_admin, "/clusters")["clusters"]["users"]
        except (OSError, KeyError, ValueError):
            users_cluster = None
        if args.serve:
            print("\n--serve: the mesh keeps running; Ctrl-C stops it.", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        # Stopping flushes every process's batched spans to the collector.
        await asyncio.to_thread(topo.stop_all)
        await asyncio.to_thread(shutdown_tracing)
        if collector is not None:
            trace_note = await _collect(collector, results, out)
        print(render_summary(results, users_cluster, trace_note, wall), flush=True)
        ok = sum(1 for o in results.outcomes if o.status in ("200", "OK"))
        expected_errors = sum(1 for o in results.outcomes if o.status in ("404", "NOT_FOUND"))
        if ok + expected_errors != len(results.outcomes):
            print(f"\n{len(results.outcomes) - ok - expected_errors} calls failed unexpectedly; see {out / 'logs'}")
            code = 1
    finally:
        await asyncio.to_thread(topo.stop_all)
        await asyncio.to_thread(shutdown_tracing)
        if collector is not None:
            await collector.stop()
    print("all demo processes stopped.")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="protomesh demo", description=__doc__)
    p.add_argument("--rounds", type=int, default=100, help="rounds of traffic (each: HTTP + several gRPC calls)")
    p.add_argument("--users-replicas", type=int, default=2)
    p.add_argument("--otlp", help="send traces to this OTLP/gRPC endpoint (e.g. Jaeger's http://localhost:4317)")
    p.add_argument("--out", default="demo-output", help="directory for logs, mesh.yaml, traces")
    p.add_argument("--serve", action="store_true", help="keep the mesh running after the traffic")
    p.add_argument("--envoy", choices=("users", "orders", "products"),
                   help="run this service behind a real Envoy sidecar (from .venv-envoy) instead of ours")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 100000:
        p.error("--rounds must be in 1..100000")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run_demo(args))
