"""Consistent hashing, smooth weighted round robin and host sets with statistical bounds."""
import random
from collections import Counter

import pytest

from sidecar.config.model import Endpoint
from sidecar.upstream.balance import Balancer
from sidecar.upstream.hashing import Maglev, Ring, hash64
from sidecar.upstream.hosts import host_set

EPS = tuple(Endpoint("10.0.0.1", 8000 + i) for i in range(10))
KEYS = [hash64(f"user-{i}") for i in range(20000)]


@pytest.mark.parametrize("table", [lambda e: Ring(e, 1024), lambda e: Maglev(e, 65537)], ids=["ring", "maglev"])
def test_same_key_same_endpoint_and_minimal_disruption(table):
    t = table(EPS)
    before = [EPS[t.lookup(k)] for k in KEYS]
    again = table(EPS)
    assert before == [EPS[again.lookup(k)] for k in KEYS]  # deterministic across builds
    counts = Counter(e.port for e in before)
    assert all(1300 < c < 2700 for c in counts.values()), counts  # ~2000 each
    remaining = EPS[:3] + EPS[4:]
    t2 = table(remaining)
    after = [remaining[t2.lookup(k)] for k in KEYS]
    moved = sum(1 for a, b in zip(before, after) if a != b)
    orphaned = sum(1 for a in before if a == EPS[3])
    assert moved >= orphaned  # the removed endpoint's keys all moved...
    assert moved / len(KEYS) < 0.1 * 1.5, moved  # ...and not many more: ≈ 1/N (N = 10)


def test_ring_respects_weights():
    eps = (Endpoint("a", 1, weight=3), Endpoint("b", 1, weight=1))
    r = Ring(eps, 4096)
    counts = Counter(r.lookup(k) for k in KEYS)
    assert 0.68 < counts[0] / len(KEYS) < 0.82


def test_maglev_respects_weights():
    eps = (Endpoint("a", 1, weight=3), Endpoint("b", 1, weight=1))
    m = Maglev(eps, 65537)
    share = Counter(m.table)[0] / len(m.table)
    assert 0.72 < share < 0.78


def test_smooth_weighted_round_robin_is_exact_and_interleaved():
    eps = (Endpoint("a", 1, weight=5), Endpoint("b", 1, weight=1), Endpoint("c", 1, weight=1))
    b = Balancer("round_robin")
    picks = [b.pick(eps).host for _ in range(700)]
    assert Counter(picks) == {"a": 500, "b": 100, "c": 100}
    assert "aaaaaa" not in "".join(picks)  # smooth: no long bursts
    assert "".join(picks[:7]) in ("aabacaa", "abaacaa", "aabaaca", "aacabaa")


def test_balancer_hash_key_and_random_fallback():
    b = Balancer("ring_hash", random.Random(1).random)
    k = hash64("alice")
    first = b.pick(EPS, k)
    assert all(b.pick(EPS, k) == first for _ in range(50))
    assert len({b.pick(EPS).port for _ in range(200)}) > 5  # no key: spread at random


def test_host_set_drops_unhealthy_until_panic():
    eps = tuple(Endpoint("h", i) for i in range(4))
    hs = host_set(eps, {"h:0"}, 50.0)
    assert hs.levels[0].hosts == eps[1:] and not hs.panic
    hs = host_set(eps, {"h:0", "h:1", "h:2"}, 50.0)  # 25% healthy < 50%: panic, use all
    assert hs.levels[0].hosts == eps and hs.panic


def test_priority_failover_spills_by_health():
    p0 = tuple(Endpoint("p0", i, priority=0) for i in range(10))
    p1 = tuple(Endpoint("p1", i, priority=1) for i in range(10))
    hs = host_set(p0 + p1, set(), 50.0)
    assert [l.priority for l in hs.levels] == [0]  # healthy P0 takes everything
    down = {e.address for e in p0[:5]}  # 50% healthy × 1.4 = 70% stays on P0
    hs = host_set(p0 + p1, down, 0.0)
    loads = {l.priority: round(l.load) for l in hs.levels}
    assert loads == {0: 70, 1: 30}
    rng = random.Random(7)
    picks = Counter(hs.pick_level(rng.random)[0].host for _ in range(10000))
    assert 0.67 < picks["p0"] / 10000 < 0.73
    all_down = {e.address for e in p0}
    hs = host_set(p0 + p1, all_down, 50.0)
    assert [l.priority for l in hs.levels] == [1]
