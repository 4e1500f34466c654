"""One key's writer (storage/cassandra_owner.KeyLog) with its store write held: what callers
are told, and when. The writes are stand-ins that record rows (the ordinary one, and the one
sent at once whose answer the test gives); the lease is always valid."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from storage import cassandra_owner
from storage.base import StorageUnavailable
from storage.cassandra_owner import BATCH_MAX, KeyLog, NotOwner, WriteAgain


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


def key_log(write: HeldWrite | FailingWrite) -> KeyLog:
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


class FailingWrite:
    """Fails its first ``failures`` writes; records how many rows each write carried."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sizes: list[int] = []
        self.rows: list[tuple[int, tuple[Any, ...]]] = []

    async def __call__(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool) -> None:
        self.sizes.append(len(rows))
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("write timed out")
        self.rows.extend(rows)


async def test_a_write_failing_again_and_again_does_not_grow_with_what_arrives_meanwhile() -> None:
    write = FailingWrite(failures=3)
    log = key_log(write)
    appends = [log.append((f"m{i}",), ("d1", f"m{i}")) for i in range(3 * BATCH_MAX)]
    outcomes = await asyncio.gather(*appends, return_exceptions=True)
    # the first batch failed three times (its callers were told so); nothing went past it
    assert all(isinstance(o, StorageUnavailable) for o in outcomes[:BATCH_MAX])
    assert outcomes[BATCH_MAX:] == [(n, False) for n in range(BATCH_MAX + 1, 3 * BATCH_MAX + 1)]
    assert write.sizes == [BATCH_MAX] * 6
    assert [n for n, _ in write.rows] == list(range(1, 3 * BATCH_MAX + 1))


async def test_appends_queued_behind_a_failing_write_are_told_so_after_a_bound_and_take_no_number(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cassandra_owner, "QUEUED_WAIT_S", 0.2, raising=False)
    write = FailingWrite(failures=4)  # attempts at about 0, 0.05, 0.15 and 0.35 s fail
    log = key_log(write)
    appends = [log.append((f"m{i}",), ("d1", f"m{i}")) for i in range(3 * BATCH_MAX)]
    outcomes = await asyncio.gather(*appends, return_exceptions=True)
    # the first batch failed (its callers were told so) and is stored; the appends behind it
    # waited past the bound before it landed: told the store is unavailable, with no number
    assert all(isinstance(o, StorageUnavailable) for o in outcomes)
    assert "behind a failing write" in str(outcomes[-1])
    await log.settled()
    assert [n for n, _ in write.rows] == list(range(1, BATCH_MAX + 1))
    # numbering goes on from the last stored row, and a retry of a dropped one appends anew
    assert await log.append(("m100",), ("d1", "m100")) == (BATCH_MAX + 1, False)
    assert await log.append(("again",), ("d1", "m99")) == (BATCH_MAX + 2, False)
    assert [n for n, _ in write.rows] == list(range(1, BATCH_MAX + 3))


