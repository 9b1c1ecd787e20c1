"""Circuit breakers per cluster (Cluster.circuit_breakers, default priority).

`BreakerState` holds the live counts; the admit functions are the decisions.  A refused request
is answered at once with reason `overflow` (and counted); a refused retry leaves the attempt's
failure as the answer, with reason `retry_budget_exhausted` when the failure was local.
"""
from __future__ import annotations

from sidecar.call import GRPC_UNAVAILABLE, Reply
from sidecar.config.model import CircuitBreaker


def overflow_reply(cluster: str, limit: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "overflow", f"cluster {cluster}: circuit breaker {limit} is full")


def retry_budget_reply(cluster: str, why: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "retry_budget_exhausted",
                 f"cluster {cluster}: no retry allowed by the retry budget after: {why}")


class BreakerState:
    """Counts of one cluster, shared by every listener of the sidecar."""

    __slots__ = ("requests", "pending", "retries", "overflows")

    def __init__(self) -> None:
        self.requests = 0  # requests in flight (routed, not yet finished)
        self.pending = 0  # requests waiting for a new upstream connection
        self.retries = 0  # retries scheduled or in flight
        self.overflows: dict[str, int] = {}  # by limit name, for /clusters


def admit_request(limits: CircuitBreaker, state: BreakerState) -> str | None:
    """None when a new request may go ahead, else the name of the limit it hits."""
    if state.requests >= limits.max_requests:
        return "max_requests"
    return None


def admit_pending(limits: CircuitBreaker, state: BreakerState) -> str | None:
    if state.pending >= limits.max_pending:
        return "max_pending_requests"
    return None


def admit_connection(limits: CircuitBreaker, open_connections: int) -> str | None:
    if open_connections >= limits.max_connections:
        return "max_connections"
    return None


def retry_limit(limits: CircuitBreaker, active_requests: int) -> int:
    """Concurrent retries allowed: a share of the requests in flight when a retry budget is set
    (never below min_retry_concurrency), else max_retries."""
    if limits.budget_percent is None:
        return limits.max_retries
    return max(limits.min_retry_concurrency, int(active_requests * limits.budget_percent / 100.0))


def admit_retry(limits: CircuitBreaker, state: BreakerState) -> bool:
    return state.retries < retry_limit(limits, state.requests)


def note_overflow(state: BreakerState, limit: str) -> None:
    state.overflows[limit] = state.overflows.get(limit, 0) + 1
