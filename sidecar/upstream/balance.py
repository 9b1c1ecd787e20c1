"""Endpoint choice.  The pick functions are pure (state and randomness passed in); `Balancer`
holds the little state a policy needs, keyed by endpoint address so it survives config swaps."""
from __future__ import annotations

import random
from typing import Callable, Sequence

from sidecar.config.model import Endpoint


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


def pick_random(endpoints: Sequence[Endpoint], rand: Callable[[], float]) -> Endpoint:
    return endpoints[int(rand() * len(endpoints)) % len(endpoints)]


class Balancer:
    """One per cluster.  `active` counts requests in flight per endpoint for least-request and
    for /clusters; callers must `release` what they `pick`."""

    __slots__ = ("policy", "counter", "active", "served", "rand")

    def __init__(self, policy: str, rand: Callable[[], float] = random.random):
        self.policy = policy
        self.counter = 0
        self.active: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.rand = rand

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        if not endpoints:
            return None
        if self.policy == "least_request":
            ep = pick_least_request(endpoints, self.active, self.rand)
        elif self.policy == "random":
            ep = pick_random(endpoints, self.rand)
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
