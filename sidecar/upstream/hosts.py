"""Which endpoints a request may go to: drop the unhealthy (active checks) and the ejected
(outlier detection), spread load over priority levels, and fall back to every endpoint of a level
when too few are healthy (panic threshold), as Envoy does.

Pure: `host_set` is computed once per change of endpoints or health, not per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

from sidecar.config.model import Endpoint

OVERPROVISIONING = 1.4  # Envoy's default overprovisioning_factor (140)


@dataclass(frozen=True, slots=True)
class Level:
    priority: int
    hosts: tuple[Endpoint, ...]
    load: float  # percent of requests this level takes
    panic: bool  # too few healthy: every endpoint of the level is used


@dataclass(frozen=True, slots=True)
class HostSet:
    levels: tuple[Level, ...]

    def pick_level(self, rand: Callable[[], float]) -> tuple[Endpoint, ...]:
        levels = self.levels
        if len(levels) == 1:
            return levels[0].hosts
        point = rand() * 100.0
        for level in levels:
            point -= level.load
            if point < 0:
                return level.hosts
        return levels[-1].hosts

    @property
    def panic(self) -> bool:
        return any(l.panic for l in self.levels)


def host_set(endpoints: Sequence[Endpoint], unhealthy: Collection[str], panic_threshold: float) -> HostSet:
    by_priority: dict[int, list[Endpoint]] = {}
    for ep in endpoints:
        by_priority.setdefault(ep.priority, []).append(ep)
    if not by_priority:
        return HostSet(())
    prios = sorted(by_priority)
    healthy = {p: [e for e in by_priority[p] if e.address not in unhealthy] for p in prios}
    health = {p: min(100.0, OVERPROVISIONING * 100.0 * len(healthy[p]) / len(by_priority[p])) for p in prios}
    total = sum(health.values())
    loads: dict[int, float] = {}
    if total <= 0:
        loads = {p: (100.0 if p == prios[0] else 0.0) for p in prios}
    elif total < 100.0:
        loads = {p: health[p] * 100.0 / total for p in prios}  # normalised: nothing is lost
    else:
        remaining = 100.0
        for p in prios:
            loads[p] = min(remaining, health[p])
            remaining -= loads[p]
    levels = []
    for p in prios:
        if loads[p] <= 0:
            continue
        share = 100.0 * len(healthy[p]) / len(by_priority[p])
        panic = share < panic_threshold or not healthy[p]
        hosts = tuple(by_priority[p]) if panic else tuple(healthy[p])
        levels.append(Level(p, hosts, loads[p], panic))
    return HostSet(tuple(levels))
