"""The partition leases of one process (storage/cassandra_owner.Leases) against a stand-in for
their Cassandra statements that answers at once and records what was asked, on a clock the test
moves: when a lease is kept, and when it is given back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from storage import cassandra_owner
from storage.base import StorageUnavailable
from storage.cassandra_owner import LEASE_TTL_S, PARTITIONS, RENEW_EVERY_S, SAFETY_S, Leases


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Statements:
    """Every lease is free and every conditional write applies; a renewal's answer takes
    ``renew_takes`` seconds of the clock to come back."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.asked: list[tuple[str, tuple[Any, ...]]] = []
        self.renew_takes = 0.0
        self.epochs: dict[int, int] = {}  # owner_epochs

    async def __call__(self, name: str, *params: Any) -> list[Any]:
        self.asked.append((name, params))
        if name == "lease_renew":
            self.clock.now += self.renew_takes
            self.renew_takes = 0.0  # the others of the same round come back with it
        if name == "epoch_get":
            return [[self.epochs[params[0]]]] if params[0] in self.epochs else []
        if name == "epoch_first":
            self.epochs[params[0]] = params[1]
        elif name == "epoch_next":
            self.epochs[params[1]] = params[0]
        if name in ("leases", "bridges", "alive", "gone"):
            return []
        return [[True]]


    async def together(self, name: str, params: list[Any]) -> list[Any]:
        """All the renewals due, as one conditional batch."""
        return await self(name, *params[0])


async def held_leases(together: bool = False) -> tuple[Leases, Clock, Statements, list[int]]:
    clock = Clock()
    run = Statements(clock)
    lost: list[int] = []
    leases = Leases(run, "bridge-a", clock=clock, on_lost=lost.append,  # type: ignore[arg-type]
                    run_together=run.together if together else None)
    await leases._round()
    assert leases.held() == list(range(PARTITIONS))
    return leases, clock, run, lost


async def test_a_renewal_granted_in_time_keeps_the_lease_and_its_epoch() -> None:
    leases, clock, run, lost = await held_leases()
    clock.now += RENEW_EVERY_S
    run.renew_takes = 1.0
    await leases._renew_due()
    assert leases.held() == list(range(PARTITIONS)) and not lost
    assert leases.epoch(3) == 1
    clock.now += LEASE_TTL_S - SAFETY_S - 0.1  # counted from when the renewal was sent
    assert leases.epoch(3) == 1 and leases.leased(3)
    clock.now += 0.2
    assert leases.epoch(3) is None and not leases.leased(3)  # (ran out: another may take it)


@pytest.mark.parametrize("together", [False, True], ids=["one by one", "in one batch"])
async def test_a_renewal_granted_after_the_lease_ran_out_gives_the_partition_back(together: bool) -> None:
    """Its key logs found the lease invalid meanwhile and gave up their writes, one of which may
    still land: the partition is not taken up again under that epoch."""
    leases, clock, run, lost = await held_leases(together)
    clock.now += RENEW_EVERY_S
    # the answer comes just past the deadline, but within what the renewal would grant if taken
    # up (sent + LEASE_TTL_S - SAFETY_S): the lease would have been valid again under its epoch
    run.renew_takes = 3.0
    await leases._renew_due()
    assert leases.held() == [] and sorted(lost) == list(range(PARTITIONS))
    assert leases.epoch(3) is None and not leases.valid(3, 1)
    dropped = [params for name, params in run.asked if name == "lease_drop"]
    assert sorted(p[0] for p in dropped) == list(range(PARTITIONS))


class Gated(Statements):
    """Each take of a partition waits at its first statement until the gate opens; one partition
    is taken by another process meanwhile (its epoch's conditional write does not apply); and, if
    so told, the batch of lease takes does not apply either (another process took one of them)."""

    def __init__(self, clock: Clock, lost_race: int, together: int, refuse_batch: bool) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()
        self.waiting = 0
        self.all_waiting = asyncio.Event()  # ``together`` takes are waiting at the gate
        self.together_n, self.lost_race, self.refuse_batch = together, lost_race, refuse_batch
        self.batches: list[list[int]] = []  # the partitions of each batch of lease takes

    async def __call__(self, name: str, *params: Any) -> list[Any]:
        if name == "epoch_get":
            self.waiting += 1
            if self.waiting == self.together_n:
                self.all_waiting.set()
            await self.gate.wait()
        if name == "epoch_first" and params[0] == self.lost_race:
            self.asked.append((name, params))
            return [[False]]
        if name == "bridges":
            return [["bridge-b"]]  # another live process: a share of half
        return await super().__call__(name, *params)

    async def together(self, name: str, params: list[Any]) -> list[Any]:
        if name != "lease_take":
            return await super().together(name, params)
        self.batches.append([p[0] for p in params])
        assert all(self.epochs[part] == epoch for part, _holder, epoch, _ttl in params)
        return [[not self.refuse_batch]]


