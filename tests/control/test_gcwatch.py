"""Collector pauses are measured and logged; full collections wait for a quiet moment."""
import asyncio
import gc

import pytest

from control.gcwatch import GcWatch, full_collect_due


@pytest.mark.parametrize("now, last, busy, due", [
    (1000.0, 0.0, False, True),
    (1000.0, 0.0, True, False),   # never during a push
    (100.0, 0.0, False, False),   # not yet
])
def test_full_collection_schedule(now, last, busy, due):
    assert full_collect_due(now, last, 600.0, busy) is due


def test_pauses_are_summed_per_generation_and_slow_ones_counted(caplog):
    times = iter([0.0, 1.0, 1.01, 2.0, 2.3])  # the first is read at construction
    w = GcWatch(slow_ms=50, clock=lambda: next(times))
    w("start", {"generation": 0})
    w("stop", {"generation": 0, "collected": 0})
    w("start", {"generation": 2})
    w("stop", {"generation": 2, "collected": 7})
    assert w.pauses_s[0] == pytest.approx(0.01) and w.pauses_s[2] == pytest.approx(0.3)
    assert w.slow == 1
    assert "generation 2 paused the server 300 ms" in caplog.text


async def test_after_push_freezes_and_a_full_collection_unfreezes_first():
    w = GcWatch(full_every_s=0.0, quiet_s=0.0)
    try:
        w.before_push()
        w.after_push()
        assert gc.get_freeze_count() > 0
        assert w.maybe_full_collect(busy=False)
        assert not w.maybe_full_collect(busy=True)
    finally:
        gc.unfreeze()
        gc.enable()


async def test_no_automatic_collection_from_a_push_until_quiet_after_it():
    w = GcWatch(quiet_s=0.05)
    try:
        w.before_push()
        assert not gc.isenabled()
        w.before_push()  # a second pass before the first ended: still off
        w.after_push()
        assert not gc.isenabled()  # the ACKs are still coming
        for _ in range(100):
            if gc.isenabled():
                break
            await asyncio.sleep(0.01)
        assert gc.isenabled()
        w.before_push()  # a new push cancels a pending re-enable
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
