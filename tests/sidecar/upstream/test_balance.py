"""Balancing decisions with injected randomness; distributions within statistical bounds."""
import random

from sidecar.config.model import Endpoint
from sidecar.upstream.balance import Balancer, pick_least_request

EPS = tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(4))


def test_round_robin_is_even():
    b = Balancer("round_robin")
    counts = {}
    for _ in range(400):
        ep = b.pick(EPS)
        b.release(ep)
        counts[ep.port] = counts.get(ep.port, 0) + 1
    assert sorted(counts.values()) == [100, 100, 100, 100]


def test_least_request_prefers_the_idle_endpoint():
    active = {EPS[0].address: 5, EPS[1].address: 0}
    rolls = iter([0.0, 0.0])  # samples endpoints 0 and 1
    assert pick_least_request(EPS[:2], active, lambda: next(rolls)) == EPS[1]


def test_least_request_respects_weight():
    heavy = Endpoint("127.0.0.1", 1, weight=4)
    light = Endpoint("127.0.0.1", 2, weight=1)
    active = {heavy.address: 3, light.address: 1}  # 3/4 < 1/1: the heavy one is less loaded
    rolls = iter([0.0, 0.0])
    assert pick_least_request((heavy, light), active, lambda: next(rolls)) == heavy


def test_least_request_spreads_load_under_concurrency():
    rng = random.Random(7)
    b = Balancer("least_request", rng.random)
    held = [b.pick(EPS) for _ in range(400)]
    per = {ep.address: 0 for ep in EPS}
    for ep in held:
        per[ep.address] += 1
    assert max(per.values()) - min(per.values()) <= 4  # P2C keeps in-flight counts close
    for ep in held:
        b.release(ep)
    assert b.active == {}


def test_random_is_roughly_uniform():
    rng = random.Random(3)
    b = Balancer("random", rng.random)
    counts = {}
    for _ in range(4000):
        ep = b.pick(EPS)
        b.release(ep)
        counts[ep.port] = counts.get(ep.port, 0) + 1
    assert all(850 < c < 1150 for c in counts.values())


def test_no_endpoints():
    assert Balancer("round_robin").pick(()) is None
