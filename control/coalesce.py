"""When to push after a change: the pure decision behind `ControlPlane.changed`.

A change that comes after a quiet spell (no push for `debounce_s`) goes out at once: a lone
endpoint change should not wait out a debounce meant for bursts.  A change while others are
still arriving waits until they pause for `debounce_s`, but no longer than `max_delay_s` after
the first unpushed one: when thousands of sidecars connect, each registration changes every
node's endpoints, and pushing each to everybody would be N² responses (a push storm).
"""
from __future__ import annotations


def push_at(now: float, first_unpushed: float, last_push: float | None, debounce_s: float,
            max_delay_s: float) -> float:
    """Loop time at which to push.  `first_unpushed`: time of the oldest change not yet pushed
    (equal to `now` when this change is the only one); `last_push`: when the last push began."""
    quiet = last_push is None or now - last_push >= debounce_s
    if quiet and first_unpushed == now:
        return now
    return min(now + debounce_s, first_unpushed + max_delay_s)
