"""One key's writer (storage/cassandra_owner.KeyLog) with its store write held: what callers
are told, and when. The write is a stand-in that records rows; the lease is always valid."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from storage.base import StorageUnavailable
from storage.cassandra_owner import KeyLog


class AlwaysHeld:
    def valid(self, part: int, epoch: int) -> bool:
        return True


class HeldWrite:
    def __init__(self) -> None:
        self.rows: list[tuple[int, tuple[Any, ...]]] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def __call__(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool) -> None:
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StorageUnavailable("write timed out")
        self.rows.extend(rows)


def key_log(write: HeldWrite) -> KeyLog:
    return KeyLog("c:chat", 0, 1, 0, -2000, {}, write, AlwaysHeld())  # type: ignore[arg-type]


async def test_a_repeat_during_the_write_is_answered_only_once_the_row_is_stored() -> None:
    write = HeldWrite()
    log = key_log(write)
    first = log.append(("hello",), ("d1", "m1"))
    await asyncio.sleep(0.01)  # the write of m1 has started and is held
    repeat = log.append(("hello",), ("d1", "m1"))
    await asyncio.sleep(0.01)
    assert not repeat.done()  # not told a number that is not stored yet
    write.gate.set()
    assert await first == (1, False) and await repeat == (1, True)
    assert write.rows == [(1, ("hello",))]


async def test_a_failed_write_keeps_its_number_and_nothing_goes_past_it() -> None:
    write = HeldWrite()
    write.fail_next = True
    log = key_log(write)
    first = log.append(("a",), ("d1", "m1"))
    write.gate.set()
    try:
        await first
    except StorageUnavailable:
        pass
    second = log.append(("b",), ("d1", "m2"))
    retry = log.append(("a",), ("d1", "m1"))  # the device's retry joins the stuck write
    # the first caller was told the store is unavailable, so the retry is the one that stored it
    assert await second == (2, False) and await retry == (1, False)
    assert [n for n, _ in write.rows] == [1, 2]
