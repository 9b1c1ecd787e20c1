"""A bounded wait on a condition, for tests on an event loop (never a sleep as synchronisation)."""
from __future__ import annotations

import asyncio


async def until(condition, what: str = "the condition", timeout_s: float = 10.0) -> None:
    """Return once `condition()` is true; fail naming `what` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}") from None
