"""Local rate limits per route: Envoy's LocalRateLimit, set per route in `typed_per_filter_config`.

Why per route: the control server turns each rpc's `rate_limit` (declared in its .proto) into a
route `path: /pkg.Service/Method` with its own bucket.  The listener-level filter only switches
the feature on (no bucket there).  Buckets are keyed by route name and bucket settings, so they
survive unrelated config swaps and a gateway's HTTP (transcoded, gRPC-Web) and gRPC listeners
share one bucket per rpc.  Refill is continuous (Envoy refills in steps of `fill_interval`).
"""
from __future__ import annotations

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as l
from envoy.type.v3 import percent_pb2

from sidecar.call import GRPC_RESOURCE_EXHAUSTED, Reply
from sidecar.config.errors import ConfigError
from sidecar.config.model import TokenBucket

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
FILTER_NAME = "envoy.filters.http.local_ratelimit"
_DENOMINATORS = {percent_pb2.FractionalPercent.HUNDRED: 100, percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
                 percent_pb2.FractionalPercent.MILLION: 1_000_000}


def _only(msg, allowed: set[str], where: str) -> None:
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ConfigError(f"{where}.{fd.name}", "is set but not supported by the protomesh sidecar")


def parse_listener_filter(anyv, where: str) -> None:
    """The HCM entry: switches per-route limits on; a listener-wide bucket is not supported."""
    cfg = _unpack(anyv, where)
    _only(cfg, {"stat_prefix"}, where)


def _unpack(anyv, where: str):
    from sidecar.config.parse import unpack_any
    return unpack_any(anyv, l.LocalRateLimit, where)


def _percent(rfp, where: str) -> float:
    if not rfp.HasField("default_value"):
        return 0.0
    d = rfp.default_value
    return 100.0 * d.numerator / _DENOMINATORS.get(d.denominator, 100)


def parse_route_config(anyv, where: str) -> TokenBucket | None:
    """A route's bucket; None when the config leaves the limit off (Envoy: filter_enabled 0%)."""
    cfg = _unpack(anyv, where)
    _only(cfg, {"stat_prefix", "token_bucket", "filter_enabled", "filter_enforced",
                "rate_limited_as_resource_exhausted"}, where)
    enabled, enforced = _percent(cfg.filter_enabled, where), _percent(cfg.filter_enforced, where)
    if enabled == 0 or enforced == 0:
        return None
    if enabled < 100 or enforced < 100:
        raise ConfigError(where + ".filter_enforced", "only 0% or 100% is supported")
    if not cfg.HasField("token_bucket"):
        raise ConfigError(where + ".token_bucket", "is required on a route")
    tb = cfg.token_bucket
    fill = tb.fill_interval.seconds + tb.fill_interval.nanos / 1e9
    per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
    if tb.max_tokens <= 0 or fill <= 0 or per_fill <= 0:
        raise ConfigError(where + ".token_bucket", "needs max_tokens > 0, tokens_per_fill > 0, fill_interval > 0")
    return TokenBucket(tb.max_tokens, per_fill, fill, cfg.rate_limited_as_resource_exhausted)


class Buckets:
    """Token counts per (route, bucket settings).  `take` is the whole decision."""

    def __init__(self) -> None:
        self._state: dict[tuple, list[float]] = {}

    def take(self, route: str, bucket: TokenBucket, now: float) -> bool:
        key = (route, bucket.max_tokens, bucket.tokens_per_fill, bucket.fill_interval_s)
        st = self._state.get(key)
        if st is None:
            if len(self._state) > 10_000:
                self._state.clear()
            st = self._state[key] = [float(bucket.max_tokens), now]
        tokens = min(bucket.max_tokens, st[0] + (now - st[1]) * bucket.tokens_per_fill / bucket.fill_interval_s)
        st[1] = now
        if tokens < 1.0:
            st[0] = tokens
            return False
        st[0] = tokens - 1.0
        return True


def limited(route: str, bucket: TokenBucket) -> Reply:
    return Reply(429, GRPC_RESOURCE_EXHAUSTED, "rate_limited",
                 f"route {route} allows {bucket.tokens_per_fill} requests per {bucket.fill_interval_s:g}s "
                 f"(burst {bucket.max_tokens})")
