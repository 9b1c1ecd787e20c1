"""Writes queued in one loop round go out together, in order, at its end."""
from __future__ import annotations

import asyncio

from sidecar.writebatch import BULK, QUEUE_MAX, WriteBatch


class Transport:
    def __init__(self, log: list, name: str):
        self.log, self.name, self.closing = log, name, False

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.log.append((self.name, data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.log.append((self.name, "close"))
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def test_writes_wait_for_the_end_of_the_round_and_keep_their_order():
    log, batch = [], WriteBatch()
    a, b = Transport(log, "a"), Transport(log, "b")
    batch.write(a, b"1")
    batch.write(b, b"x")
    batch.write(a, b"2")
    assert log == []  # nothing yet: the round is not over
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("b", b"x"), ("a", b"2")]
    batch.write(a, b"3")  # a new round gets its own flush
    await asyncio.sleep(0)
    assert log[-1] == ("a", b"3")


async def test_close_writes_what_is_queued_first_and_abort_drops_it():
    log, batch = [], WriteBatch()
    a, b = Transport(log, "a"), Transport(log, "b")
    batch.write(a, b"last words")
    batch.write(b, b"never sent")
    b.abort()
    batch.close(a)
    assert log == [("a", b"last words"), ("a", "close")]
    await asyncio.sleep(0)
    assert log == [("a", b"last words"), ("a", "close")]


async def test_bulk_goes_out_at_once_behind_what_was_queued():
    log, batch = [], WriteBatch()
    a, b = Transport(log, "a"), Transport(log, "b")
    batch.write(a, b"small")
    big = b"x" * BULK
    batch.write(b, big)  # at once: a transport signals backpressure from inside write()
    assert log == [("a", b"small"), ("b", big)]
    small = b"y" * (BULK - 1)
    for _ in range(QUEUE_MAX // len(small)):
        batch.write(a, small)
    assert log[-1] == ("b", big)  # small writes wait, up to QUEUE_MAX in all
    batch.write(a, small)  # past QUEUE_MAX: the queue goes, in order
    assert len(log) == 2 + QUEUE_MAX // len(small) + 1
    await asyncio.sleep(0)
    assert len(log) == 2 + QUEUE_MAX // len(small) + 1  # the end of the round has nothing left
