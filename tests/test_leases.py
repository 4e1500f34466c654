"""The partition leases of one process (storage/cassandra_owner.Leases) against a stand-in for
their Cassandra statements that answers at once and records what was asked, on a clock the test
moves: when a lease is kept, and when it is given back."""

from __future__ import annotations

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
