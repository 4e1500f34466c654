"""Protocol sections 4 and 5 end to end: real server, real MQTT devices."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiomqtt
import pytest

from clients.sdk import Api, Device
from tests.conftest import NewUser, ServerProc
from tests.fakes import until
from tests.mqtt_raw import connect_packet, publish_packet, read_packet


async def next_of(dev: Device, event_type: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
    """The next event of that type (and fields), skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            ev = await dev.next_event()
            if ev["type"] == event_type and all(ev.get(k) == v for k, v in match.items()):
                return ev


async def test_direct_message_reaches_peer_and_senders_other_devices(new_user: NewUser, connect: Any) -> None:
    alice = await new_user()
    alice2 = await new_user(alice.phone)  # a second device of the same user
    bob = await new_user()
    da, da2, db = await connect(alice), await connect(alice2), await connect(bob)
    sent = await da.send("hello bob", to=bob.user_id)
    assert sent["type"] == "sent" and sent["seq"] == 1 and isinstance(sent["ts"], int)
    for dev in (db, da, da2):
        ev = await next_of(dev, "msg")
        assert ev["chat"] == sent["chat"] and ev["seq"] == 1 and ev["body"] == "hello bob"
        assert ev["from"] == alice.user_id and ev["device"] == alice.device_id
        assert ev["kind"] == "text" and ev["id"] == sent["id"] and ev["inbox"] >= 1


