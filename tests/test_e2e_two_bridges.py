"""Two bridge processes share one Mosquitto, one Cassandra and one Redis.

They share the store's partitions by lease: each takes the device traffic of the users of the
partitions it holds, and numbers the chats and inboxes of those partitions for both; together
they keep every promise: a chat's seq numbers stay gap-free, each device's messages keep its
order, and nothing is lost.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from clients.sdk import Api, Device, Profile, login
from storage.cassandra_owner import partition_of
from tests.conftest import ServerProc, broker_flags, fresh_phone, production_flags, sends_handled
from tests.test_e2e_failover import holds, lease_holders, settled


@pytest.fixture(scope="module")
def bridges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, ServerProc, list[str]]]:
    flags = production_flags() + broker_flags()
    first = ServerProc.start(tmp_path_factory.mktemp("bridge0"), *flags)
    try:
        second = ServerProc.start(tmp_path_factory.mktemp("bridge1"), *flags)
    except BaseException:
        first.stop()
        raise
    yield first, second, flags
    second.stop()
    first.stop()


async def test_two_bridges_share_the_load_and_keep_every_promise(
        bridges: tuple[ServerProc, ServerProc, list[str]]) -> None:
    b0, b1, flags = bridges
    await settled(b0, b1)  # the second holds its share (the first held everything alone)
    holders = await asyncio.to_thread(lease_holders, flags)
    on: dict[int, list[Profile]] = {b0.proc.pid: [], b1.proc.pid: []}
    for _ in range(60):  # four senders whose device traffic each bridge takes
        p = await login((b0, b1)[len(on[b0.proc.pid]) % 2].http, fresh_phone())
        for srv in (b0, b1):
            if holds(srv, holders.get(partition_of(f"u:{p.user_id}"), "")) and len(on[srv.proc.pid]) < 4:
                on[srv.proc.pid].append(p)
        if min(len(v) for v in on.values()) == 4:
            break
    everyone = on[b0.proc.pid] + on[b1.proc.pid]
    assert len(everyone) == 8, {pid: len(v) for pid, v in on.items()}
    reader = await login(b1.http, fresh_phone())
    async with Api(everyone[0]) as api:
        chat = (await api.create_group("load", [p.user_id for p in everyone[1:]] + [reader.user_id]))["chat"]
    per_device = 15
    devices = [Device(p) for p in everyone]
    for d in devices:
        await d.__aenter__()
    rdev = Device(reader)
    await rdev.__aenter__()
    try:
        async def burst(i: int, d: Device) -> None:
            for k in range(per_device):
                await d.send(f"{i}:{k}", chat=chat)

        await asyncio.gather(*(burst(i, d) for i, d in enumerate(devices)))
        total = len(devices) * per_device
        got: list[dict[str, object]] = []
        async with asyncio.timeout(30):
            while len(got) < total:
                ev = await rdev.next_event()
                if ev["type"] == "msg" and ev.get("kind") == "text":
                    got.append(ev)
    finally:
        for d in [*devices, rdev]:
            await d.close()
    # gap-free numbering across both processes: seq 1 is the group's creation
    seqs = Counter(int(str(e["seq"])) for e in got)
    doubled = [e for e in got if seqs[int(str(e["seq"]))] > 1]
    assert not doubled, f"delivered more than once: {doubled}"
    assert sorted(seqs) == list(range(2, total + 2))
    # each device's messages in the order it sent them
    for i in range(len(devices)):
        mine = [str(e["body"]) for e in got if str(e["body"]).startswith(f"{i}:")]
        assert mine == [f"{i}:{k}" for k in range(per_device)]
    # the reader's inbox positions are gap-free too, and the work really was shared
    inbox = [int(str(e["inbox"])) for e in got]
    assert inbox == sorted(inbox) and len(set(inbox)) == total
    handled = (await sends_handled(b0), await sends_handled(b1))
    assert min(handled) >= 4 * per_device, handled  # each took the sends of its own four devices