@pytest.mark.parametrize("how", ["one by one", "in one batch", "batch refused"])
async def test_free_partitions_are_taken_together_up_to_the_share_and_a_lost_race_is_made_up(how: str) -> None:
    clock = Clock()
    share = PARTITIONS // 2
    run = Gated(clock, lost_race=3, together=share, refuse_batch=how == "batch refused")
    leases = Leases(run, "bridge-a", clock=clock, on_lost=lambda part: None,
                    run_together=None if how == "one by one" else run.together)
    rounding = asyncio.create_task(leases._round())
    async with asyncio.timeout(5):  # one by one, the second would wait for the first: never
        await run.all_waiting.wait()
    await asyncio.sleep(0.01)
    assert run.waiting == share  # no more than the share asked for at once
    run.gate.set()
    await rounding
    # partition 3 went to the other process; the next free one was taken in its place
    assert leases.held() == [p for p in range(share + 1) if p != 3]
    singles = [params[0] for name, params in run.asked if name == "lease_take"]
    if how == "one by one":
        assert not run.batches and singles == leases.held()
    elif how == "in one batch":  # the first seven in one batch; the one in place of 3 alone
        assert run.batches == [[p for p in range(share) if p != 3]] and singles == [share]
    else:  # the batch did not apply: each tried alone
        assert run.batches == [[p for p in range(share) if p != 3]] and singles == leases.held()


class Leases_(Statements):
    """Lease rows as Cassandra keeps them (part -> holder, epoch), a batch of takes that applies
    and then fails to answer if so told, and another process that advances one partition's epoch
    just before this one's lease on it is taken (then dies, its lease row gone)."""

    def __init__(self, clock: Clock, *, overtaken: int | None = None, batch_lost_after: float | None = None,
                 no_answer: int | None = None) -> None:
        super().__init__(clock)
        self.rows: dict[int, tuple[str, int]] = {}
        self.overtaken, self.batch_lost_after, self.no_answer = overtaken, batch_lost_after, no_answer

    async def __call__(self, name: str, *params: Any) -> list[Any]:
        if name == "leases":
            return [[p, h, e] for p, (h, e) in self.rows.items()]
        if name == "lease_take":
            part, holder, epoch, _ttl = params
            self.asked.append((name, params))
            if part == self.overtaken:  # once
                self.epochs[part] += 1
                self.overtaken = None
            if part == self.no_answer:
                raise StorageUnavailable("cassandra lease_take: no answer in time")
            if part in self.rows:
                return [[False]]
            self.rows[part] = (holder, epoch)
            return [[True]]
        if name == "lease_drop":
            self.rows.pop(params[0], None)
        return await super().__call__(name, *params)

    async def together(self, name: str, params: list[Any]) -> list[Any]:
        if name != "lease_take":
            return await super().together(name, params)
        for p in params:
            await self(name, *p)
        if self.batch_lost_after is not None:  # applied, and the failure is known this much later (once)
            self.clock.now += self.batch_lost_after
            self.batch_lost_after = None
            raise StorageUnavailable("cassandra lease_take: no answer in time")
        return [[True]]


@pytest.mark.parametrize("together", [False, True], ids=["one by one", "in one batch"])
async def test_a_lease_whose_epoch_moved_on_while_it_was_taken_is_given_back(together: bool) -> None:
    """Another process advanced partition 5's epoch after this one did, took its lease, fenced
    under that newer epoch and died: a lease taken now under the older epoch would have its rows
    hidden by those fences."""
    clock = Clock()
    run = Leases_(clock, overtaken=5)
    leases = Leases(run, "bridge-a", clock=clock, run_together=run.together if together else None)
    await leases._round()
    assert leases.held() == [p for p in range(PARTITIONS) if p != 5]
    assert ("lease_drop", (5, "bridge-a", 1)) in run.asked and 5 not in run.rows
    await leases._round()  # taken again next round, under a newer epoch than the other's
    assert 5 in leases.held() and leases.epoch(5) == 3


