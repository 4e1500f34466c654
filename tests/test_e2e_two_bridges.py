"""Two bridge processes share one Mosquitto, one Cassandra and one Redis.

They share the store's partitions by lease: each takes the device traffic of the users of the
partitions it holds, and numbers the chats and inboxes of those partitions for both; together
they keep every promise: a chat's seq numbers stay gap-free, each device's messages keep its
order, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from clients.sdk import Api, Device, Profile, login
from storage.cassandra_owner import partition_of
from tests.conftest import (
    ServerProc,
    broker_flags,
    first_v1_msg,
    fresh_phone,
    metric,
    production_flags,
    sends_handled,
    two_bridges,
)
from tests.test_e2e_failover import holds, lease_holders, settled


@pytest.fixture(scope="module")
def bridges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, ServerProc, list[str]]]:
    flags = production_flags() + broker_flags()
    with two_bridges(tmp_path_factory.mktemp("bridge0"), tmp_path_factory.mktemp("bridge1"), *flags) as (first, second):
        yield first, second, flags


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


READ_BACKS = ("read_inbox", "fence_get", "chat_head", "chat_tail", "get_chat", "members", "user_state")


async def reads_back(srv: ServerProc) -> dict[str, float]:
    return {name: await metric(srv, f'pigeon_store_statements_by_name_total{{statement="{name}"}}')
            for name in READ_BACKS}


async def test_a_conversation_across_two_bridges_reads_nothing_back_in_steady_state(
        bridges: tuple[ServerProc, ServerProc, list[str]]) -> None:
    """Two users whose traffic two different bridges take: once each has sent a message, the
    sends, acks and receipts between them are numbered and written without reading anything
    back from Cassandra (each side knows the chat's members, and the holder of an inbox keeps
    what it numbered for another bridge), and what one bridge asks the other goes over their
    direct connection, not through Redis lists (storage/peers.py)."""
    import redis.asyncio as aioredis

    from tests.conftest import production_url

    b0, b1, flags = bridges
    admin = aioredis.from_url(production_url("PIGEON_REDIS", "redis://"))

    async def pushes() -> int:
        return int((await admin.info("commandstats")).get("cmdstat_rpush", {}).get("calls", 0))

    await settled(b0, b1)
    holders = await asyncio.to_thread(lease_holders, flags)
    found: dict[int, Profile] = {}
    for i in range(60):
        p = await login((b0, b1)[i % 2].http, fresh_phone())
        for srv in (b0, b1):
            if holds(srv, holders.get(partition_of(f"u:{p.user_id}"), "")):
                found.setdefault(srv.proc.pid, p)
        if len(found) == 2:
            break
    alice, bob = found[b0.proc.pid], found[b1.proc.pid]
    async with Device(alice) as a, Device(bob) as b:
        async def exchange(tag: str, rounds: int) -> None:
            last: dict[Device, int] = {}
            for k in range(rounds):
                last[a] = int((await a.send(f"{tag}a{k}", to=bob.user_id))["seq"])
                last[b] = int((await b.send(f"{tag}b{k}", to=alice.user_id))["seq"])
            for me, peer in ((a, bob.user_id), (b, alice.user_id)):
                texts, delivered = 0, 0
                async with asyncio.timeout(20):  # until the peer's receipt covers my last message
                    while texts < rounds or delivered < last[me]:
                        ev = await me.next_event()
                        if ev["type"] == "msg" and str(ev.get("body", "")).startswith(tag):
                            texts += 1
                        elif ev["type"] == "receipt" and ev.get("user") == peer and ev.get("kind") == "delivered":
                            delivered = max(delivered, int(str(ev["up_to"])))

        await exchange("warm", 1)  # first uses: the chat, the pair and each key's log are read once
        await asyncio.sleep(1.5)
        before = [await reads_back(srv) for srv in (b0, b1)]
        pushed = await pushes()
        await exchange("s", 10)
        await asyncio.sleep(1.5)
        after = [await reads_back(srv) for srv in (b0, b1)]
        pushed = await pushes() - pushed
    await admin.aclose()
    read = {name: sum(aft[name] - bef[name] for bef, aft in zip(before, after, strict=True)) for name in READ_BACKS}
    assert not any(read.values()), f"statements that read back: {read}"
    assert pushed == 0, f"{pushed} pushes onto Redis lists: requests between the bridges went through Redis"


async def test_a_v1_device_linked_through_one_bridge_gets_the_v1_events_the_other_publishes(
        bridges: tuple[ServerProc, ServerProc, list[str]]) -> None:
    """Users whose devices all said proto 2 at login get no v1 copies on ``down/{user}``
    (bridge/wire.py, V1Readers); a v1 device linked through the *other* bridge is heard of by
    both (Redis pub/sub), and the bridge that publishes the peer's messages copies them to
    ``down/{user}`` again at once."""
    b0, b1, flags = bridges
    await settled(b0, b1)
    holders = await asyncio.to_thread(lease_holders, flags)
    found: dict[int, Profile] = {}
    for i in range(60):
        p = await login((b0, b1)[i % 2].http, fresh_phone())  # the SDK says proto 2
        for srv in (b0, b1):
            if holds(srv, holders.get(partition_of(f"u:{p.user_id}"), "")):
                found.setdefault(srv.proc.pid, p)
        if len(found) == 2:
            break
    alice, bob = found[b0.proc.pid], found[b1.proc.pid]  # alice's sends are published by b0

    async def qos1_out() -> float:
        return sum([await metric(srv, 'pigeon_messages_out_total{qos="1"}') for srv in (b0, b1)])

    async def next_msg(dev: Device, body: str) -> None:
        async with asyncio.timeout(10):
            while (ev := await dev.next_event())["type"] != "msg" or ev["body"] != body:
                pass

    async with Device(alice) as a, Device(bob) as b:
        for n in range(20):  # until both bridges have read that nobody reads v1 here
            before = await qos1_out()
            await a.send(f"v2 only {n}", to=bob.user_id)
            await next_msg(b, f"v2 only {n}")
            await b.send(f"back {n}", to=alice.user_id)
            await next_msg(a, f"back {n}")
            await asyncio.sleep(0.3)  # the receipts that follow
            if await qos1_out() == before:
                break
        else:
            pytest.fail("v1 copies went on for users with v2 devices only")
        listener = await login(b1.http, bob.phone, proto=1)  # through the bridge that does not publish alice's
        ev, _qos = await first_v1_msg(b0.mqtt_host, b0.mqtt_port, listener, bob.user_id,
                                      lambda: a.send("for every device", to=bob.user_id))
        assert (ev["body"], ev["from"]) == ("for every device", alice.user_id)


async def test_a_partitions_holder_reads_its_records_again_when_another_bridge_asks(
        bridges: tuple[ServerProc, ServerProc, list[str]]) -> None:
    """A bridge that recorded an unfinished read or ack for a partition the other holds asks
    that holder, over their usual channel, to read the partition's records again
    (bridge/handover.py). Seen here by a record the holder cannot understand: reading them
    again drops it from Redis."""
    from urllib.parse import urlsplit

    from bridge.handover import ADOPT
    from storage.state_redis import RedisState
    from tests.conftest import production_url

    b0, b1, flags = bridges
    await settled(b0, b1)
    holders = await asyncio.to_thread(lease_holders, flags)
    part = min(p for p, holder in holders.items() if holds(b1, holder))
    keyspace = urlsplit(flags[flags.index("--store") + 1]).path.strip("/")
    state = RedisState(production_url("PIGEON_REDIS", "redis://"))
    try:
        await state.put_unfinished(keyspace, part, {"x-not-a-record": f"{int(time.time() * 1000)} ?"})
        assert await state.unfinished(keyspace, part) != {}
        assert await state.call(f"{keyspace}:p{part}", {"kind": ADOPT, "part": part}, 5.0) == {"ok": True}
        assert await state.unfinished(keyspace, part) == {}
    finally:
        await state.close()
