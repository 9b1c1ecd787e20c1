"""Circuit breaker decisions: limits reached, retry budget as a share of active requests."""
import pytest

from sidecar.config.model import CircuitBreaker
from sidecar.upstream import breaker


def test_max_requests_and_pending():
    limits = CircuitBreaker(max_requests=2, max_pending=1)
    st = breaker.BreakerState()
    assert breaker.admit_request(limits, st) is None
    st.requests = 2
    assert breaker.admit_request(limits, st) == "max_requests"
    assert breaker.admit_pending(limits, st) is None
    st.pending = 1
    assert breaker.admit_pending(limits, st) == "max_pending_requests"
    assert breaker.admit_connection(CircuitBreaker(max_connections=3), 3) == "max_connections"
    assert breaker.admit_connection(CircuitBreaker(max_connections=3), 2) is None


@pytest.mark.parametrize("budget,min_conc,active,limit", [
    (None, 3, 1000, 3),  # no budget: max_retries (default 3)
    (20.0, 3, 10, 3),  # 20% of 10 = 2, but never below min_retry_concurrency
    (20.0, 3, 100, 20),
    (50.0, 1, 7, 3),
])
def test_retry_budget(budget, min_conc, active, limit):
    limits = CircuitBreaker(budget_percent=budget, min_retry_concurrency=min_conc)
    assert breaker.retry_limit(limits, active) == limit
    st = breaker.BreakerState()
    st.requests, st.retries = active, limit - 1
    assert breaker.admit_retry(limits, st)
    st.retries = limit
    assert not breaker.admit_retry(limits, st)
