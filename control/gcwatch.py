"""Keep garbage-collector pauses out of pushes, and log the ones that still happen.

A control server holding thousands of streams has millions of live Python objects; a full
(generation 2) collection walks all of them with the event loop stopped — measured here at 5,000
streams: 0.5–0.8 s, landing in the middle of a push.  Almost all of those objects are long-lived
stream state.  So after a push has gone out and nothing else is pending, the survivors are moved
to the permanent generation (`gc.freeze()`) and later collections walk only what is new.  Frozen
objects are not collected, so cyclic garbage among them (state of streams that closed since) is
reclaimed by an occasional full collection at a quiet moment (`full_collect_due`).

Pauses longer than `slow_ms` are logged with generation and duration; totals go to /metrics.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("protomesh.control")


def full_collect_due(now: float, last_full: float, every_s: float, busy: bool) -> bool:
    """A full collection (unfreeze, collect, freeze) runs only when no push is pending or in
    progress, and at most every `every_s`."""
    return not busy and now - last_full >= every_s


class GcWatch:
    def __init__(self, slow_ms: float = 50.0, full_every_s: float = 600.0, clock=time.perf_counter,
                 quiet_s: float = 2.0):
        self.slow_ms = slow_ms
        self.full_every_s = full_every_s
        self.clock = clock
        self.pauses_s = [0.0, 0.0, 0.0]  # total pause per generation
        self.slow = 0
        self.freezes = 0
        self.last_full = clock()
        self.quiet_s = quiet_s
        self._enable_handle: asyncio.TimerHandle | None = None
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = self.clock()
            return
        took = self.clock() - self._t0
        gen = info.get("generation", 2)
        self.pauses_s[gen] += took
        if took * 1000 >= self.slow_ms:
            self.slow += 1
            log.warning("garbage collection of generation %d paused the server %.0f ms (%d collected)",
                        gen, took * 1000, info.get("collected", 0))

    def before_push(self) -> None:
        """No automatic collections while a push goes out and its ACKs come back: measured at
        5,000 streams, young-generation collections there took 50–95 ms each (large young
        containers), stalling every stream.  What a push allocates is freed by reference
        counting; cycles wait for the collector, re-enabled `quiet_s` after the pass."""
        if self._enable_handle is not None:
            self._enable_handle.cancel()
            self._enable_handle = None
        gc.disable()

    def after_push(self) -> None:
        """A push pass finished and no other is pending: what survived it is long-lived.  The
        collector comes back once the ACKs have had `quiet_s` to arrive."""
        gc.freeze()
        self.freezes += 1
        if self._enable_handle is not None:
            self._enable_handle.cancel()
        self._enable_handle = asyncio.get_running_loop().call_later(self.quiet_s, self._enable)

    def _enable(self) -> None:
        self._enable_handle = None
        gc.enable()

    def maybe_full_collect(self, busy: bool) -> bool:
        now = self.clock()
        if not full_collect_due(now, self.last_full, self.full_every_s, busy):
            return False
        self.last_full = now
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return True

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