class ScriptedWrite:
    """Each write waits for the test to answer it: ``answer(None)`` stores its rows, an exception
    fails it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], asyncio.Future[BaseException | None]]] = []
        self.rows: list[tuple[int, tuple[Any, ...]]] = []

    async def __call__(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool) -> None:
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.calls.append(([n for n, _ in rows], outcome))
        exc = await outcome
        if exc is not None:
            raise exc
        self.rows.extend(rows)

    async def answer(self, exc: BaseException | None = None) -> list[int]:
        while not self.calls or self.calls[0][1].done():
            if self.calls and self.calls[0][1].done():
                self.calls.pop(0)
                continue
            await asyncio.sleep(0.005)
        numbers, outcome = self.calls.pop(0)
        outcome.set_result(exc)
        await asyncio.sleep(0.01)  # the log reads the outcome
        return numbers


async def test_an_append_numbered_into_a_retry_is_told_after_the_bound_not_after_the_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An append made while a write is timing out is numbered into its retry; when the retry
    hangs too, its caller is told the store is unavailable once it has waited QUEUED_WAIT_S, not
    when the retry's own timeout ends (about twice that). It keeps its number: the row is written
    when the retry lands, a repeat joins that write, and nothing is numbered twice."""
    monkeypatch.setattr(cassandra_owner, "QUEUED_WAIT_S", 0.3)
    write = ScriptedWrite()
    log = key_log(write)
    loop = asyncio.get_running_loop()
    first = log.append(("a",), ("d1", "m1"))
    await asyncio.sleep(0.01)
    second = log.append(("b",), ("d1", "m2"))  # behind the write in flight
    asked = loop.time()
    await asyncio.sleep(0.2)
    assert await write.answer(StorageUnavailable("no answer in 5 s")) == [1]  # the first write times out
    assert isinstance(first.exception(), StorageUnavailable) and not second.done()
    outcome = await asyncio.wait_for(asyncio.gather(second, return_exceptions=True), 2)
    waited = loop.time() - asked
    assert isinstance(outcome[0], StorageUnavailable) and "behind a failing write" in str(outcome[0])
    assert 0.3 <= waited < 0.8  # the bound, not the retry's end (which has not come)
    assert write.calls and write.calls[-1][0] == [1, 2]  # numbered into the retry, still in flight
    later = log.append(("c",), ("d1", "m3"))  # behind the retry: timed on its own
    repeat = log.append(("b",), ("d1", "m2"))  # the device's retry joins the numbered write
    await asyncio.sleep(0.05)
    assert await write.answer(None) == [1, 2]  # the retry lands
    # (its first caller was told the store is unavailable: the repeat is the one that stored it)
    assert await asyncio.wait_for(repeat, 2) == (2, False)
    assert await write.answer(None) == [3]
    assert await asyncio.wait_for(later, 2) == (3, False)
    assert [n for n, _ in write.rows] == [1, 2, 3]


async def test_appends_behind_a_retry_that_keeps_hanging_are_each_told_after_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a write keeps failing, every append behind it is told within the bound of its own
    arrival (queued ones dropped with no number), however long each attempt hangs."""
    monkeypatch.setattr(cassandra_owner, "QUEUED_WAIT_S", 0.2)
    write = ScriptedWrite()
    log = key_log(write)
    loop = asyncio.get_running_loop()
    first = log.append(("a",), ("d1", "m1"))
    await asyncio.sleep(0.01)
    assert await write.answer(StorageUnavailable("no answer in 5 s")) == [1]
    assert isinstance((await asyncio.gather(first, return_exceptions=True))[0], StorageUnavailable)
    await asyncio.sleep(0.1)
    assert write.calls[-1][0] == [1]  # the retry of [1] is now written, and hangs
    # appends keep coming behind it
    told: list[float] = []
    for i in range(3):
        asked = loop.time()
        fut = log.append((f"m{i}",), ("d2", f"m{i}"))
        got = await asyncio.wait_for(asyncio.gather(fut, return_exceptions=True), 2)
        assert isinstance(got[0], StorageUnavailable)
        told.append(loop.time() - asked)
    assert all(0.2 <= t < 0.7 for t in told), told
    assert await write.answer(None) == [1]  # the hanging retry lands at last: only the first row
    await log.settled()
    assert [n for n, _ in write.rows] == [1]
    again = log.append(("d",), ("d2", "m0"))  # a dropped one's retry appends anew
    assert await write.answer(None) == [2]
    assert await asyncio.wait_for(again, 2) == (2, False)


async def test_a_slow_first_write_that_lands_tells_nobody_behind_it_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a write that failed starts the bound: a first attempt left to the task (the
    connection would not take it at once) that is slow and then lands numbers and stores what
    waited behind it, however long that took."""
    monkeypatch.setattr(cassandra_owner, "QUEUED_WAIT_S", 0.1)
    write, now = HeldWrite(), NowWrite()
    now.refuse = True
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    await asyncio.sleep(0.01)
    second = log.append(("b",), ("d1", "m2"))
    await asyncio.sleep(0.3)  # three times the bound, nothing failed
    assert not second.done()
    write.gate.set()
    assert await asyncio.wait_for(first, 2) == (1, False) and await asyncio.wait_for(second, 2) == (2, False)


