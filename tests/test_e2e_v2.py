"""Protocol v2 end to end: devices speaking v2 beside devices speaking v1, on the real server.

The SDK with ``proto=2`` (its default) sends MessagePack requests and decodes MessagePack
events; the application sees the same events as with v1 (``proto=1``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bridge.protocol import MsgEvent, ReceiptEvent, Sent
from clients.launch import ServerProc
from clients.sdk import Device, PigeonClientError
from tests.conftest import NewUser, first_v1_msg, metric


async def next_of(dev: Device, event_type: str, timeout: float = 5.0, **match: Any) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            ev = await dev.next_event()
            if ev["type"] == event_type and all(ev.get(k) == v for k, v in match.items()):
                return ev


async def test_v2_and_v1_devices_of_two_users_each_get_what_they_speak(new_user: NewUser, connect: Any) -> None:
    alice = await new_user()
    alice_v1 = await new_user(alice.phone, proto=1)
    bob = await new_user()
    bob_v1 = await new_user(bob.phone, proto=1)
    da = await connect(alice, proto=2)
    da1, db, db1 = await connect(alice_v1, proto=1), await connect(bob, proto=2), await connect(bob_v1, proto=1)
    sent = await da.send("hello in v2", to=bob.user_id)
    assert isinstance(sent, Sent) and sent.seq == 1 and sent.inbox is not None and len(sent.id) <= 2  # fresh counter
    own = await next_of(da, "msg")  # put in the stream by the SDK: the server sent no copy
    assert isinstance(own, MsgEvent) and own.inbox == sent.inbox and own["id"] == sent.id
    assert own["body"] == "hello in v2" and own["device"] == alice.device_id
    for dev in (da1, db1):  # v1 devices: the whole v1 event
        ev = await next_of(dev, "msg")
        assert (ev["body"], ev["from"], ev["device"], ev["id"]) == ("hello in v2", alice.user_id, alice.device_id,
                                                                   sent.id)
    ev = await next_of(db, "msg")  # another member's v2 device
    assert isinstance(ev, MsgEvent) and ev.message.body == "hello in v2" and ev.message.sender == alice.user_id
    assert ev.message.device == alice.device_id and ev.message.id == sent.id
    # bob's v2 device acknowledges: alice's devices, both kinds, hear it was delivered
    for dev in (da, da1):
        receipt = await next_of(dev, "receipt", kind="delivered")
        assert receipt["user"] == bob.user_id and receipt["up_to"] == 1
    assert isinstance(receipt, ReceiptEvent)
    # and bob answers from v2: alice's v2 device has it in order after her own
    back_sent = await db.send("hi back", chat=sent.chat)
    assert back_sent.chat == sent.chat  # (left out of the v2 sent: the SDK restores it from its send)
    back = await next_of(da, "msg")
    assert back["body"] == "hi back" and back["inbox"] > own.inbox and back["from"] == bob.user_id


async def test_a_direct_message_whose_chat_was_left_out_arrives_with_it(
        new_user: NewUser, connect: Any, server: ServerProc) -> None:
    """A live msg from the peer of a direct chat leaves the chat out (v2): a device that does not
    know that chat yet fetches the message by sync and knows it from then on."""
    alice, bob = await new_user(), await new_user()
    da, db = await connect(alice, proto=2), await connect(bob, proto=2)
    first = await da.send("first", to=bob.user_id)
    ev = await next_of(db, "msg")
    assert isinstance(ev, MsgEvent) and (ev.message.chat, ev.message.body, ev.message.sender) == (
        first.chat, "first", alice.user_id)
    syncs = await metric(server, 'pigeon_requests_total{type="sync"}')
    await da.send("second", chat=first.chat)
    ev = await next_of(db, "msg")
    assert isinstance(ev, MsgEvent) and (ev.message.chat, ev.message.body) == (first.chat, "second")
    # alice's device knows the chat from her own send to bob: his answer needs no sync either
    await db.send("back", chat=first.chat)
    back = await next_of(da, "msg", body="back")
    assert back["chat"] == first.chat and back["from"] == bob.user_id
    assert await metric(server, 'pigeon_requests_total{type="sync"}') == syncs


async def test_live_times_in_v2_are_whole_again_on_the_device(new_user: NewUser, connect: Any) -> None:
    """A live msg and a sent carry the low 32 bits of their time (v2): the SDK places them by the
    server's clock, which every batch gives (the device synced on connect)."""
    alice, bob = await new_user(), await new_user()
    bob_v1 = await new_user(bob.phone, proto=1)
    da, db, db1 = await connect(alice, proto=2), await connect(bob, proto=2), await connect(bob_v1, proto=1)
    before = time.time_ns() // 1_000_000
    sent = await da.send("when", to=bob.user_id)
    assert isinstance(sent, Sent) and before - 60_000 < sent.ts < time.time_ns() // 1_000_000 + 60_000
    whole = await next_of(db1, "msg", body="when")  # v1: the whole time
    assert sent.ts == whole["ts"] and sent.ts >= 1 << 32
    ev = await next_of(db, "msg", body="when")
    assert isinstance(ev, MsgEvent) and ev.message.ts == sent.ts
    again = await da.send("when again", chat=sent.chat)
    ev = await next_of(db, "msg", body="when again")
    whole = await next_of(db1, "msg", body="when again")
    assert isinstance(ev, MsgEvent) and ev.message.ts == again.ts == whole["ts"]


