"""The push queue's contract, run unchanged on SQLite (embedded) and Redis (production).

Time is passed in, so windows, leases and retries are tested without sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.push_queue import PushQueue, SqlitePushQueue, open_push_queue
from tests.conftest import production_url

T0 = 1_700_000_000_000
WINDOW = 10_000
LEASE = 60_000
GIVE_UP = T0 + 86_400_000


@pytest.fixture(params=["sqlite", "redis"])
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PushQueue]:
    if request.param == "sqlite":
        q = open_push_queue(None, tmp_path, "unused")
    else:  # a namespace of its own: other tests' deployments share the Redis server
        q = open_push_queue(production_url("PIGEON_REDIS", "redis://"), tmp_path, uuid.uuid4().hex)
    await q.open()
    try:
        yield q
    finally:
        await q.close()


async def schedule(q: PushQueue, user: str, devices: list[str], now: int, events: int = 1,
                   messages: int | None = None) -> int:
    return await q.schedule(user, devices, event_ms=now, events=events,
                            messages=events if messages is None else messages, now_ms=now, window_ms=WINDOW,
                            give_up_ms=GIVE_UP)


async def test_a_wake_per_device_covers_every_event_until_it_is_claimed(queue: PushQueue) -> None:
    assert await schedule(queue, "u1", ["d1", "d2"], T0) == T0
    assert await schedule(queue, "u1", ["d1", "d2"], T0 + 5, events=3) == T0  # joins the pending ones
    assert await queue.depth() == 2
    jobs = sorted(await queue.claim(T0 + 10, LEASE, 10), key=lambda j: j.device_id)
    assert [(j.device_id, j.user_id, j.events, j.event_ms, j.attempts) for j in jobs] == [
        ("d1", "u1", 4, T0, 0), ("d2", "u1", 4, T0, 0)]
    assert await queue.claim(T0 + 10, LEASE, 10) == []  # held by the lease


async def test_a_pushed_device_waits_for_its_window(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [job] = await queue.claim(T0, LEASE, 10)
    await queue.done(job, pushed=True, now_ms=T0 + 100, window_ms=WINDOW, give_up_ms=GIVE_UP)
    assert await queue.depth() == 0
    # the next event comes within the window: its wake is due when the window ends
    assert await schedule(queue, "u1", ["d1"], T0 + 2_000) == T0 + 100 + WINDOW
    assert await queue.claim(T0 + 5_000, LEASE, 10) == []
    [later] = await queue.claim(T0 + 100 + WINDOW, LEASE, 10)
    assert later.events == 1


async def test_events_that_come_while_a_wake_is_in_flight_get_a_wake_of_their_own(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [job] = await queue.claim(T0, LEASE, 10)
    await schedule(queue, "u1", ["d1"], T0 + 50, events=2)  # while it is being sent
    await queue.done(job, pushed=True, now_ms=T0 + 100, window_ms=WINDOW, give_up_ms=GIVE_UP)
    assert await queue.depth() == 1
    assert await queue.claim(T0 + 200, LEASE, 10) == []
    [rest] = await queue.claim(T0 + 100 + WINDOW, LEASE, 10)
    assert rest.events == 2


async def test_retry_counts_attempts_and_waits(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [job] = await queue.claim(T0, LEASE, 10)
    await queue.retry(job, T0 + 3_000)
    assert await queue.claim(T0 + 2_999, LEASE, 10) == []
    [again] = await queue.claim(T0 + 3_000, LEASE, 10)
    assert again.attempts == 1 and again.events == 1
    await queue.done(again, pushed=False, now_ms=T0 + 3_100, window_ms=WINDOW, give_up_ms=GIVE_UP)
    assert await queue.depth() == 0
    # given up, not pushed: no window holds the next wake back
    assert await schedule(queue, "u1", ["d1"], T0 + 4_000) == T0 + 4_000


async def test_a_dead_workers_wake_is_claimed_again_after_the_lease(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [job] = await queue.claim(T0, LEASE, 10)
    assert await queue.claim(T0 + LEASE - 1, LEASE, 10) == []
    [again] = await queue.claim(T0 + LEASE, LEASE, 10)
    assert again.device_id == job.device_id


async def test_the_sqlite_queue_survives_reopening(tmp_path: Path) -> None:
    q = SqlitePushQueue(tmp_path / "push.db")
    await q.open()
    await schedule(q, "u1", ["d1"], T0)
    await q.close()
    q = SqlitePushQueue(tmp_path / "push.db")
    await q.open()
    try:
        [job] = await q.claim(T0, LEASE, 10)
        assert (job.device_id, job.user_id) == ("d1", "u1")
    finally:
        await q.close()


async def test_a_worker_whose_lease_ran_out_neither_finishes_nor_retries_the_wake(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [late] = await queue.claim(T0, LEASE, 10)
    [current] = await queue.claim(T0 + LEASE, LEASE, 10)  # the first send outlived its lease
    assert current.claim != late.claim
    await queue.done(late, pushed=True, now_ms=T0 + LEASE + 1, window_ms=WINDOW, give_up_ms=GIVE_UP)
    await queue.retry(late, T0 + LEASE + 2)
    assert await queue.depth() == 1  # still pending, still held by the current claim
    assert await queue.claim(T0 + LEASE + 2, LEASE, 10) == []
    await queue.done(current, pushed=True, now_ms=T0 + LEASE + 10, window_ms=WINDOW, give_up_ms=GIVE_UP)
    assert await queue.depth() == 0


async def test_a_late_done_does_not_finish_a_newer_wake(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [late] = await queue.claim(T0, LEASE, 10)
    [current] = await queue.claim(T0 + LEASE, LEASE, 10)
    await queue.done(current, pushed=True, now_ms=T0 + LEASE, window_ms=WINDOW, give_up_ms=GIVE_UP)
    assert await schedule(queue, "u1", ["d1"], T0 + LEASE + 5, events=2) == T0 + LEASE + WINDOW
    await queue.done(late, pushed=False, now_ms=T0 + LEASE + 6, window_ms=WINDOW, give_up_ms=GIVE_UP)
    await queue.retry(late, T0 + LEASE + 7)
    assert await queue.depth() == 1
    [newer] = await queue.claim(T0 + LEASE + WINDOW, LEASE, 10)
    assert (newer.events, newer.attempts) == (2, 0)


async def test_a_retried_claim_is_spent(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0)
    [job] = await queue.claim(T0, LEASE, 10)
    await queue.retry(job, T0 + 1_000)
    await queue.done(job, pushed=False, now_ms=T0 + 500, window_ms=WINDOW, give_up_ms=GIVE_UP)  # a stray repeat
    [again] = await queue.claim(T0 + 1_000, LEASE, 10)
    assert again.attempts == 1 and again.claim != job.claim


async def test_a_wake_knows_how_many_of_its_events_are_messages(queue: PushQueue) -> None:
    await schedule(queue, "u1", ["d1"], T0, events=2, messages=0)  # receipts only
    [receipts] = await queue.claim(T0, LEASE, 10)
    assert (receipts.events, receipts.messages) == (2, 0)
    await schedule(queue, "u1", ["d1"], T0 + 1, events=1, messages=1)  # a message while it is in flight
    await queue.done(receipts, pushed=True, now_ms=T0 + 2, window_ms=WINDOW, give_up_ms=GIVE_UP)
    [message] = await queue.claim(T0 + 2 + WINDOW, LEASE, 10)
    assert (message.events, message.messages) == (1, 1)
    await schedule(queue, "u1", ["d1"], T0 + 3 + WINDOW, events=3, messages=0)  # receipts join it
    await queue.done(message, pushed=True, now_ms=T0 + 4 + WINDOW, window_ms=WINDOW, give_up_ms=GIVE_UP)
    [rest] = await queue.claim(T0 + 4 + 2 * WINDOW, LEASE, 10)
    assert (rest.events, rest.messages) == (3, 0)
