"""Retry decisions, as Envoy's router makes them (RouteAction.retry_policy).

Pure: the listeners describe how an attempt ended (`Outcome`) and ask `retriable`; they ask
`backoff_s` how long to wait before the next attempt.  Whether the cluster can afford another
retry right now is the circuit breaker's decision (`sidecar.upstream.breaker`).
"""
from __future__ import annotations

from typing import Callable, Mapping

from sidecar.config.model import RetryPolicy

# How an attempt ended, besides a status.
CONNECT_FAILURE = "connect"  # no connection (refused, connect timeout)
RESET = "reset"  # connection lost before the response head
PER_TRY_TIMEOUT = "timeout"  # the per-try timeout fired before the response head
HTTP_STATUS = "status"  # a response head with this HTTP status
GRPC_STATUS = "grpc"  # a gRPC status (the call ended without a relayed message)

GRPC_CODE_CONDITIONS = {1: "cancelled", 4: "deadline-exceeded", 8: "resource-exhausted",
                        13: "internal", 14: "unavailable"}
HTTP_CONDITIONS = frozenset({"5xx", "gateway-error", "reset", "connect-failure",
                             "retriable-status-codes", "refused-stream"})
CONDITIONS = HTTP_CONDITIONS | frozenset(GRPC_CODE_CONDITIONS.values())

# Local failures (nothing came back) are matched by these conditions, as in Envoy where a reset
# or a per-try timeout stands for a 503/504 the proxy made up.
_LOCAL = {
    CONNECT_FAILURE: frozenset({"connect-failure", "5xx", "gateway-error", "reset", "refused-stream"}),
    RESET: frozenset({"reset", "5xx", "gateway-error"}),
    PER_TRY_TIMEOUT: frozenset({"5xx", "gateway-error", "reset"}),
}


def retriable(policy: RetryPolicy, kind: str, code: int = 0) -> bool:
    """Does `policy` retry an attempt that ended this way?"""
    on = policy.retry_on
    local = _LOCAL.get(kind)
    if local is not None:
        return not on.isdisjoint(local)
    if kind == HTTP_STATUS:
        if code >= 500 and "5xx" in on:
            return True
        if 502 <= code <= 504 and "gateway-error" in on:
            return True
        return "retriable-status-codes" in on and code in policy.retriable_status_codes
    if kind == GRPC_STATUS:
        name = GRPC_CODE_CONDITIONS.get(code)
        return name is not None and name in on
    return False


def request_allows(policy: RetryPolicy, method: str, headers: Mapping[str, str]) -> bool:
    """retriable_request_headers: when set, one of them must match (':method' is the method).
    The control server uses it to keep non-idempotent HTTP methods from being retried."""
    if not policy.request_headers:
        return True
    for h in policy.request_headers:
        value = method if h.name == ":method" else headers.get(h.name)
        if h.matches(value):
            return True
    return False


def grpc_refusal(policy: RetryPolicy, kind: str | None, code: int, attempts: int, method: str,
                 headers: Mapping[str, str]) -> str | None:
    """None when a gRPC attempt that ended this way (a local `kind`, else only its status `code`)
    may be tried again under `policy`, budget aside; otherwise the retry note to log ('' when
    the policy simply does not cover it, or the attempts are used up)."""
    if not ((kind is not None and retriable(policy, kind)) or retriable(policy, GRPC_STATUS, code)):
        return ""
    if attempts > policy.num_retries:
        return ""
    if not request_allows(policy, method, headers):
        return "request_not_retriable"
    return None


def backoff_s(policy: RetryPolicy, retries_done: int, rand: Callable[[], float]) -> float:
    """Envoy's fully jittered exponential back-off: uniform in [0, base * 2^n), capped at max."""
    ceiling = min(policy.base_interval_s * (1 << min(retries_done, 30)), policy.max_interval_s)
    return rand() * ceiling


def backoff_before(policy: RetryPolicy, retries_done: int, rand: Callable[[], float],
                   deadline: float | None, now: float) -> float | None:
    """The back-off before the next attempt, or None when it would end at or past `deadline`
    (a monotonic time; None: no deadline): a retry that cannot start in time is not made."""
    delay = backoff_s(policy, retries_done, rand)
    if deadline is not None and now + delay >= deadline:
        return None
    return delay


def attempt_timeout(policy: RetryPolicy | None, remaining_s: float | None) -> tuple[float | None, bool]:
    """The timeout for one attempt and whether it is the per-try one (so its expiry may be
    retried) rather than what is left of the route timeout or the caller's deadline."""
    per_try = policy.per_try_timeout_s if policy is not None else None
    if per_try is not None and (remaining_s is None or per_try < remaining_s):
        return per_try, True
    return remaining_s, False