@pytest.mark.parametrize("known_after", [0.5, 5.0], ids=["a lost connection", "a timeout"])
async def test_a_batch_of_takes_that_applied_without_an_answer_is_held_from_when_it_was_sent(
    known_after: float,
) -> None:
    """Its rows are found and taken as this process's, counted from when the batch was sent; if
    the failure came so late that those leases have run out already (a 5 s timeout), they are
    given back instead of being counted as held."""
    clock = Clock()
    run = Leases_(clock, batch_lost_after=known_after)
    leases = Leases(run, "bridge-a", clock=clock, run_together=run.together)
    sent = clock.now
    with pytest.raises(StorageUnavailable):
        await leases._round()
    if known_after < LEASE_TTL_S - SAFETY_S:
        assert leases.held() == list(range(PARTITIONS))
        clock.now = sent + LEASE_TTL_S - SAFETY_S - 0.01
        assert leases.held() == list(range(PARTITIONS))
        clock.now += 0.02  # counted from when the batch was sent
        assert leases.held() == []
    else:
        assert leases.held() == [] and not leases._held and not run.rows  # dropped, not left standing
        clock.now += 1
        await leases._round()  # taken again, under new epochs
        assert leases.held() == list(range(PARTITIONS)) and leases.epoch(0) == 2


async def test_a_take_without_an_answer_ends_the_rounds_takes_and_those_before_it_are_held() -> None:
    """The round stops there (the renewals wait behind it) and reports the failure; the leases it
    took before are checked and held, not left standing unheld until they expire."""
    clock = Clock()
    run = Leases_(clock, no_answer=7)
    leases = Leases(run, "bridge-a", clock=clock)
    with pytest.raises(StorageUnavailable):
        await leases._round()
    assert leases.held() == list(range(7))
    assert [params[0] for name, params in run.asked if name == "lease_take"] == list(range(8))


async def test_partitions_given_back_slowly_leave_the_others_renewed_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second bridge appears: half the partitions are given back, each once its work is done or
    after RELEASE_WAIT_S. Those releases go on beside the lease loop, whose renewals keep the other
    half (awaited in the round, one slow release once let every lease run out)."""
    monkeypatch.setattr(cassandra_owner, "RELEASE_WAIT_S", 0.2)
    clock = Clock()
    run = Statements(clock)
    lost: list[int] = []
    busy = asyncio.Event()

    async def quiesce(part: int) -> None:  # a key of the partition waits behind a failing write
        await busy.wait()

    leases = Leases(run, "bridge-a", clock=clock, on_lost=lost.append, quiesce=quiesce)  # type: ignore[arg-type]
    await leases._round()
    assert leases.held() == list(range(PARTITIONS))
    answer = run.__call__

    async def with_another_bridge(name: str, *params: Any) -> list[Any]:
        return [("bridge-b",)] if name == "bridges" else await answer(name, *params)

    leases._run = with_another_bridge  # type: ignore[assignment]
    clock.now += RENEW_EVERY_S
    leases.changed.clear()
    await asyncio.wait_for(leases._round(), 0.1)  # does not wait for the releases
    kept = list(range(PARTITIONS // 2))
    assert leases.held() == kept  # the others answer no epoch from now on
    assert leases.changed.is_set()  # and the ingest is told at once (it gives up their sessions)
    assert all(leases.leased(p) for p in range(PARTITIONS))  # (no other bridge can take those yet)
    await leases._renew_due()  # the loop's next turn
    assert sum(1 for name, _ in run.asked if name == "lease_renew") == PARTITIONS
    await asyncio.sleep(0.4)  # the releases waited RELEASE_WAIT_S, then gave the partitions back
    assert sorted(lost) == list(range(PARTITIONS // 2, PARTITIONS)) and leases.held() == kept
    assert [p for p in range(PARTITIONS) if leases.leased(p)] == kept
    assert sum(1 for name, _ in run.asked if name == "lease_drop") == PARTITIONS // 2
    await leases._round()  # the next round gives back nothing more
    assert leases.held() == kept and not leases._release_tasks


async def test_a_stopping_process_counts_each_lease_gone_before_it_drops_it() -> None:
    """Another process may take a partition as soon as its lease row is dropped: by then this
    one no longer counts it as leased (a record written for its users asks that holder)."""
    leases, _clock, run, _lost = await held_leases()
    answer = run.__call__
    leased_at_drop: list[bool] = []

    async def watching(name: str, *params: Any) -> list[Any]:
        if name == "lease_drop":
            leased_at_drop.append(leases.leased(params[0]))
        return await answer(name, *params)

    leases._run = watching  # type: ignore[assignment]
    await leases.stop()
    assert leased_at_drop == [False] * PARTITIONS