async def test_retry_with_same_id_returns_same_seq_and_stores_nothing_new(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    first = await da.send("once", to=b.user_id, id="same-id-1")
    again = await da.send("once", to=b.user_id, id="same-id-1")
    assert (again["seq"], again["chat"], again["ts"]) == (first["seq"], first["chat"], first["ts"])
    history = await da.api.history(first["chat"])
    assert [m["seq"] for m in history["messages"]] == [1]


async def test_seq_is_gap_free_and_keeps_one_devices_order(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    n = 60
    replies = await asyncio.gather(*(da.send(f"m{i}", chat=chat, id=f"ord-{i}") for i in range(n)))
    assert sorted(r["seq"] for r in replies) == list(range(1, n + 1))
    history = await da.api.history(chat, limit=200)
    bodies = [m["body"] for m in reversed(history["messages"])]
    # publishes left the device in order m0..m59; seq follows that order
    assert bodies == [f"m{i}" for i in range(n)]


async def test_two_devices_sending_at_once_never_share_a_seq(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da, db = await connect(a), await connect(b)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    ra, rb = await asyncio.gather(
        asyncio.gather(*(da.send(f"a{i}", chat=chat) for i in range(30))),
        asyncio.gather(*(db.send(f"b{i}", chat=chat) for i in range(30))),
    )
    assert sorted(r["seq"] for r in [*ra, *rb]) == list(range(1, 61))


async def test_non_member_gets_forbidden_and_nothing_is_stored(new_user: NewUser, connect: Any) -> None:
    a, b, c = await new_user(), await new_user(), await new_user()
    da, dc = await connect(a), await connect(c)
    chat = (await da.send("private", to=b.user_id))["chat"]
    try:
        await dc.send("intrude", chat=chat)
        raise AssertionError("expected forbidden")
    except Exception as exc:  # noqa: BLE001
        assert getattr(exc, "code", None) == "forbidden"
    assert len((await da.api.history(chat))["messages"]) == 1


async def test_offline_device_catches_up_with_sync_in_batches(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    for i in range(25):
        await da.send(f"while away {i}", chat=chat)
    db = Device(b)
    await db.__aenter__()
    try:
        # the SDK synced on connect; check the raw batches too
        first = await db.request({"type": "sync", "after": 0, "limit": 10})
        assert [it["inbox"] for it in first["items"]] == list(range(1, 11))
        assert first["last"] == 10 and first["more"] is True
        rest = await db.request({"type": "sync", "after": 10, "limit": 1000})
        assert [it["inbox"] for it in rest["items"]] == list(range(11, 26)) and rest["more"] is False
        got = [ev for ev in db.pending_events() if ev["type"] == "msg"]
        assert [ev["body"] for ev in got] == [f"while away {i}" for i in range(25)]
        empty = await db.request({"type": "sync", "after": 25})
        assert empty["items"] == [] and empty["more"] is False and empty["last"] == 25
    finally:
        await db.close()


async def test_events_the_app_never_took_come_again_after_a_restart(new_user: NewUser, connect: Any) -> None:
    """The SDK keeps in the profile the inbox position the application has taken, not the one
    it delivered to its queue: events delivered but never taken (the process ended) come again
    when the device starts next, and nothing taken comes twice."""
    a, b = await new_user(), await new_user()
    da = await connect(a)
    db = await connect(b)
    for i in range(3):
        await da.send(f"m{i}", to=b.user_id)
    first = await db.next_event(timeout=10)
    assert first["body"] == "m0"
    await until(lambda: db.cursor, first["inbox"] + 2, timeout=10)  # m1, m2 delivered to the queue, not taken
    await db.close()
    assert b.cursor == first["inbox"]
    again = await connect(b)
    got = [await again.next_event(timeout=10) for _ in range(2)]
    assert [ev["body"] for ev in got] == ["m1", "m2"]
    assert again.pending_events() == []


async def test_a_closed_device_tells_whoever_waits_for_an_event(new_user: NewUser, connect: Any) -> None:
    from clients.sdk import PigeonClientError

    dev = await connect(await new_user())
    listening = asyncio.create_task(anext(dev.events(), None))
    waiting = asyncio.create_task(dev.next_event())
    await asyncio.sleep(0.1)
    await dev.close()
    async with asyncio.timeout(5):  # a hang guard
        assert await listening is None  # the iteration ended
        with pytest.raises(PigeonClientError) as caught:
            await waiting
    assert caught.value.code == "not_connected"
    assert [ev async for ev in dev.events()] == []


async def test_a_device_whose_start_fails_leaves_nothing_running(new_user: NewUser,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.sdk import PigeonClientError

    dev = Device(await new_user())

    async def refused(*args: Any, **kw: Any) -> int:
        raise PigeonClientError("rate_limited", "the server is overloaded; retry later")

    monkeypatch.setattr(dev, "sync", refused)
    with pytest.raises(PigeonClientError):
        await dev.__aenter__()
    assert dev._runner is None and dev._client is None and dev._closing  # noqa: SLF001


async def test_sync_returns_events_exactly_as_delivered_live(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da, db = await connect(a), await connect(b)
    await da.send("x", to=b.user_id)
    live = await next_of(db, "msg")
    batch = await db.request({"type": "sync", "after": live["inbox"] - 1, "limit": 1})
    assert batch["items"] == [live]


async def test_ack_gives_sender_a_delivered_receipt_and_read_a_read_receipt(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    sent = await da.send("are you there", to=b.user_id)
    await next_of(da, "msg")
    db = await connect(b)  # connects, syncs and acks
    delivered = await next_of(da, "receipt", kind="delivered")
    assert delivered["user"] == b.user_id and delivered["up_to"] == sent["seq"] and delivered["chat"] == sent["chat"]
    await db.read(sent["chat"], sent["seq"])
    read = await next_of(da, "receipt", kind="read")
    assert read["user"] == b.user_id and read["up_to"] == sent["seq"]
    receipts = {r["user"]: r for r in await da.api.receipts(sent["chat"])}
    assert receipts[b.user_id] == {"user": b.user_id, "delivered": 1, "read": 1}


async def test_receipts_only_move_forward(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da, db = await connect(a), await connect(b)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    for i in range(3):
        await da.send(f"m{i}", chat=chat)
    await db.read(chat, 3)
    await next_of(da, "receipt", kind="read", up_to=3)
    await db.read(chat, 1)  # going back is ignored
    await db.read(chat, 99)  # past the end is capped at the last seq
    await asyncio.sleep(0.5)
    receipts = {r["user"]: r for r in await da.api.receipts(chat)}
    assert receipts[b.user_id]["read"] == 3
    assert not [e for e in da.pending_events() if e["type"] == "receipt" and e["kind"] == "read"]


async def test_group_system_messages_fan_out_and_aggregate_receipts(new_user: NewUser, connect: Any) -> None:
    owner, m1, m2, late = await new_user(), await new_user(), await new_user(), await new_user()
    do, d1, d2 = await connect(owner), await connect(m1), await connect(m2)
    group = await do.api.create_group("team", [m1.user_id, m2.user_id])
    assert group["kind"] == "group" and set(group["members"]) == {owner.user_id, m1.user_id, m2.user_id}
    chat = group["chat"]
    created = await next_of(d1, "msg", chat=chat)
    assert created["kind"] == "system" and created["event"] == "created" and created["seq"] == 1
    sent = await do.send("hi team", chat=chat)
    assert sent["seq"] == 2
    for dev in (d1, d2, do):
        assert (await next_of(dev, "msg", seq=2))["body"] == "hi team"
    # both others read: the owner hears that everyone else reached seq 2
    await d1.read(chat, 2)
    await d2.read(chat, 2)
    agg = await next_of(do, "receipt", kind="read", user="*")
    assert agg["up_to"] == 2 and agg["chat"] == chat
    per_member = {r["user"]: r["read"] for r in await do.api.receipts(chat)}
    assert per_member[m1.user_id] == 2 and per_member[m2.user_id] == 2
    # membership changes are system messages in the same sequence
    await do.api.add_member(chat, late.user_id)
    added = await next_of(d1, "msg", chat=chat, event="member_added")
    assert added["seq"] == 3 and added["user"] == late.user_id
    await d2.api.remove_member(chat, m2.user_id)
    left = await next_of(d1, "msg", chat=chat, event="member_left")
    assert left["seq"] == 4 and left["user"] == m2.user_id
    chats = {c["chat"]: c for c in await d1.api.chats()}
    assert set(chats[chat]["members"]) == {owner.user_id, m1.user_id, late.user_id}


async def test_direct_chat_has_no_system_messages(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    assert (await da.send("first", chat=chat))["seq"] == 1


async def test_typing_goes_only_to_online_members_and_is_not_stored(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da, db = await connect(a), await connect(b)
    chat = (await da.api.open_direct(b.user_id))["chat"]
    await da.typing(chat)
    ev = await next_of(db, "typing")
    assert ev == {"type": "typing", "chat": chat, "user": a.user_id}
    synced = await db.request({"type": "sync", "after": 0})
    assert all(it["type"] != "typing" for it in synced["items"])


async def test_presence_watch_will_and_last_seen(new_user: NewUser, connect: Any, server: ServerProc) -> None:
    a, b, stranger = await new_user(), await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)
    # b is a phone whose connection will drop without a goodbye
    up = f"up/{b.user_id}/{b.device_id}"
    offline_will = json.dumps({"type": "presence", "state": "offline"}).encode()
    reader, writer = await asyncio.open_connection(server.mqtt_host, server.mqtt_port)
    writer.write(connect_packet(b.device_id, b.device_id, b.token, will=(up, offline_will)))
    writer.write(publish_packet(up, b'{"type":"presence","state":"online"}', 1))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    await read_packet(reader)  # PUBACK of the presence
    now = await da.watch([b.user_id, stranger.user_id], ttl=60)
    assert [(p["user"], p["online"]) for p in now] == [(b.user_id, True)]  # the stranger is left out
    writer.close()  # the broker publishes b's will
    offline = await next_of(da, "presence", user=b.user_id)
    assert offline["online"] is False and offline["last_seen"] > 0
    db = await connect(b)
    assert (await next_of(da, "presence", user=b.user_id))["online"] is True
    await db.close()  # a clean goodbye says offline too
    assert (await next_of(da, "presence", user=b.user_id))["online"] is False
    http = await da.api.presence(b.user_id)
    assert http["online"] is False and http["last_seen"] >= offline["last_seen"]
    try:
        await da.api.presence(stranger.user_id)
        raise AssertionError("expected forbidden")
    except Exception as exc:  # noqa: BLE001
        assert getattr(exc, "code", None) == "forbidden"


async def test_websocket_transport_carries_the_same_protocol(new_user: NewUser, connect: Any,
                                                             server: ServerProc) -> None:
    if not server.ws_port:
        pytest.skip("this broker has no WebSocket listener here: Debian's Mosquitto 2.0.11 cannot bind one to "
                    "loopback only, and tests may not listen on other addresses")
    a, b = await new_user(), await new_user()
    da = await connect(a, transport="websockets")
    db = await connect(b)
    sent = await da.send("over websockets", to=b.user_id)
    assert (await next_of(db, "msg"))["seq"] == sent["seq"]


async def test_publish_and_disconnect_device_is_stored(new_user: NewUser, server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    up = f"up/{a.user_id}/{a.device_id}"
    async with aiomqtt.Client(server.mqtt_host, server.mqtt_port, identifier=a.device_id, username=a.device_id,
                              password=a.token, clean_session=True) as c:
        for i in range(20):
            await c.publish(up, json.dumps({"type": "send", "id": f"iot-{i}", "to": b.user_id, "body": f"r{i}"}), qos=1)
    api = Api(b)
    try:
        chat = (await api.open_direct(a.user_id))["chat"]
        async with asyncio.timeout(10):
            while len((await api.history(chat))["messages"]) < 20:  # noqa: ASYNC110 - polling the server
                await asyncio.sleep(0.05)
        bodies = [m["body"] for m in reversed((await api.history(chat))["messages"])]
        assert bodies == [f"r{i}" for i in range(20)]
    finally:
        await api.close()


async def test_http_send_matches_mqtt_send(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    db = await connect(b)
    api = Api(a)
    try:
        chat = (await api.open_direct(b.user_id))["chat"]
        rid = uuid.uuid4().hex
        reply = await api.post_message(chat, "via http", id=rid)
        assert reply == {"type": "sent", "id": rid, "chat": chat, "seq": 1, "ts": reply["ts"]}
        assert (await next_of(db, "msg"))["body"] == "via http"
        again = await api.post_message(chat, "via http", id=rid)
        assert again["seq"] == 1
    finally:
        await api.close()


async def test_a_silent_device_goes_offline_by_keepalive(new_user: NewUser, connect: Any, server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)
    up = f"up/{b.user_id}/{b.device_id}"
    await da.watch([b.user_id], ttl=60)  # before b connects: every change of b is reported
    reader, writer = await asyncio.open_connection(server.mqtt_host, server.mqtt_port)
    writer.write(connect_packet(b.device_id, b.device_id, b.token, keepalive=1,
                                will=(up, b'{"type":"presence","state":"offline"}')))
    writer.write(publish_packet(up, b'{"type":"presence","state":"online"}', 1))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    # b never pings: the broker closes it after 1.5 x keepalive and publishes its will
    async with asyncio.timeout(15):
        await next_of(da, "presence", user=b.user_id, online=True)
        offline = await next_of(da, "presence", timeout=12, user=b.user_id, online=False)
    assert offline["last_seen"] > 0
    writer.close()
