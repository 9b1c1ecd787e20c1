"""The side-by-side table and the results JSON (bench/results/latest.json)."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# (label, case, metric, show ratio to direct)
ROWS = [
    ("HTTP/1.1 req/s, 64 conns", "http", "req_per_s", True),
    ("HTTP/1.1 p99 ms, 64 conns", "http", "p99_ms", False),
    ("HTTP/1.1 req per proxy CPU-s", "http", "req_per_cpu_s", False),
    ("gRPC unary calls/s", "grpc_unary", "calls_per_s", True),
    ("gRPC unary calls per proxy CPU-s", "grpc_unary", "calls_per_cpu_s", False),
    ("gRPC bidi msgs/s", "grpc_stream", "msgs_per_s", True),
    ("gRPC bidi msgs per proxy CPU-s", "grpc_stream", "msgs_per_cpu_s", False),
    ("HTTP p50 ms, 1 conn", "latency.http", "p50_ms", True),
    ("HTTP p99 ms, 1 conn", "latency.http", "p99_ms", True),
    ("gRPC unary p50 ms, sequential", "latency.grpc", "p50_ms", True),
    ("gRPC unary p99 ms, sequential", "latency.grpc", "p99_ms", True),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(results: dict) -> str:
    lines = [f"{'case':34} {'direct':>10} {'envoy':>10} {'protomesh':>10} {'pm:envoy':>9} {'pm:direct':>9}"]
    lines.append("-" * len(lines[0]))
    for label, case, metric, vs_direct in ROWS:
        c = _get(results, case)
        if not c:
            continue
        d, e, p = (_get(c, f"{t}.{metric}") for t in ("direct", "envoy", "protomesh"))
        direct = _fmt(d) if vs_direct else f"({_fmt(d)})"
        lines.append(f"{label:34} {direct:>10} {_fmt(e):>10} {_fmt(p):>10} {_ratio(p, e):>9} "
                     f"{(_ratio(p, d) if vs_direct else '-'):>9}")
    foreign = [(case, t, _get(results, f"{case}.{t}.foreign_cpu_s")) for case in ("http", "grpc_unary", "grpc_stream")
               for t in ("direct", "envoy", "protomesh")]
    busy = [f"{c}/{t} {v:.1f}s" for c, t, v in foreign if v is not None and v > 0.5]
    if busy:
        lines.append(f"{'':34} other work on the machine during runs (median CPU-s): {', '.join(busy)}")
    lat = results.get("latency")
    if lat:
        for kind in ("http", "grpc"):
            lines.append(f"{'added p50 ms, ' + kind:34} {'':>10} {_fmt(lat[kind].get('envoy_added_p50_ms')):>10} "
                         f"{_fmt(lat[kind].get('protomesh_added_p50_ms')):>10}")
    mem = results.get("memory")
    if mem:
        lines.append(f"{'RSS MB idle (config applied)':34} {'':>10} {_fmt(mem.get('envoy_idle_rss_mb')):>10} "
                     f"{_fmt(mem.get('idle_rss_mb')):>10} {_ratio(mem.get('idle_rss_mb'), mem.get('envoy_idle_rss_mb')):>9}")
        lines.append(f"{'RSS MB peak after HTTP load':34} {'':>10} {_fmt(mem.get('envoy_loaded_rss_mb')):>10} "
                     f"{_fmt(mem.get('loaded_rss_mb')):>10} {_ratio(mem.get('loaded_rss_mb'), mem.get('envoy_loaded_rss_mb')):>9}")
    wk = results.get("workers")
    if wk and "scaling" in wk:
        lines.append("")
        lines.append(f"--workers: HTTP req/s with 1 worker {_fmt(wk['one_worker_req_per_s'])}, with 2 "
                     f"{_fmt(wk['two_workers_req_per_s'])} ({wk['scaling']}x; {wk['note']})")
        if wk.get("efficiency_2_vs_1") is not None:
            lines.append(f"  req per proxy CPU-s: 1 worker {_fmt(wk['one_worker_req_per_cpu_s'])}, 2 workers "
                         f"{_fmt(wk['two_workers_req_per_cpu_s'])} ({wk['efficiency_2_vs_1']}x), so on 2 free cores "
                         f"(projected, not measured): {wk['projected_scaling_free_cores']}x; the less busy worker "
                         f"had {wk['smallest_worker_cpu_share']:.0%} of the workers' CPU")
    ctl = results.get("control")
    if ctl:
        lines.append("")
        lines.append(f"control plane: {ctl['streams']} ADS streams requested, {ctl['synced_before_edit']} synced "
                     f"before the change ({_fmt(ctl['settle_s']) if ctl['settle_s'] else 'not all'} s to connect and settle), "
                     f"{ctl['converged']} got the new endpoint")
        lines.append(f"  endpoint change (a sidecar registers) -> ACK of the new EDS, ms: p50 {_fmt(ctl['push_p50_ms'])}, "
                     f"p99 {_fmt(ctl['push_p99_ms'])}, max {_fmt(ctl['push_max_ms'])}; control CPU for the push "
                     f"{_fmt(ctl['control_cpu_s_for_push'])} s")
        if ctl.get("edit_p99_ms") is not None:
            lines.append(f"  mesh.yaml edit -> ACK, ms: p50 {_fmt(ctl['edit_p50_ms'])}, p99 {_fmt(ctl['edit_p99_ms'])} "
                         f"(of which the 0.5 s file poll {_fmt(ctl.get('edit_file_poll_ms'))})")
    lines.append("")
    lines.append("(x) in the direct column of CPU rows is the upstream's own CPU efficiency (nginx / Python "
                 "gRPC server), not a proxy's.")
    lines.append("protomesh: full gateway sidecar, access log to a file, metrics on, tracing at the default "
                 "sampling (1%) exported over OTLP to a local receiver. Envoy: static bootstrap, no access log, "
                 "no tracing.")
    return "\n".join(lines)


def flatten_required(results: dict) -> dict:
    """The keys every results file must carry (checked by tests/bench/test_bench_smoke.py)."""
    return {k: _get(results, k) for k in REQUIRED}


REQUIRED = ("http.protomesh.req_per_cpu_s", "http.envoy.req_per_cpu_s",
            "grpc_unary.protomesh.calls_per_cpu_s", "grpc_unary.envoy.calls_per_cpu_s",
            "latency.http.added_p50_ms", "latency.grpc.added_p50_ms",
            "memory.idle_rss_mb", "memory.loaded_rss_mb", "control.streams", "control.push_p99_ms")


def write_json(results: dict, path: Path | None = None) -> Path:
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    return path