async def test_a_v2_device_syncs_and_is_refused_in_v2(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(proto=1), await new_user()
    da = await connect(a, proto=1)
    for i in range(3):
        await da.send(f"m{i}", to=b.user_id)
    db = await connect(b, proto=2)  # connects after: everything comes by sync, in v2
    got = [await next_of(db, "msg") for _ in range(3)]
    assert [e["body"] for e in got] == ["m0", "m1", "m2"] and db.cursor == got[-1]["inbox"]
    with pytest.raises(PigeonClientError) as caught:
        await db.send("x", to="u_nobody")
    assert caught.value.code == "not_found"
    with pytest.raises(PigeonClientError) as caught:  # a type v2 has no number for goes as JSON
        await db.request({"type": "fly"})
    assert caught.value.code == "unknown_type"
    presence = await db.watch([a.user_id])  # and the next request is v2 again
    assert [p["user"] for p in presence] == [a.user_id]


async def test_a_v2_device_over_mqtt5_names_its_up_topic_once_then_uses_the_alias(
        server: Any, new_user: NewUser, connect: Any) -> None:
    """On Mosquitto (MQTT 5, Topic Alias Maximum 10 by default) the SDK with ``mqtt5=True``
    publishes its up topic once with alias 1 and the alias alone after that: the broker must
    resolve it for the requests to be answered at all."""
    if server.profile != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    alice, bob = await new_user(), await new_user(proto=1)
    da = await connect(alice, mqtt5=True)
    db = await connect(bob, mqtt5=True, proto=1)
    assert da._alias == 1 and da._alias_named  # (presence and the first sync went out already)
    first = await da.send("one", to=bob.user_id)
    for n in range(3):
        sent = await da.send(f"m{n}", chat=first.chat)
        assert sent.seq == n + 2 and sent.chat == first.chat
    bodies = [(await next_of(db, "msg"))["body"] for _ in range(4)]
    assert bodies == ["one", "m0", "m1", "m2"]
    await db.send("back", chat=first.chat)
    assert (await next_of(da, "msg", body="back"))["from"] == bob.user_id


def test_mqtt5_is_for_tcp_only() -> None:
    from clients.sdk import Profile
    p = Profile(http_url="http://127.0.0.1:1", user_id="u", device_id="d", token="t", expires_at=0,
                mqtt_host="127.0.0.1", mqtt_port=1, ws_url="ws://127.0.0.1:1/mqtt")
    with pytest.raises(ValueError, match="tcp"):
        Device(p, mqtt5=True, transport="ws")


async def test_a_v1_listener_that_never_publishes_still_gets_its_users_events(
        new_user: NewUser, connect: Any, server: ServerProc) -> None:
    alice, bob = await new_user(), await new_user()
    da, db = await connect(alice, proto=2), await connect(bob, proto=2)
    first = await da.send("only v2 devices", to=bob.user_id)
    await next_of(db, "msg", body="only v2 devices")
    await next_of(da, "receipt", kind="delivered")
    # No v1 copy is made: the embedded broker knows nobody subscribes to down/{user}; with
    # Mosquitto the bridge learns from the store that both users' devices said proto 2 at
    # login (read in the background at their first events, so a send or two may still make one).
    for n in range(20):
        qos1 = await metric(server, 'pigeon_messages_out_total{qos="1"}')
        await da.send(f"still only v2 {n}", chat=first.chat)
        await next_of(db, "msg", body=f"still only v2 {n}")
        await next_of(da, "receipt", kind="delivered")
        if await metric(server, 'pigeon_messages_out_total{qos="1"}') == qos1:
            break
    else:
        pytest.fail("every send still made v1 copies on down/{user}")
    assert n == 0 or server.profile == "mosquitto"
    # a v1 client of bob's that only listens (never publishing, so never seen to speak v1): its
    # login says it may read down/{user}, and v1 events go there from then on
    listener = await new_user(bob.phone, proto=1)
    ev, qos = await first_v1_msg(server.mqtt_host, server.mqtt_port, listener, bob.user_id,
                                 lambda: da.send("for every device", chat=first.chat))
    assert (ev["body"], ev["from"], ev["chat"]) == ("for every device", alice.user_id, first.chat)
    assert qos == 1
