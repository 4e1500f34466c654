"""The partition leases of one process (storage/cassandra_owner.Leases) against a stand-in for
their Cassandra statements that answers at once and records what was asked, on a clock the test
moves: when a lease is kept, and when it is given back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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

    async def __call__(self, name: str, *params: Any) -> list[Any]:
        self.asked.append((name, params))
        if name == "lease_renew":
            self.clock.now += self.renew_takes
            self.renew_takes = 0.0  # the others of the same round come back with it
        if name in ("leases", "bridges", "alive", "gone", "epoch_get"):
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
    assert leases.epoch(3) == 1


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
