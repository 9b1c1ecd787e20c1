"""bench/results/latest.png: protomesh relative to Envoy (and to direct) per metric."""
from __future__ import annotations

from pathlib import Path

from bench.report import _get

BARS = [  # label, case, metric
    ("HTTP req/s", "http", "req_per_s"),
    ("HTTP req/CPU-s", "http", "req_per_cpu_s"),
    ("gRPC unary calls/s", "grpc_unary", "calls_per_s"),
    ("gRPC unary calls/CPU-s", "grpc_unary", "calls_per_cpu_s"),
    ("gRPC bidi msgs/s", "grpc_stream", "msgs_per_s"),
    ("gRPC bidi msgs/CPU-s", "grpc_stream", "msgs_per_cpu_s"),
]


def draw(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, vs_envoy, vs_direct = [], [], []
    for label, case, metric in BARS:
        p, e, d = (_get(results, f"{case}.{t}.{metric}") for t in ("protomesh", "envoy", "direct"))
        if p is None or not e:
            continue
        labels.append(label)
        vs_envoy.append(p / e)
        vs_direct.append(p / d if d and "CPU" not in label else 0)
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.8))
    xs = range(len(labels))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], vs_envoy, w, label="protomesh ÷ Envoy", color="#3b6ea8")
    b2 = ax.bar([x + w / 2 for x in xs], vs_direct, w, label="protomesh ÷ direct (throughput only)", color="#9bbf6a")
    for bars in (b1, b2):
        for b in bars:
            if b.get_height() > 0:
                ax.annotate(f"{b.get_height():.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=9)
    ax.set_ylabel("ratio (1.0 = as good)")
    m = results.get("machine", {})
    ax.set_title(f"protomesh gateway vs Envoy {m.get('envoy', '')} — {m.get('cores', '?')} cores, "
                 f"proxy pinned to one", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
