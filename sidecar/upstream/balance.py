"""Endpoint choice.  The pick functions are pure (state and randomness passed in); `Balancer`
holds the little state a policy needs, keyed by endpoint address so it survives config swaps."""
from __future__ import annotations

import random
from typing import Callable, Sequence

from sidecar.config.model import Endpoint
from sidecar.upstream.hashing import Maglev, Ring


def pick_round_robin(endpoints: Sequence[Endpoint], counter: int) -> Endpoint:
    return endpoints[counter % len(endpoints)]


def pick_least_request(endpoints: Sequence[Endpoint], active: dict[str, int],
                       rand: Callable[[], float]) -> Endpoint:
    """Power of two choices: sample two distinct endpoints, keep the one with fewer active
    requests per unit of weight (ties go to the first sample)."""
    n = len(endpoints)
    if n == 1:
        return endpoints[0]
    i = int(rand() * n) % n
    j = int(rand() * (n - 1)) % (n - 1)
    if j >= i:
        j += 1
    a, b = endpoints[i], endpoints[j]
    load_a = active.get(a.address, 0) / a.weight
    load_b = active.get(b.address, 0) / b.weight
    return b if load_b < load_a else a


def pick_smooth_weighted(endpoints: Sequence[Endpoint], current: dict[str, int]) -> Endpoint:
    """Smooth weighted round robin (nginx): every endpoint gains its weight, the leader is
    chosen and pays back the total.  Weights 5:1:1 give a a b a c a a, never a burst of five."""
    total = 0
    best = None
    best_w = 0
    for ep in endpoints:
        w = current.get(ep.address, 0) + ep.weight
        current[ep.address] = w
        total += ep.weight
        if best is None or w > best_w:
            best, best_w = ep, w
    current[best.address] = best_w - total
    return best


def pick_random(endpoints: Sequence[Endpoint], rand: Callable[[], float]) -> Endpoint:
    return endpoints[int(rand() * len(endpoints)) % len(endpoints)]


class Balancer:
    """One per cluster.  `active` counts requests in flight per endpoint for least-request and
    for /clusters; callers must `release` what they `pick`."""

    __slots__ = ("policy", "counter", "active", "served", "rand", "current", "_table_for",
                 "_table", "ring_min", "ring_max", "maglev_size", "_uniform_for", "_is_uniform")

    def __init__(self, policy: str, rand: Callable[[], float] = random.random, *,
                 ring_min: int = 1024, ring_max: int = 8 << 20, maglev_size: int = 65537):
        self.policy = policy
        self.counter = 0
        self.active: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.rand = rand
        self.current: dict[str, int] = {}  # smooth weighted round robin state
        self._table_for: Sequence[Endpoint] | None = None  # endpoints the hash table was built from
        self._table = None
        self.ring_min, self.ring_max, self.maglev_size = ring_min, ring_max, maglev_size
        self._uniform_for: Sequence[Endpoint] | None = None
        self._is_uniform = True

    def _hash_table(self, endpoints: Sequence[Endpoint]):
        """Built once per endpoint set (the tuple is replaced on every change)."""
        if self._table_for is not endpoints:
            if self.policy == "maglev":
                self._table = Maglev(endpoints, self.maglev_size)
            else:
                self._table = Ring(endpoints, self.ring_min, self.ring_max)
            self._table_for = endpoints
        return self._table

    def _uniform(self, endpoints: Sequence[Endpoint]) -> bool:
        if self._uniform_for is not endpoints:
            self._uniform_for = endpoints
            self._is_uniform = len({e.weight for e in endpoints}) <= 1
        return self._is_uniform

    def pick(self, endpoints: Sequence[Endpoint], hash_key: int | None = None) -> Endpoint | None:
        """`hash_key` (from the route's hash_policy) drives ring_hash and maglev; without one
        they pick at random, as Envoy does."""
        if not endpoints:
            return None
        policy = self.policy
        if policy == "least_request":
            ep = pick_least_request(endpoints, self.active, self.rand)
        elif policy == "random":
            ep = pick_random(endpoints, self.rand)
        elif policy == "ring_hash" or policy == "maglev":
            if hash_key is None:
                ep = pick_random(endpoints, self.rand)
            else:
                ep = endpoints[self._hash_table(endpoints).lookup(hash_key)]
        elif not self._uniform(endpoints):
            ep = pick_smooth_weighted(endpoints, self.current)
        else:
            self.counter += 1
            ep = pick_round_robin(endpoints, self.counter)
        addr = ep.address
        self.active[addr] = self.active.get(addr, 0) + 1
        self.served[addr] = self.served.get(addr, 0) + 1
        return ep

    def release(self, endpoint: Endpoint) -> None:
        addr = endpoint.address
        left = self.active.get(addr, 0) - 1
        if left > 0:
            self.active[addr] = left
        else:
            self.active.pop(addr, None)
