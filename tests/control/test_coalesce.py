"""When a change is pushed: at once after a quiet spell, coalesced during a burst."""
import pytest

from control.coalesce import push_at

D, M = 0.1, 1.0


@pytest.mark.parametrize("now, first, last_push, expected", [
    (10.0, 10.0, None, 10.0),     # the first change ever: at once
    (10.0, 10.0, 9.5, 10.0),      # after a quiet spell: at once
    (10.0, 10.0, 9.95, 10.1),     # right after a push: wait for the burst to pause
    (10.05, 10.0, 9.95, 10.15),   # a second unpushed change: debounce from the latest
    (10.95, 10.0, 9.95, 11.0),    # ... but never later than max delay after the first
])
def test_push_time(now, first, last_push, expected):
    assert push_at(now, first, last_push, D, M) == pytest.approx(expected)
