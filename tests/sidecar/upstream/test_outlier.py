"""Outlier detection with an injected clock: ejection, growing ejection time, max ejection
percent, success rate and failure percentage sweeps."""
from sidecar.config.model import OutlierPolicy
from sidecar.upstream.outlier import (OutlierDetector, failure_percentage_outliers,
                                      success_rate_outliers)

HOSTS = [f"10.0.0.{i}:80" for i in range(1, 11)]


def detector(**kw):
    d = OutlierDetector(OutlierPolicy(**kw), lambda: 0.0)
    for h in HOSTS:
        d.record(h, 200, 0.0)
    return d


def test_consecutive_5xx_ejects_and_success_resets_the_count():
    d = detector(consecutive_5xx=3)
    assert not d.record(HOSTS[0], 500, 1.0)
    assert not d.record(HOSTS[0], 500, 1.0)
    assert not d.record(HOSTS[0], 200, 1.0)  # reset
    assert not d.record(HOSTS[0], 500, 1.0)
    assert not d.record(HOSTS[0], 500, 1.0)
    assert d.record(HOSTS[0], 503, 1.0)
    assert d.ejected == {HOSTS[0]}


def test_ejection_time_grows_with_repeats_and_is_capped():
    d = detector(consecutive_5xx=1, base_ejection_s=10, max_ejection_s=25, interval_s=1)
    d.record(HOSTS[0], 500, 0.0)
    assert d.hosts[HOSTS[0]].ejected_until == 10.0
    d.sweep(10.0, HOSTS)  # back
    assert d.ejected == set()
    d.record(HOSTS[0], 500, 10.0)
    assert d.hosts[HOSTS[0]].ejected_until == 30.0  # 2 × base
    d.sweep(30.0, HOSTS)
    d.record(HOSTS[0], 500, 30.0)
    assert d.hosts[HOSTS[0]].ejected_until == 55.0  # 3 × base capped at max (25)


def test_gateway_failures_are_not_enforced_by_default():
    d = detector(consecutive_5xx=100, consecutive_gateway_failure=2)
    d.record(HOSTS[0], 502, 0.0)
    assert not d.record(HOSTS[0], 503, 0.0)  # enforcing_consecutive_gateway_failure defaults to 0
    d = detector(consecutive_5xx=100, consecutive_gateway_failure=2, enforcing_consecutive_gateway_failure=100)
    d.record(HOSTS[0], 502, 0.0)
    assert d.record(HOSTS[0], 504, 0.0)


def test_max_ejection_percent_but_always_one():
    d = detector(consecutive_5xx=1, max_ejection_percent=10)
    assert d.record(HOSTS[0], 500, 0.0)  # 0% ejected: allowed
    assert not d.record(HOSTS[1], 500, 0.0)  # 10% already: not more
    d2 = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=0), lambda: 0.0)
    assert d2.record("a:1", 500, 0.0)  # one host may always be ejected
    assert d2.ejected == {"a:1"}


def test_success_rate_and_failure_percentage():
    p = OutlierPolicy(success_rate_request_volume=10, success_rate_minimum_hosts=5,
                      failure_percentage_request_volume=10, failure_percentage_minimum_hosts=5,
                      failure_percentage_threshold=50)
    stats = {h: (100, 100) for h in HOSTS[:9]}
    stats[HOSTS[9]] = (40, 100)
    assert success_rate_outliers(stats, p) == [HOSTS[9]]
    assert failure_percentage_outliers(stats, p) == [HOSTS[9]]
    few = dict(list(stats.items())[-3:])
    assert success_rate_outliers(few, p) == [] and failure_percentage_outliers(few, p) == []


def test_sweep_ejects_by_success_rate_and_forgets_removed_hosts():
    d = OutlierDetector(OutlierPolicy(success_rate_request_volume=10, max_ejection_percent=50), lambda: 0.0)
    for h in HOSTS:
        for i in range(20):
            d.record(h, 500 if (h == HOSTS[0] and i % 2) else 200, 0.0)
    assert d.sweep(1.0, HOSTS)
    assert d.ejected == {HOSTS[0]}
    d.sweep(2.0, HOSTS[1:])
    assert HOSTS[0] not in d.hosts and d.ejected == set()
