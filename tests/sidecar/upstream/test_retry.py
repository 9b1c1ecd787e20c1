"""Retry decisions as tables: which outcomes each Envoy retry_on condition covers."""
import pytest

from sidecar.config.model import HeaderMatch, RetryPolicy, StringMatch
from sidecar.upstream import retry


def policy(*on, codes=()):
    return RetryPolicy(frozenset(on), 2, retriable_status_codes=frozenset(codes))


@pytest.mark.parametrize("on,kind,code,expected", [
    (("5xx",), retry.HTTP_STATUS, 500, True),
    (("5xx",), retry.HTTP_STATUS, 404, False),
    (("5xx",), retry.RESET, 0, True),
    (("5xx",), retry.CONNECT_FAILURE, 0, True),
    (("5xx",), retry.PER_TRY_TIMEOUT, 0, True),
    (("gateway-error",), retry.HTTP_STATUS, 502, True),
    (("gateway-error",), retry.HTTP_STATUS, 500, False),
    (("gateway-error",), retry.PER_TRY_TIMEOUT, 0, True),
    (("reset",), retry.RESET, 0, True),
    (("reset",), retry.HTTP_STATUS, 503, False),
    (("connect-failure",), retry.CONNECT_FAILURE, 0, True),
    (("connect-failure",), retry.RESET, 0, False),
    (("retriable-status-codes",), retry.HTTP_STATUS, 409, True),
    (("retriable-status-codes",), retry.HTTP_STATUS, 410, False),
    (("unavailable",), retry.GRPC_STATUS, 14, True),
    (("unavailable",), retry.GRPC_STATUS, 13, False),
    (("internal", "resource-exhausted"), retry.GRPC_STATUS, 8, True),
    (("cancelled",), retry.GRPC_STATUS, 1, True),
    (("deadline-exceeded",), retry.GRPC_STATUS, 4, True),
    ((), retry.RESET, 0, False),
])
def test_retriable(on, kind, code, expected):
    assert retry.retriable(policy(*on, codes=(409,)), kind, code) is expected


def test_backoff_is_jittered_exponential_and_capped():
    p = RetryPolicy(frozenset({"5xx"}), 5, base_interval_s=0.025, max_interval_s=0.25)
    assert [retry.backoff_s(p, n, lambda: 0.999999) for n in range(6)] == pytest.approx(
        [0.025, 0.05, 0.1, 0.2, 0.25, 0.25], rel=1e-4)
    assert retry.backoff_s(p, 3, lambda: 0.0) == 0.0
    assert retry.backoff_s(p, 2, lambda: 0.5) == pytest.approx(0.05)


def test_request_allows_by_method_header():
    import re
    idem = HeaderMatch(":method", StringMatch("regex", "GET|PUT", False, re.compile("GET|PUT")))
    p = RetryPolicy(frozenset({"5xx"}), 1, request_headers=(idem,))
    assert retry.request_allows(p, "GET", {})
    assert not retry.request_allows(p, "POST", {})
    forced = HeaderMatch("x-retry-ok")
    p2 = RetryPolicy(frozenset({"5xx"}), 1, request_headers=(idem, forced))
    assert retry.request_allows(p2, "POST", {"x-retry-ok": "1"})
    assert retry.request_allows(RetryPolicy(frozenset({"5xx"})), "POST", {})


@pytest.mark.parametrize("per_try,remaining,expected", [
    (None, 5.0, (5.0, False)), (0.2, 5.0, (0.2, True)), (0.2, 0.1, (0.1, False)),
    (0.2, None, (0.2, True)), (None, None, (None, False)),
])
def test_attempt_timeout(per_try, remaining, expected):
    p = RetryPolicy(frozenset({"5xx"}), 1, per_try_timeout_s=per_try)
    assert retry.attempt_timeout(p, remaining) == expected


def test_no_backoff_that_would_end_past_the_deadline():
    policy = RetryPolicy(frozenset({"5xx"}), 1, base_interval_s=0.1, max_interval_s=1.0)
    half = lambda: 0.5  # noqa: E731  (the jitter draw)
    assert retry.backoff_before(policy, 0, half, None, 100.0) == pytest.approx(0.05)
    assert retry.backoff_before(policy, 0, half, 100.06, 100.0) == pytest.approx(0.05)
    assert retry.backoff_before(policy, 0, half, 100.04, 100.0) is None