class NowWrite:
    """A ``write_now`` that takes every write it is offered (unless ``refuse``) and holds its
    callback until the test answers it."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[tuple[int, tuple[Any, ...]]], Callable[[BaseException | None], None]]] = []
        self.refuse = False

    def __call__(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool,
                 then: Callable[[BaseException | None], None]) -> bool:
        if self.refuse:
            return False
        self.sent.append((list(rows), then))
        return True

    def answer(self, exc: BaseException | None = None) -> list[tuple[int, tuple[Any, ...]]]:
        rows, then = self.sent.pop(0)
        then(exc)
        return rows


def now_log(write: HeldWrite, now: NowWrite) -> KeyLog:
    return KeyLog("c:chat", 0, 1, 0, -2000, {}, write, AlwaysHeld(), now)  # type: ignore[arg-type]


async def test_an_idle_log_writes_at_once_and_its_answer_settles_the_caller_in_the_same_turn() -> None:
    write, now = HeldWrite(), NowWrite()
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    assert len(now.sent) == 1 and log.busy()  # sent in the append itself: no task
    second = log.append(("b",), ("d1", "m2"))
    third = log.append(("c",), ("d1", "m3"))
    assert len(now.sent) == 1  # one write in flight; the others wait for it
    assert now.answer() == [(1, ("a",))]
    assert first.done() and first.result() == (1, False)
    assert now.answer() == [(2, ("b",)), (3, ("c",))]  # what waited goes next, as one batch
    assert second.result() == (2, False) and third.result() == (3, False)
    assert not log.busy() and log.head == 3 and write.rows == []


async def test_a_failed_write_at_once_keeps_its_number_and_is_written_again_the_ordinary_way() -> None:
    write, now = HeldWrite(), NowWrite()
    write.gate.set()
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    now.answer(StorageUnavailable("no answer in 5 s"))
    assert isinstance(first.exception(), StorageUnavailable)  # told at once, as the ordinary way does
    second = log.append(("b",), ("d1", "m2"))
    assert not now.sent  # nothing goes past the stuck write
    retry = log.append(("a",), ("d1", "m1"))
    assert await second == (2, False) and await retry == (1, False)
    assert [n for n, _ in write.rows] == [1, 2]
    third = log.append(("c",), ("d1", "m3"))  # idle again: at once
    assert now.answer() == [(3, ("c",))] and third.result() == (3, False)


async def test_write_again_is_not_a_failure() -> None:
    write, now = HeldWrite(), NowWrite()
    write.gate.set()
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    now.answer(WriteAgain("the server forgot the statement"))
    assert not first.done()
    assert await first == (1, False) and write.rows == [(1, ("a",))]


async def test_a_write_the_connection_cannot_take_goes_the_ordinary_way() -> None:
    write, now = HeldWrite(), NowWrite()
    now.refuse = True
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    write.gate.set()
    assert await first == (1, False) and write.rows == [(1, ("a",))]


async def test_settled_waits_for_the_write_at_once() -> None:
    write, now = HeldWrite(), NowWrite()
    log = now_log(write, now)
    log.append(("a",), ("d1", "m1"))
    waiting = asyncio.ensure_future(log.settled())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    now.answer()
    await asyncio.wait_for(waiting, 1)
    assert log.head == 1


async def test_an_answer_after_the_partition_went_tells_nobody_a_number() -> None:
    write, now = HeldWrite(), NowWrite()
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    log.kill("partition 0 changed hands")
    assert isinstance(first.exception(), NotOwner)
    now.answer()
    assert log.append(("b",), ("d1", "m2")).exception() is not None and not now.sent


async def test_an_answer_given_before_the_send_returns_leaves_the_log_free() -> None:
    """A write whose answer comes at once (a connection that fails as it is asked) still leaves
    the log able to write: the batch goes the ordinary way, and the next append is written."""
    write = HeldWrite()
    write.gate.set()

    def fails_at_once(key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool,
                      then: Callable[[BaseException | None], None]) -> bool:
        then(StorageUnavailable("the connection is closed"))
        return True

    log = KeyLog("c:chat", 0, 1, 0, -2000, {}, write, AlwaysHeld(), fails_at_once)  # type: ignore[arg-type]
    first = log.append(("a",), ("d1", "m1"))
    assert isinstance(first.exception(), StorageUnavailable)
    retry = log.append(("a",), ("d1", "m1"))
    assert await asyncio.wait_for(retry, 2) == (1, False)
    await asyncio.wait_for(log.settled(), 2)
    assert not log.busy()
    second = log.append(("b",), ("d1", "m2"))
    assert isinstance(second.exception(), StorageUnavailable)  # fails at once again, and is kept
    assert await asyncio.wait_for(log.append(("b",), ("d1", "m2")), 2) == (2, False)
    assert [n for n, _ in write.rows] == [1, 2]


async def test_the_partition_going_fails_every_append_being_written_at_once() -> None:
    """kill() while a write is in flight fails all of its callers at once, those without an
    ident too (a receipt's inbox entry), and the write's later answer tells nobody anything."""
    write, now = HeldWrite(), NowWrite()
    log = now_log(write, now)
    first = log.append(("a",), ("d1", "m1"))
    in_flight = log.append(("b",))  # no ident; queued behind the first, then sent alone
    now.answer()
    assert first.result() == (1, False) and len(now.sent) == 1 and not in_flight.done()
    queued = log.append(("c",))
    log.kill("partition 0 changed hands")
    assert isinstance(in_flight.exception(), NotOwner) and isinstance(queued.exception(), NotOwner)
    assert now.answer() == [(2, ("b",))]  # its answer comes afterwards: nobody is told a number
    assert not now.sent and not log.busy()


async def test_a_send_that_raises_leaves_the_write_to_the_task_and_drops_its_late_answer() -> None:
    """write_now raising after it handed the write over: the task writes the batch (the same
    rows), and the first write's answer, when it comes, changes nothing."""
    write = HeldWrite()
    write.gate.set()
    late: list[Callable[[BaseException | None], None]] = []

    def raises(key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool,
               then: Callable[[BaseException | None], None]) -> bool:
        late.append(then)
        raise RuntimeError("the connection broke while sending")

    log = KeyLog("c:chat", 0, 1, 0, -2000, {}, write, AlwaysHeld(), raises)  # type: ignore[arg-type]
    first = log.append(("a",), ("d1", "m1"))
    assert await asyncio.wait_for(first, 2) == (1, False) and write.rows == [(1, ("a",))]
    await asyncio.wait_for(log.settled(), 2)
    late[0](StorageUnavailable("no answer in 5 s"))  # the given-up write's answer, much later
    assert not log.busy() and log.head == 1
    second = log.append(("b",), ("d1", "m2"))
    assert await asyncio.wait_for(second, 2) == (2, False)


async def test_the_partition_going_fails_appends_left_to_the_task() -> None:
    """kill() before the task has written what was left to it (a write the connection could not
    take, or one to be written again) fails those callers too, those without an ident included."""
    write, now = HeldWrite(), NowWrite()
    now.refuse = True
    log = now_log(write, now)
    refused = log.append(("a",))  # left to the task, numbered
    log.kill("partition 0 changed hands")
    assert isinstance(refused.exception(), NotOwner)

    write, now = HeldWrite(), NowWrite()
    log = now_log(write, now)
    again = log.append(("b",))
    now.answer(WriteAgain("the server forgot the statement"))
    assert not again.done()
    log.kill("partition 0 changed hands")
    assert isinstance(again.exception(), NotOwner)
    write.gate.set()
    await asyncio.sleep(0.01)
    assert write.rows == [] and not log.busy()  # the task wrote nothing for a partition that went


async def test_a_write_that_raises_something_unexpected_keeps_its_number_and_tells_the_caller() -> None:
    """Not only StorageUnavailable: any failure of the ordinary write tells its callers the store
    is unavailable and keeps the numbers for the retry, rather than ending the task with callers
    left waiting."""
    class Breaks(HeldWrite):
        async def __call__(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]],
                           full: bool) -> None:
            if not self.rows and not self.gate.is_set():
                self.gate.set()
                raise TypeError("a value the statement cannot take")
            self.rows.extend(rows)

    write = Breaks()
    log = key_log(write)
    first = log.append(("a",))
    err = await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 2)
    assert isinstance(err[0], StorageUnavailable)
    second = log.append(("b",))
    assert await asyncio.wait_for(second, 2) == (2, False)
    assert [n for n, _ in write.rows] == [1, 2]  # the first kept its number and was written again
