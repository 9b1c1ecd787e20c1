"""Consistent hashing: Envoy's ring hash (Karger's ring, weighted) and Maglev tables.

Tables are built once per endpoint set (off the per-request path) and looked up with one hash
and one bisect (ring) or one index (Maglev).  The hash is 64-bit blake2b, the same in every
sidecar, so two sidecars of one service send a key to the same endpoint.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Sequence

from sidecar.config.model import Endpoint


def hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little")


class Ring:
    """Each endpoint gets ring points in proportion to its weight; a key goes to the first
    point at or after its hash.

    Points per endpoint are minimum_ring_size / 8 per unit of weight (relative to the lightest),
    whatever the number of endpoints: so removing one of N moves only the keys its points held
    (about 1/N).  Envoy instead spreads minimum_ring_size over all endpoints, which also re-deals
    some keys among the others when N changes; the ring is capped at maximum_ring_size either way.
    """

    __slots__ = ("hashes", "owners")

    def __init__(self, endpoints: Sequence[Endpoint], min_size: int = 1024, max_size: int = 8 << 20):
        lightest = min((e.weight for e in endpoints), default=1) or 1
        per_unit = max(1, min_size // 8)
        total = sum(per_unit * e.weight / lightest for e in endpoints)
        scale = min(1.0, max_size / total) if total else 1.0
        points = []
        for i, ep in enumerate(endpoints):
            n = max(1, round(per_unit * ep.weight / lightest * scale))
            key = ep.address
            for k in range(n):
                points.append((hash64(f"{key}_{k}"), i))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]

    def lookup(self, h: int) -> int:
        """Index (into the endpoints it was built from) owning hash `h`."""
        i = bisect.bisect_left(self.hashes, h)
        if i == len(self.hashes):
            i = 0
        return self.owners[i]


class Maglev:
    """Maglev lookup table (Eisenbud et al. 2016), weighted as Envoy does: each endpoint fills
    table slots in turn from its own permutation, heavier ones proportionally more often."""

    __slots__ = ("table",)

    def __init__(self, endpoints: Sequence[Endpoint], size: int = 65537):
        m = size
        n = len(endpoints)
        table = [-1] * m
        if n:
            offsets, skips = [], []
            for ep in endpoints:
                h = hash64(ep.address)
                offsets.append(h % m)
                skips.append((h >> 32) % (m - 1) + 1)
            nexts = [0] * n
            max_w = max(e.weight for e in endpoints)
            progress = [0.0] * n
            filled = 0
            rounds = 0
            while filled < m:
                rounds += 1
                for i, ep in enumerate(endpoints):
                    progress[i] += ep.weight / max_w
                    if progress[i] < 1.0:
                        continue
                    progress[i] -= 1.0
                    c = (offsets[i] + nexts[i] * skips[i]) % m
                    while table[c] >= 0:
                        nexts[i] += 1
                        c = (offsets[i] + nexts[i] * skips[i]) % m
                    table[c] = i
                    nexts[i] += 1
                    filled += 1
                    if filled == m:
                        break
        self.table = table

    def lookup(self, h: int) -> int:
        return self.table[h % len(self.table)]
