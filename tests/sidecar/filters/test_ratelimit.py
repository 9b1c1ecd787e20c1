"""Per-route token buckets from Envoy's LocalRateLimit: parse table and decisions."""
import pytest
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as l
from google.protobuf import any_pb2

from control.translate import build
from sidecar.config.errors import ConfigError
from sidecar.config.model import TokenBucket
from sidecar.filters.ratelimit import Buckets, parse_route_config


def _route_any(requests=3, per=1.0, burst=0, grpc=True):
    r = build.route("r", path="/a.B/C", split=(("c", 1),), timeout_s=1)
    build.route_rate_limit(r, requests, per, burst, grpc)
    return r.typed_per_filter_config[build.RATELIMIT_FILTER]


def test_control_server_bucket_parses_back():
    b = parse_route_config(_route_any(10, 2.0, 5), "r")
    assert b == TokenBucket(15, 10, 2.0, True)


def test_partial_enforcement_is_refused_and_zero_is_off():
    cfg = l.LocalRateLimit()
    _route_any().Unpack(cfg)
    cfg.filter_enforced.default_value.numerator = 50
    a = any_pb2.Any()
    a.Pack(cfg)
    with pytest.raises(ConfigError):
        parse_route_config(a, "r")
    cfg.filter_enforced.default_value.numerator = 0
    a.Pack(cfg)
    assert parse_route_config(a, "r") is None


@pytest.mark.parametrize("times, allowed", [
    ([0, 0, 0, 0], [True, True, True, False]),          # burst of max_tokens, then empty
    ([0, 0, 0, 0, 0.34], [True, True, True, False, True]),  # refilled at 3 per second
])
def test_bucket_decisions(times, allowed):
    buckets, bucket = Buckets(), TokenBucket(3, 3, 1.0)
    assert [buckets.take("r", bucket, t) for t in times] == allowed


def test_routes_with_the_same_name_share_a_bucket_across_listeners():
    buckets = Buckets()
    assert buckets.take("r", TokenBucket(1, 1, 60, True), 0)
    assert not buckets.take("r", TokenBucket(1, 1, 60, False), 0)
