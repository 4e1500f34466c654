"""A bridge dies under load and the other takes over its share, on the real servers.

Two bridges on one Mosquitto, one Cassandra keyspace and one Redis share the store's 16
partitions. :class:`tests.load.Load` (8 devices in 4 pairs, retrying as PROTOCOL.md allows)
runs through both; in the middle of it the bridge that holds the partitions of more of the
loaded users is killed with SIGKILL and never started again. The survivor must take every
partition within 10 s (the dead holder's leases run out after ``LEASE_TTL_S``), take over the
dead bridge's broker sessions with what Mosquitto kept in them, and answer every send; then
:func:`tests.load.check` lists every broken promise.

Which bridge holds which partition is read from the keyspace's ``leases`` table (a lease row
names its holder, ``{host}-{pid}-{hex}``): no server code is needed for it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from clients.launch import ServerProc
from storage.cassandra_owner import PARTITIONS, partition_of
from tests.conftest import broker_flags, partitions_held, production_flags, two_bridges
from tests.load import Load, make_pairs
from tests.test_e2e_crash import drop_keyspace, verdict

TAKEOVER_S = 10.0


def lease_holders(flags: list[str]) -> dict[int, str]:
    """Partition -> holder, as the keyspace's lease rows say (read only)."""
    from storage import cassandra_cluster

    url = urlsplit(flags[flags.index("--store") + 1])
    keyspace = url.path.strip("/")
    cluster = cassandra_cluster(url.geturl(), connect_timeout=10)
    try:
        rows = cluster.connect().execute(f"SELECT part, holder FROM {keyspace}.leases WHERE ring=0", timeout=30)
        return {int(r.part): str(r.holder) for r in rows}
    finally:
        cluster.shutdown()


def holds(srv: ServerProc, holder: str) -> bool:
    return f"-{srv.proc.pid}-" in holder


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], ServerProc, ServerProc]]:
    # one deployment signs with one secret: a token one bridge gave is good on the other (the
    # services' Mosquitto checks tokens with the secret they export as PIGEON_SECRET_FILE)
    if not os.environ.get("PIGEON_SECRET_FILE"):
        monkeypatch.setenv("PIGEON_SECRET", secrets.token_hex(32))
    flags = production_flags() + broker_flags()  # once: both bridges on one keyspace
    with two_bridges(tmp_path / "bridge0", tmp_path / "bridge1", *flags) as (first, second):
        yield flags, first, second
        drop_keyspace(flags)


async def settled(b0: ServerProc, b1: ServerProc, stable_s: float = 2.0) -> None:
    """Until both bridges hold partitions, together all of them, unchanged for ``stable_s``.

    Stable, because for up to a second after a bridge gives a partition back it may still take
    requests asked of that partition's holder and answer them "not held here" (the login of a
    device of that partition then fails with ``unavailable``): that is the balancing, not the
    failover this file tests."""
    since, last = 0.0, (-1.0, -1.0)
    async with asyncio.timeout(30):
        while True:
            held = (await partitions_held(b0), await partitions_held(b1))
            now = time.monotonic()
            if held != last:
                since, last = now, held
            if min(held) > 0 and sum(held) == PARTITIONS and now - since >= stable_s:
                return
            await asyncio.sleep(0.2)


async def test_sigkill_of_one_of_two_bridges_under_load_its_share_taken_over(
        deployment: tuple[list[str], ServerProc, ServerProc], tmp_path: Path) -> None:
    flags, b0, b1 = deployment
    await settled(b0, b1)
    # devices log in through either bridge; their traffic goes to the holder of their partition
    pairs = await make_pairs(b0.http, 2) + await make_pairs(b1.http, 2)
    users = [p.user_id for pair in pairs for p in (pair.a, pair.b)]

    load = Load(pairs)
    load.start()
    await asyncio.sleep(2.0)
    sent_before = len(load.sends())
    assert sent_before > 0, load.summary()

    owners = await asyncio.to_thread(lease_holders, flags)
    on = {srv.proc.pid: [u for u in users if holds(srv, owners.get(partition_of(f"u:{u}"), ""))]
          for srv in (b0, b1)}
    victim, survivor = (b0, b1) if len(on[b0.proc.pid]) >= len(on[b1.proc.pid]) else (b1, b0)
    doomed = on[victim.proc.pid]
    assert doomed, f"no loaded user's partition is held by either bridge: {owners}"
    print(f"killing the bridge that holds {sorted(p for p, h in owners.items() if holds(victim, h))}, "
          f"the partitions of {len(doomed)} of the {len(users)} loaded users")

    victim.stop(signal.SIGKILL)  # nothing gets a chance to flush, answer or drop a lease
    killed_at = asyncio.get_running_loop().time()  # the clock of the sends' traces
    async with asyncio.timeout(TAKEOVER_S + 5):
        while (held := await partitions_held(survivor)) < PARTITIONS:  # noqa: ASYNC110 - polls a server
            await asyncio.sleep(0.1)
    took = asyncio.get_running_loop().time() - killed_at
    print(f"the survivor held all {PARTITIONS} partitions {took:.1f} s after the kill")
    assert took <= TAKEOVER_S, f"takeover took {took:.1f} s (survivor holds {held})"

    load.stop_new(after=3.0)  # three more seconds of new sends, all on the survivor
    await load.wait()
    sends = load.sends()
    assert len(sends) > sent_before, f"no sends after the kill: {load.summary()}"
    # sends of the dead bridge's users that had to wait for the takeover (in flight at the kill, or
    # made before the survivor held everything: at a low rate a device may have had none in flight
    # at the very moment of the kill), answered by the survivor
    taken_at = killed_at + took
    waited = [answered - s.trace[0][0] for s in sends if s.user in doomed and s.trace and s.trace[0][0] < taken_at
              for answered in [next((at for at, what in s.trace if what.startswith("sent ")), 0.0)]
              if answered > killed_at + 1.0]
    print(f"{len(waited)} sends of the dead bridge's users were made before the takeover and answered by the "
          f"survivor, after up to {max(waited, default=0):.1f} s; {load.summary()}")
    assert waited, f"the kill went unnoticed by the devices of the dead bridge's users: {load.summary()}"
    # the checker reads histories over HTTP: through the survivor, whichever bridge logged them in
    for pair in pairs:
        pair.a.http_url = pair.b.http_url = survivor.http
    await verdict(load, tmp_path / "load-report.json")
