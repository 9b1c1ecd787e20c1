"""Counters and latency histograms kept in plain dicts (cheap on the hot path) and rendered as
Prometheus text on demand by the admin server."""
from __future__ import annotations

import bisect

LATENCY_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Stats:
    def __init__(self, prefix: str = "protomesh"):
        self.prefix = prefix
        self.counters: dict[tuple, int] = {}
        self.histograms: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]
        self.gauges: dict[tuple, float] = {}

    def inc(self, name: str, labels: tuple = (), n: int = 1) -> None:
        key = (name, labels)
        self.counters[key] = self.counters.get(key, 0) + n

    def inc_key(self, key: tuple) -> None:
        """`inc` with the (name, labels) key built once by the caller (the request path)."""
        counters = self.counters
        counters[key] = counters.get(key, 0) + 1

    def observe_key(self, key: tuple, ms: float) -> None:
        h = self.histograms.get(key)
        if h is None:
            h = self.histograms[key] = [0] * (len(LATENCY_BUCKETS_MS) + 3)
        h[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        h[-2] += ms
        h[-1] += 1

    def set(self, name: str, labels: tuple, value: float) -> None:
        self.gauges[(name, labels)] = value

    def observe_ms(self, name: str, labels: tuple, ms: float) -> None:
        self.observe_key((name, labels), ms)

    def counter(self, name: str, labels: tuple = ()) -> int:
        return self.counters.get((name, labels), 0)

    def render(self) -> str:
        lines: list[str] = []
        seen: set[str] = set()

        def head(name: str, kind: str) -> str:
            full = f"{self.prefix}_{name}"
            if full not in seen:
                seen.add(full)
                lines.append(f"# TYPE {full} {kind}")
            return full

        for (name, labels), v in sorted(self.counters.items()):
            lines.append(f"{head(name + '_total', 'counter')}{_labels(labels)} {v}")
        for (name, labels), v in sorted(self.gauges.items()):
            lines.append(f"{head(name, 'gauge')}{_labels(labels)} {v:g}")
        for (name, labels), h in sorted(self.histograms.items()):
            full = head(name + "_ms", "histogram")
            running = 0
            for bound, count in zip(LATENCY_BUCKETS_MS + (float("inf"),), h[:-2]):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{full}_bucket{_labels(labels + (('le', le),))} {running}")
            lines.append(f"{full}_sum{_labels(labels)} {h[-2]:.3f}")
            lines.append(f"{full}_count{_labels(labels)} {h[-1]}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
