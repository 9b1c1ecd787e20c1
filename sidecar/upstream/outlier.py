"""Passive health: eject endpoints that fail (Cluster.outlier_detection, Envoy's algorithm).

Consecutive 5xx and consecutive gateway failures eject at once when they reach their threshold;
success rate and failure percentage are judged at each interval sweep over the requests of that
interval.  An ejection lasts base_ejection_time × (times ejected), capped at max_ejection_time;
the count of ejections drops by one for every sweep a host spends healthy.  No more than
max_ejection_percent of the hosts are ejected at once, but one host always may be.

Time and randomness are passed in; the detector does no I/O.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

from sidecar.config.model import OutlierPolicy


class _Host:
    __slots__ = ("c5xx", "cgw", "ok", "total", "ejected_until", "times")

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.ok = 0
        self.total = 0
        self.ejected_until: float | None = None
        self.times = 0


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy, rand: Callable[[], float]):
        self.policy = policy
        self.rand = rand
        self.hosts: dict[str, _Host] = {}
        self.ejected: set[str] = set()
        self.ejections: dict[str, int] = {}  # by detector kind, for metrics
        self.next_sweep = 0.0

    def _host(self, addr: str) -> _Host:
        h = self.hosts.get(addr)
        if h is None:
            h = self.hosts[addr] = _Host()
        return h

    def record(self, addr: str, status: int, now: float) -> bool:
        """One attempt's result as an HTTP-like status (local failures as 502/503/504).
        Returns True when it ejected the host."""
        h = self._host(addr)
        h.total += 1
        if status < 500:
            h.ok += 1
            h.c5xx = h.cgw = 0
            return False
        p = self.policy
        h.c5xx += 1
        h.cgw = h.cgw + 1 if status in (502, 503, 504) else 0
        if h.c5xx >= p.consecutive_5xx and self._roll(p.enforcing_consecutive_5xx):
            return self._eject(addr, h, now, "consecutive_5xx")
        if h.cgw >= p.consecutive_gateway_failure and self._roll(p.enforcing_consecutive_gateway_failure):
            return self._eject(addr, h, now, "consecutive_gateway_failure")
        return False

    def _roll(self, percent: int) -> bool:
        return percent >= 100 or self.rand() * 100 < percent

    def _eject(self, addr: str, h: _Host, now: float, kind: str) -> bool:
        if h.ejected_until is not None:
            return False
        n = max(len(self.hosts), 1)
        if self.ejected and 100.0 * len(self.ejected) / n >= self.policy.max_ejection_percent:
            return False
        h.times += 1
        p = self.policy
        h.ejected_until = now + min(p.base_ejection_s * h.times, max(p.max_ejection_s, p.base_ejection_s))
        h.c5xx = h.cgw = 0
        self.ejected.add(addr)
        self.ejections[kind] = self.ejections.get(kind, 0) + 1
        return True

    def sweep(self, now: float, addresses: Iterable[str]) -> bool:
        """The interval's work: return hosts whose time is up, judge success rate and failure
        percentage, forget removed hosts.  Returns True when the ejected set changed."""
        live = set(addresses)
        for addr in [a for a in self.hosts if a not in live]:
            del self.hosts[addr]
            self.ejected.discard(addr)
        changed = False
        for addr, h in self.hosts.items():
            if h.ejected_until is not None and now >= h.ejected_until:
                h.ejected_until = None
                self.ejected.discard(addr)
                changed = True
            elif h.ejected_until is None and h.times > 0:
                h.times -= 1
        p = self.policy
        stats = {a: (h.ok, h.total) for a, h in self.hosts.items() if h.ejected_until is None}
        for addr in success_rate_outliers(stats, p):
            if self._roll(p.enforcing_success_rate):
                changed |= self._eject(addr, self.hosts[addr], now, "success_rate")
        for addr in failure_percentage_outliers(stats, p):
            if self._roll(p.enforcing_failure_percentage):
                changed |= self._eject(addr, self.hosts[addr], now, "failure_percentage")
        for h in self.hosts.values():
            h.ok = h.total = 0
        self.next_sweep = now + p.interval_s
        return changed

    def state(self, addr: str, now: float) -> dict:
        h = self.hosts.get(addr)
        if h is None:
            return {"ejected": False}
        out = {"ejected": h.ejected_until is not None, "times_ejected": h.times,
               "consecutive_5xx": h.c5xx}
        if h.ejected_until is not None:
            out["ejected_for_s"] = round(max(h.ejected_until - now, 0.0), 3)
        return out


def success_rate_outliers(stats: dict[str, tuple[int, int]], p: OutlierPolicy) -> list[str]:
    """Hosts whose success rate is below mean − stdev_factor × stdev of the hosts with enough
    requests; judged only when enough hosts have enough requests."""
    rates = {a: ok / total for a, (ok, total) in stats.items() if total >= p.success_rate_request_volume}
    if len(rates) < max(p.success_rate_minimum_hosts, 1):
        return []
    mean = sum(rates.values()) / len(rates)
    stdev = math.sqrt(sum((r - mean) ** 2 for r in rates.values()) / len(rates))
    limit = mean - p.success_rate_stdev_factor * stdev
    return sorted(a for a, r in rates.items() if r < limit)


def failure_percentage_outliers(stats: dict[str, tuple[int, int]], p: OutlierPolicy) -> list[str]:
    """Hosts failing at least failure_percentage_threshold % of their requests."""
    vols = {a: (ok, total) for a, (ok, total) in stats.items()
            if total >= p.failure_percentage_request_volume}
    if len(vols) < max(p.failure_percentage_minimum_hosts, 1):
        return []
    return sorted(a for a, (ok, total) in vols.items()
                  if 100.0 * (total - ok) / total >= p.failure_percentage_threshold)
