"""Handler tests: the messaging rules with an injected clock and fakes, no network."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import handover as handover_mod
from bridge.accounts import Accounts
from bridge.clock import ManualClock
from bridge.errors import BadRequest, NotFound, RateLimited, TooLarge, Unauthorized, Unavailable, UnknownType
from bridge.handling import Caller, DoneInPart, Result, storage_errors
from bridge.handover import ReceiptHandover
from bridge.media import Media
from bridge.messaging import COVERED_KEPT, Messenger
from bridge.metrics import Metrics
from bridge.outbox import Out, ToUser
from bridge.presence import PresenceTracker
from bridge.protocol import Ack, MsgEvent, Read, ReceiptEvent, Send, Watch, parse_request
from bridge.ratelimit import RateLimiter
from bridge.router import DeviceRouter
from bridge.tokens import TokenSigner
from bridge.wire import encode_v1, topic_of
from storage.base import ReceiptNote, StorageUnavailable
from storage.media_local import LocalMediaStore, SignatureError
from storage.sqlite import SqliteStore
from storage.state import MemoryState, is_mark
from tests.fakes import CapturingSms, FlakyStore, MemoryBlobs, until

SECRET = b"s" * 32


@dataclass
class World:
    clock: ManualClock
    store: FlakyStore
    accounts: Accounts
    messenger: Messenger
    presence: PresenceTracker
    media: Media
    blobs: MemoryBlobs
    router: DeviceRouter
    sms: CapturingSms

    async def user(self, phone: str) -> Caller:
        await self.accounts.request_code(phone)
        login = await self.accounts.verify(phone, self.sms.sent[-1][1], "t", "test")
        return Caller(login.user.user_id, login.device.device_id)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = ManualClock()
    inner = SqliteStore(tmp_path / "h.db")
    await inner.open()
    store = FlakyStore(inner)
    sms = CapturingSms()
    accounts = Accounts(store, clock, TokenSigner(SECRET), SECRET, sender=sms, code_ttl_s=300,  # type: ignore[arg-type]
                        max_attempts=3, lock_s=600, token_ttl_s=3600)
    presence = PresenceTracker(store, MemoryState(), clock)  # type: ignore[arg-type]
    messenger = Messenger(store, clock, presence, max_group=4)  # type: ignore[arg-type]
    blobs = MemoryBlobs()
    media = Media(store, blobs, clock, max_bytes=1000, url_ttl_s=60)  # type: ignore[arg-type]
    router = DeviceRouter(messenger, presence, media, RateLimiter(clock, 2, 3), Metrics(), 64 * 1024)
    try:
        yield World(clock, store, accounts, messenger, presence, media, blobs, router, sms)
    finally:
        await inner.close()


async def test_codes_expire_and_go_out_through_the_sender(world: World) -> None:
    await world.accounts.request_code("+15550000001")
    phone, code = world.sms.sent[-1]
    assert phone == "+15550000001" and len(code) == 6
    world.clock.advance(301)
    with pytest.raises(Unauthorized, match="expired"):
        await world.accounts.verify(phone, code, "d", "p")


async def test_lockout_lasts_its_period_then_lifts(world: World) -> None:
    await world.accounts.request_code("+15550000001")
    code = world.sms.sent[-1][1]
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await world.accounts.verify("+15550000001", wrong, "d", "p")
    with pytest.raises(RateLimited):
        await world.accounts.verify("+15550000001", wrong, "d", "p")
    with pytest.raises(RateLimited):
        await world.accounts.verify("+15550000001", code, "d", "p")  # even the right code
    world.clock.advance(601)
    with pytest.raises(Unauthorized, match="expired"):  # the code outlived neither the lock nor its ttl
        await world.accounts.verify("+15550000001", code, "d", "p")
    await world.accounts.request_code("+15550000001")
    login = await world.accounts.verify("+15550000001", world.sms.sent[-1][1], "d", "p")
    assert login.token


async def test_tokens_expire_and_forgeries_fail(world: World) -> None:
    caller = await world.user("+15550000001")
    token = TokenSigner(SECRET).issue(caller.user_id, caller.device_id, world.clock.now_ms() + 1000)
    assert await world.accounts.authenticate(token) == caller
    world.clock.advance(2)
    with pytest.raises(Unauthorized, match="expired"):
        await world.accounts.authenticate(token)
    other = TokenSigner(b"x" * 32).issue(caller.user_id, caller.device_id, world.clock.now_ms() + 10_000)
    with pytest.raises(Unauthorized):
        await world.accounts.authenticate(other)
    unlinked = TokenSigner(SECRET).issue(caller.user_id, "d-unknown", world.clock.now_ms() + 10_000)
    with pytest.raises(Unauthorized, match="not linked"):
        await world.accounts.authenticate(unlinked)


class _Broker:
    """A broker's device list that refuses to be told, until told it may."""

    def __init__(self) -> None:
        self.down = True
        self.removed: list[str] = []

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None:
        return None

    async def remove_device(self, device_id: str) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.removed.append(device_id)


async def test_an_unlink_the_broker_cannot_take_changes_nothing_and_may_be_tried_again(world: World) -> None:
    caller = await world.user("+15550000001")
    other = await world.accounts.verify("+15550000001", await world.accounts.request_code("+15550000001"), "d2", "p")
    broker = world.accounts.registry = _Broker()
    with pytest.raises(Unavailable):
        await world.accounts.unlink(caller, other.device.device_id)
    token = TokenSigner(SECRET).issue(caller.user_id, other.device.device_id, world.clock.now_ms() + 10_000)
    assert (await world.accounts.authenticate(token)).device_id == other.device.device_id  # still linked
    broker.down = False
    await world.accounts.unlink(caller, other.device.device_id)
    assert broker.removed == [other.device.device_id]
    with pytest.raises(Unauthorized, match="not linked"):
        await world.accounts.authenticate(token)


async def test_store_failure_means_unavailable_and_no_false_sent(world: World) -> None:
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    world.store.failing = {"append_message"}
    with pytest.raises(Unavailable):
        await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    world.store.failing = set()
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    assert sent.reply is not None and sent.reply["seq"] == 1


async def test_one_ack_over_many_chats_tells_every_sender_once(world: World) -> None:
    """An ack that covers more chats than are advanced at a time still reaches every sender,
    each with the last seq of its own chat, and acking it again tells nobody anything."""
    reader = await world.user("+15550000100")
    senders = [await world.user(f"+1555000{200 + i:04d}") for i in range(40)]
    for n, s in enumerate(senders):
        for k in range(1 + n % 3):
            await world.messenger.send(s, Send(id=f"m{k}", chat=None, to=reader.user_id, body="hi", media=None))
    head = await world.store.inbox_head(reader.user_id)
    told = (await world.messenger.ack(reader, Ack(up_to=head))).outs
    receipts = {topic_of(o.to): json.loads(encode_v1(o.event)) for o in told}
    assert len(told) == len(receipts) == 40
    for n, s in enumerate(senders):
        r = receipts[f"down/{s.user_id}"]
        assert (r["type"], r["kind"], r["user"], r["up_to"]) == ("receipt", "delivered", reader.user_id, 1 + n % 3)
    assert (await world.messenger.ack(reader, Ack(up_to=head))).outs == []


def lane_router(world: World) -> tuple[DeviceRouter, list[Out]]:
    """A router that runs acks on its lane, as the server's does, and what it published."""
    published: list[Out] = []

    async def publish(outs: list[Out]) -> None:
        published.extend(outs)

    router = DeviceRouter(world.messenger, world.presence, world.media, RateLimiter(world.clock, 100, 100),
                          Metrics(), 64 * 1024, publish=publish)
    return router, published


async def test_acks_run_apart_from_a_devices_other_requests_and_fold(world: World) -> None:
    """While an ack waits on the store, the same device's sync is answered; the acks that came in
    meanwhile are handled as one (the furthest), and what they cause is published."""
    router, published = lane_router(world)
    assert router.acks is not None
    reader, sender = await world.user("+15550000001"), await world.user("+15550000002")
    for k in range(3):
        await world.messenger.send(sender, Send(id=f"m{k}", chat=None, to=reader.user_id, body="hi", media=None))
    up = f"up/{reader.user_id}/{reader.device_id}"
    gate = world.store.held["advance_device_ack"] = asyncio.Event()
    assert await asyncio.wait_for(router.handle(up, b'{"type":"ack","up_to":1}'), 5) == []
    outs = await asyncio.wait_for(router.handle(up, b'{"type":"sync","id":"s1","after":0}'), 5)
    batch = json.loads(encode_v1(outs[-1].event))
    assert batch["type"] == "batch" and len(batch["items"]) == 3 and router.acks.busy() == 1
    for up_to in (2, 3):
        assert await router.handle(up, json.dumps({"type": "ack", "up_to": up_to}).encode()) == []
    gate.set()
    await router.acks.drain()
    told = [json.loads(encode_v1(o.event))["up_to"] for o in published if topic_of(o.to) == f"down/{sender.user_id}"]
    assert told == [1, 3] and router.acks.busy() == 0
    mine = [r for r in await world.store.get_receipts(batch["items"][0]["chat"]) if r.user_id == reader.user_id]
    assert [r.delivered for r in mine] == [3]


async def test_a_device_is_taken_offline_only_after_the_acks_it_sent_before(world: World) -> None:
    """A closing device acks what it has, then says offline. The ack runs apart; taken while it
    still waited on the store, the offline made the push decision count the events just
    acknowledged as unacknowledged and wake the device that had them (seen end to end on two
    bridges). When the user is known offline, the ack has been handled."""
    router, _ = lane_router(world)
    assert router.acks is not None
    reader, sender = await world.user("+15550000001"), await world.user("+15550000002")
    await world.messenger.send(sender, Send(id="m", chat=None, to=reader.user_id, body="hi", media=None))
    up = f"up/{reader.user_id}/{reader.device_id}"
    await router.handle(up, b'{"type":"presence","state":"online"}')
    acks_in_flight: list[int] = []
    world.presence.on_user_offline = lambda _user: acks_in_flight.append(router.acks.busy() if router.acks else -1)
    gate = world.store.held["advance_device_ack"] = asyncio.Event()
    await router.handle(up, b'{"type":"ack","up_to":1}')
    offline = asyncio.create_task(router.handle(up, b'{"type":"presence","state":"offline"}'))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.wait_for(offline, 5)
    assert acks_in_flight == [0]
    assert await world.store.advance_device_ack(reader.device_id, reader.user_id, 1) == (1, 1)  # (the ack landed)


async def test_an_ack_the_store_refuses_is_answered_with_unavailable(world: World) -> None:
    router, published = lane_router(world)
    assert router.acks is not None
    reader, sender = await world.user("+15550000001"), await world.user("+15550000002")
    await world.messenger.send(sender, Send(id="m", chat=None, to=reader.user_id, body="hi", media=None))
    world.store.failing = {"advance_device_ack"}
    await router.handle(f"up/{reader.user_id}/{reader.device_id}", b'{"type":"ack","up_to":1,"id":"a1"}')
    await router.acks.drain()
    [err] = [json.loads(encode_v1(o.event)) for o in published]
    assert (err["type"], err["code"], err["id"]) == ("error", "unavailable", "a1")
    assert topic_of(published[0].to) == f"down/{reader.user_id}/{reader.device_id}"


@pytest.mark.parametrize("lane", [True, False], ids=["on_its_lane", "in_line"])
async def test_an_ack_the_store_fails_in_one_chat_tells_what_it_moved_in_the_others(world: World, lane: bool) -> None:
    """The store failed an ack's move in one chat: the ack still waits for its other chats (no
    work of it goes on after its answer), and what those moved is told at once with the error;
    its retry then tells the rest, and nothing twice. Acks on the router's lane (as the server
    runs them) and handled in line alike."""
    router, published = lane_router(world) if lane else (world.router, [])
    reader, a, c = [await world.user(f"+1555000054{i}") for i in range(3)]
    to_a = await world.messenger.send(a, Send(id="m", chat=None, to=reader.user_id, body="hi", media=None))
    await world.messenger.send(c, Send(id="m", chat=None, to=reader.user_id, body="hi", media=None))
    failing_chat = to_a.reply.chat  # type: ignore[union-attr]
    world.store.failing_when["advance_receipt"] = lambda chat_id, *_: chat_id == failing_chat
    up = f"up/{reader.user_id}/{reader.device_id}"

    async def ack(payload: bytes) -> list[tuple[str, dict[str, Any]]]:
        published.extend(await router.handle(up, payload))
        if router.acks is not None:
            await router.acks.drain()
        got = [(topic_of(o.to), json.loads(encode_v1(o.event))) for o in published]
        published.clear()
        return got

    events = await ack(b'{"type":"ack","up_to":2,"id":"a1"}')
    assert world.store.calls["advance_receipt"] == 2  # (both tried, before the answer)
    assert [(t, e["type"], e.get("code")) for t, e in events] == [
        (f"down/{reader.user_id}/{reader.device_id}", "error", "unavailable"), (f"down/{c.user_id}", "receipt", None)]
    assert (events[1][1]["user"], events[1][1]["up_to"]) == (reader.user_id, 1)
    world.store.failing_when = {}
    assert [(t, e["up_to"]) for t, e in await ack(b'{"type":"ack","up_to":2}')] == [(f"down/{a.user_id}", 1)]


async def test_a_request_done_in_part_is_answered_as_its_failure_with_what_it_tells() -> None:
    told = [Out(ToUser("u1"), ReceiptEvent(inbox=3, chat="c1", user="u2", kind="delivered", up_to=2))]
    with pytest.raises(Unavailable) as caught:
        async with storage_errors():
            raise DoneInPart(StorageUnavailable("down"), told)
    assert caught.value.outs == told and isinstance(caught.value.__cause__, StorageUnavailable)
    bug = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug") as raised:  # (an internal fault stays as it is)
        async with storage_errors():
            raise DoneInPart(bug, told)
    assert raised.value is bug and not hasattr(bug, "outs")


async def test_two_devices_of_one_user_may_reuse_a_request_id(world: World) -> None:
    phone = await world.user("+15550000001")
    laptop = await world.user("+15550000001")  # a second login links a second device
    peer = await world.user("+15550000002")
    assert phone.user_id == laptop.user_id and phone.device_id != laptop.device_id
    first = await world.messenger.send(phone, Send(id="1", chat=None, to=peer.user_id, body="a", media=None))
    second = await world.messenger.send(laptop, Send(id="1", chat=None, to=peer.user_id, body="b", media=None))
    again = await world.messenger.send(laptop, Send(id="1", chat=None, to=peer.user_id, body="b", media=None))
    assert first.reply is not None and second.reply is not None and again.reply is not None
    assert (first.reply["seq"], second.reply["seq"], again.reply["seq"]) == (1, 2, 2)
    assert again.outs == []


async def test_router_answers_unavailable_without_leaking_internals(world: World) -> None:
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    world.store.failing = {"append_message"}
    outs = await world.router.handle(
        f"up/{a.user_id}/{a.device_id}", json.dumps({"type": "send", "id": "x1", "to": b.user_id, "body": "y"}).encode()
    )
    err = json.loads(encode_v1(outs[-1].event))
    assert err["code"] == "unavailable" and err["id"] == "x1" and "injected" not in err["message"]
    assert await world.router.handle("elsewhere/topic", b"{}") == []


async def test_rate_limit_refills_over_time(world: World) -> None:
    limiter = RateLimiter(world.clock, rate=2, burst=3)
    assert [limiter.take("d") for _ in range(3)] == [0, 0, 0]
    wait = limiter.take("d")
    assert 400 <= wait <= 500
    world.clock.advance(wait / 1000)
    assert limiter.take("d") == 0
    assert limiter.take("other") == 0  # buckets are per device


def test_rate_limiter_memory_is_bounded_and_forgets_refilled_buckets_first() -> None:
    from bridge.clock import ManualClock

    clock = ManualClock()
    limiter = RateLimiter(clock, rate=1, burst=2, max_buckets=10)
    for i in range(10):
        assert limiter.take(f"d{i}") == 0
    assert limiter.take("d0") == 0  # d0 is empty now
    clock.advance(1.0)  # the others are full again, d0 has one token
    assert limiter.take("d10") == 0
    assert len(limiter) == 2  # the full ones were forgotten, d0 was not
    assert limiter.take("d0") == 0
    assert limiter.take("d0") > 0  # a forgotten bucket would have allowed a burst of two


async def test_watch_expires_after_its_ttl(world: World) -> None:
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    await world.messenger.send(a, Send(id="m", chat=None, to=b.user_id, body="hi", media=None))
    outs = await world.presence.watch(a.user_id, a.device_id, Watch(id="w", users=(b.user_id,), ttl=10))
    assert json.loads(encode_v1(outs[0].event))["online"] is False
    assert len(await world.presence.device_online(b.user_id, b.device_id)) == 1
    world.clock.advance(11)
    assert await world.presence.device_offline(b.user_id, b.device_id) == []


async def test_group_notices_go_to_the_members_whose_messages_they_cover(world: World) -> None:
    """'Everyone else has it' is news only for the members who wrote something it covers."""
    owner, b, c = [await world.user(f"+1555000010{i}") for i in range(3)]
    chat, _ = await world.messenger.create_group(owner, "team", [b.user_id, c.user_id])  # seq 1, the owner's

    async def everyone_acks() -> dict[str, int]:
        told: dict[str, int] = {}
        for who in (owner, b, c):
            head = await world.store.inbox_head(who.user_id)
            for out in (await world.messenger.ack(who, Ack(up_to=head))).outs:
                ev = json.loads(encode_v1(out.event))
                if ev["type"] == "receipt" and ev["user"] == "*":
                    told[topic_of(out.to).removeprefix("down/")] = ev["up_to"]
        return told

    await world.messenger.send(b, Send(id="b1", chat=chat.chat_id, to=None, body="from b", media=None))  # seq 2
    # a member's own messages do not move its own position, so b stands at 1 for the owner
    assert await everyone_acks() == {owner.user_id: 1, b.user_id: 2}
    await world.messenger.send(c, Send(id="c1", chat=chat.chat_id, to=None, body="from c", media=None))  # seq 3
    assert await everyone_acks() == {c.user_id: 3}


async def test_a_member_reading_before_acking_moves_the_groups_delivered_notice_too(world: World) -> None:
    """Reading implies delivery: when the last member to have a message reads it before its
    device acks it, the sender is told everyone has it (delivered) as well as who read it; the
    ack that follows moves nothing and tells nothing."""
    owner, b, c = [await world.user(f"+1555000030{i}") for i in range(3)]
    chat, _ = await world.messenger.create_group(owner, "team", [b.user_id, c.user_id])
    sent = await world.messenger.send(owner, Send(id="o1", chat=chat.chat_id, to=None, body="hi", media=None))
    seq = sent.reply.seq  # type: ignore[union-attr]

    def notices(outs: Sequence[Out]) -> list[tuple[str, str, int]]:
        evs = [json.loads(encode_v1(o.event)) for o in outs]
        return [(e["kind"], e["user"], e["up_to"]) for e in evs if e["type"] == "receipt"]

    head_b = await world.store.inbox_head(b.user_id)
    assert notices((await world.messenger.ack(b, Ack(up_to=head_b))).outs) == []  # c has not got it yet
    world.store.calls.clear()
    assert notices((await world.messenger.read(c, Read(chat=chat.chat_id, up_to=seq))).outs) == [
        ("delivered", "*", seq)]  # (read * waits for b's read)
    assert world.store.calls["get_receipts"] == 1  # one read of the members' receipts for both kinds
    head_c = await world.store.inbox_head(c.user_id)
    assert (await world.messenger.ack(c, Ack(up_to=head_c))).outs == []


Notice = tuple[str, str, str, int]


def receipt_notices(outs: Sequence[Out]) -> list[Notice]:
    """(to, kind, whose, up_to) of the receipt notices among ``outs``."""
    evs = [(topic_of(o.to).removeprefix("down/"), json.loads(encode_v1(o.event))) for o in outs]
    return [(to, e["kind"], e["user"], e["up_to"]) for to, e in evs if e["type"] == "receipt"]


async def reads_to_tell(world: World, a: Caller, b: Caller, c: Caller) -> list[tuple[str, int, list[Notice]]]:
    """A message from ``a`` to ``b`` in their direct chat, and one in a group of the three that
    ``c`` has read: for each chat, what ``b`` reads up to and the notices that tells ``a``."""
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    direct = sent.reply.chat  # type: ignore[union-attr]
    group, _ = await world.messenger.create_group(a, "team", [b.user_id, c.user_id])
    in_group = await world.messenger.send(a, Send(id="g1", chat=group.chat_id, to=None, body="hi", media=None))
    seq = in_group.reply.seq  # type: ignore[union-attr]
    await world.messenger.read(c, Read(chat=group.chat_id, up_to=seq))
    return [(direct, 1, [(a.user_id, "read", b.user_id, 1)]),
            (group.chat_id, seq, [(a.user_id, "delivered", "*", seq), (a.user_id, "read", "*", seq)])]


async def test_a_read_whose_notice_the_store_failed_tells_it_when_tried_again(world: World) -> None:
    """The receipt moved, then appending the notice failed: the reader's device is answered
    unavailable and reads again. The receipt has moved already, yet the sender is told then,
    in a direct chat and in a group."""
    a, b, c = [await world.user(f"+1555000040{i}") for i in range(3)]
    for chat, up_to, told in await reads_to_tell(world, a, b, c):
        world.store.failing = {"append_receipts"}
        for _ in range(3):  # (the device tries again while the store still fails: told once all the same)
            with pytest.raises(Unavailable):
                await world.messenger.read(b, Read(chat=chat, up_to=up_to))
        world.store.failing = set()
        assert [r.read for r in await world.store.get_receipts(chat) if r.user_id == b.user_id] == [up_to]
        assert receipt_notices((await world.messenger.read(b, Read(chat=chat, up_to=up_to))).outs) == told
        assert (await world.messenger.read(b, Read(chat=chat, up_to=up_to))).outs == []  # (told once)


async def ack_failing(world: World, senders: Sequence[Caller], reader: Caller, seq: int, failing: str) -> int:
    """Each sender's message number ``seq`` to ``reader``, then the reader's ack of its inbox
    while the store fails ``failing``: the head it acked."""
    for sender in senders:
        await world.messenger.send(sender, Send(id=f"m{seq}", chat=None, to=reader.user_id, body="hi", media=None))
    head = await world.store.inbox_head(reader.user_id)
    world.store.failing = {failing}
    with pytest.raises(Unavailable):
        await world.messenger.ack(reader, Ack(up_to=head))
    world.store.failing = set()
    return head


async def test_an_ack_whose_receipts_the_store_failed_moves_them_when_tried_again(world: World) -> None:
    """The device's acknowledged position moved, then moving a chat's delivered receipt (or
    telling it) failed: the device is answered unavailable and acks again. Its position has
    moved already, yet the receipts move and the senders are told then."""
    a, b, reader = [await world.user(f"+1555000050{i}") for i in range(3)]
    for seq, failing in ((1, "advance_receipt"), (2, "append_receipts")):
        head = await ack_failing(world, (a, b), reader, seq, failing)
        told = sorted(receipt_notices((await world.messenger.ack(reader, Ack(up_to=head))).outs))
        assert told == sorted((s.user_id, "delivered", reader.user_id, seq) for s in (a, b))
        assert (await world.messenger.ack(reader, Ack(up_to=head))).outs == []


async def kept_position(tmp_path: Path, user: Caller) -> int:
    """The user's acknowledged position as a restarted bridge reads it back from the database."""
    again = SqliteStore(tmp_path / "h.db")
    await again.open()
    try:
        return (await again.inbox_positions(user.user_id))[0]
    finally:
        await again.close()


async def test_an_acks_position_is_kept_only_once_its_receipts_have_moved(world: World, tmp_path: Path) -> None:
    """The acknowledged position a restarted bridge reads back passes an ack only once the
    receipts it leads to have moved, by it or by the retry of one the store failed: a crash in
    between leaves the ack to the device's next one, which moves them then."""
    a, reader = [await world.user(f"+1555000051{i}") for i in range(2)]
    for k in range(2):
        await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=reader.user_id, body="hi", media=None))

    def read_back() -> Awaitable[int]:
        return kept_position(tmp_path, reader)

    gate = world.store.held["advance_receipt"] = asyncio.Event()
    acking = asyncio.ensure_future(world.messenger.ack(reader, Ack(up_to=1)))
    await until(lambda: world.store.calls["advance_receipt"] == 1)
    assert await world.store.inbox_positions(reader.user_id) == (1, 2)  # (moved, for every other ack)
    assert await read_back() == 0
    gate.set()
    assert receipt_notices((await asyncio.wait_for(acking, 5)).outs) == [(a.user_id, "delivered", reader.user_id, 1)]
    assert await read_back() == 1
    world.store.held = {}
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await world.messenger.ack(reader, Ack(up_to=2))
    world.store.failing = set()
    assert await world.store.inbox_positions(reader.user_id) == (2, 2)
    assert await read_back() == 1  # (kept where the receipts left to the retry start)
    assert world.store.calls["device_ack_done"] == 1
    assert receipt_notices((await world.messenger.ack(reader, Ack(up_to=2))).outs) == \
        [(a.user_id, "delivered", reader.user_id, 2)]  # (the retry, from what this process kept)
    assert await read_back() == 2
    assert world.store.calls["device_ack_done"] == 2


async def test_an_ack_the_store_failed_is_finished_after_a_crash_by_the_devices_next_ack(
        world: World, tmp_path: Path) -> None:
    """One bridge, and no record of it anywhere but in the process: the store failed an ack
    after its position moved, and the process died before the retry. The restarted bridge reads
    the position back from before that ack, so the device's next ack (its cursor, sent again on
    the new connection) moves the receipts and tells the senders, in a direct chat and a group."""
    a, b, reader = [await world.user(f"+1555000052{i}") for i in range(3)]
    await world.messenger.send(a, Send(id="d", chat=None, to=reader.user_id, body="hi", media=None))
    group = (await world.messenger.create_group(a, "g", [b.user_id, reader.user_id]))[0].chat_id
    await world.messenger.send(b, Send(id="g", chat=group, to=None, body="hi", media=None))
    await world.messenger.ack(a, Ack(up_to=3))  # (then the group's notice waits for the reader alone)
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await world.messenger.ack(reader, Ack(up_to=3))
    await until(lambda: world.store.calls["advance_receipt"] == 3)  # (both chats' moves failed)
    world.store.failing = set()
    assert await world.store.inbox_positions(reader.user_id) == (3, 3)  # (moved, in the process)

    restarted = SqliteStore(tmp_path / "h.db")  # (the process died: what it kept in memory is gone)
    await restarted.open()
    try:
        messenger = Messenger(restarted, world.clock, world.presence, max_group=4)
        assert (await restarted.inbox_positions(reader.user_id))[0] == 0
        told = receipt_notices((await messenger.ack(reader, Ack(up_to=3))).outs)
        assert sorted(told) == sorted([(a.user_id, "delivered", reader.user_id, 1), (b.user_id, "delivered", "*", 2)])
        assert (await restarted.inbox_positions(reader.user_id))[0] == 3
    finally:
        await restarted.close()


async def test_an_ack_failed_twice_holds_the_kept_position_until_its_retry_whatever_other_devices_ack(
        world: World, tmp_path: Path) -> None:
    """An ack the store failed, whose retry failed too (acking further), keeps the position
    where its receipts start while the user's other device acks past it; the retry that
    finishes lets the position be kept past it."""
    a, reader, c = [await world.user(f"+1555000053{i}") for i in range(3)]
    other = await world.user("+15550000531")  # (the reader's second device)
    assert other.user_id == reader.user_id and other.device_id != reader.device_id
    for k in range(3):  # (the reader's inbox: a's three messages, then c's)
        await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=reader.user_id, body="hi", media=None))
    await world.messenger.send(c, Send(id="m", chat=None, to=reader.user_id, body="hi", media=None))

    def read_back() -> Awaitable[int]:
        return kept_position(tmp_path, reader)

    await world.messenger.ack(reader, Ack(up_to=1))
    world.store.failing = {"advance_receipt"}
    for up_to in (2, 3):  # (the second, a retry acking further, fails too)
        with pytest.raises(Unavailable):
            await world.messenger.ack(reader, Ack(up_to=up_to))
    world.store.failing = set()
    assert await read_back() == 1
    assert receipt_notices((await world.messenger.ack(other, Ack(up_to=4))).outs) == \
        [(c.user_id, "delivered", reader.user_id, 1)]  # (from 3: c's chat alone)
    assert await read_back() == 1
    # (the device's next ack, whatever it names, is the retry: it moves from 1 to where the user is)
    assert receipt_notices((await world.messenger.ack(reader, Ack(up_to=1))).outs) == \
        [(a.user_id, "delivered", reader.user_id, 3)]
    assert await read_back() == 4


async def records(state: MemoryState, part: int = 3, *, marks: bool = False) -> dict[str, str]:
    """A partition's records: the writers' own (scope ``ks~``) and those written as before (``ks``);
    with ``marks``, only what forgotten ones left (their times), else only the others."""
    found = {**await state.unfinished("ks", part), **await state.unfinished("ks~", part)}
    return {field: value for field, value in found.items() if is_mark(value) == marks}


def other_bridge(world: World, state: MemoryState, *in_3: Caller
                 ) -> tuple[Messenger, ReceiptHandover, ReceiptHandover]:
    """A second bridge's Messenger on the same store, and the handovers of both through
    ``state``: the users ``in_3`` are in partition 3, the others in 4."""
    mine = {c.user_id for c in in_3}
    parts = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 3 if user in mine else 4)
    ticks = [time.time()]

    def clock() -> float:  # (a millisecond later at each reading: every record's value differs)
        ticks[0] += 0.001
        return ticks[0]

    here = ReceiptHandover(state, parts, world.messenger, clock=clock)  # type: ignore[arg-type]
    there_messenger = Messenger(world.store, world.clock, world.presence, max_group=4)  # type: ignore[arg-type]
    return there_messenger, here, ReceiptHandover(state, parts, there_messenger, clock=clock)  # type: ignore[arg-type]


async def test_a_read_whose_notice_the_store_failed_is_told_by_the_partitions_next_holder(world: World) -> None:
    """The receipt moved, appending its notice failed, and the reader's partition moved to
    another bridge before the device read again: that bridge adopts what the first recorded,
    and the sender is told on the retry there (once), in a direct chat and in a group."""
    a, b, c = [await world.user(f"+1555000070{i}") for i in range(3)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, b)
    for chat, up_to, told in await reads_to_tell(world, a, b, c):
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=chat, up_to=up_to))
        world.store.failing = set()
        assert len(await records(state)) == 1  # recorded before the device was answered
        await theirs.adopt(4)  # another partition's: nothing
        assert (await there.read(b, Read(chat=chat, up_to=up_to))).outs == []
        await theirs.adopt(3)
        assert receipt_notices((await there.read(b, Read(chat=chat, up_to=up_to))).outs) == told
        assert await records(state) == {}  # finished: forgotten there too
        assert (await there.read(b, Read(chat=chat, up_to=up_to))).outs == []


async def test_two_bridges_failing_one_receipt_keep_a_record_each_and_each_retry_forgets_its_own(
        world: World) -> None:
    """Two bridges failed the same member's read receipt of a chat, one after the other (the
    second one whose lease was ending): each records what it had left to tell, side by side.
    Each one's retry forgets its own record only; a bridge that adopts the partition takes both
    on, tells them, and forgets both."""
    a, b, c = [await world.user(f"+1555000075{i}") for i in range(3)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, b)
    direct = (await reads_to_tell(world, a, b, c))[0][0]
    for round_ in range(2):
        for k in range(2):
            await world.messenger.send(a, Send(id=f"m{round_}{k}", chat=direct, to=None, body="hi", media=None))
        last = (await world.store.get_chat(direct)).last_seq  # type: ignore[union-attr]
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=direct, up_to=last - 1))
        mine = await records(state)
        with pytest.raises(Unavailable):  # (another device of b's)
            await there.read(b, Read(chat=direct, up_to=last))
        world.store.failing = set()
        both = await records(state)
        theirs = {k: v for k, v in both.items() if k not in mine}
        assert len(mine) == len(theirs) == 1 and recorded_up_to(both) == [last - 1, last]
        # (none where bridges from before wrote theirs: those would drop a field they do not understand)
        assert await state.unfinished("ks", 3) == {}
        told = [(a.user_id, "read", b.user_id, last)]  # (as the receipt stands)
        if round_ == 0:
            assert receipt_notices((await world.messenger.read(b, Read(chat=direct, up_to=last - 1))).outs) == told
            assert await records(state) == theirs
            assert receipt_notices((await there.read(b, Read(chat=direct, up_to=last))).outs) == told  # (again)
        else:  # both bridges gone: the next holder
            assert receipt_notices(await next_holder_reads(world, state, here, b, direct, last)) == told
        assert await records(state) == {}


async def test_a_record_adopted_while_a_retry_tells_what_it_held_is_not_forgotten_by_that_retry(
        world: World) -> None:
    """A retry took on what this bridge held for a member's receipt, and while it was appending
    the notices another bridge's record of the same receipt was adopted here: the retry forgets
    only the record it took on, and the adopted one is told at the member's next read. A retry
    that fails there keeps (and records) what was adopted as well as what it held."""
    a, b, c = [await world.user(f"+1555000076{i}") for i in range(3)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, b)
    direct = (await reads_to_tell(world, a, b, c))[0][0]
    for retry_fails in (False, True):
        for k in range(2):
            await world.messenger.send(a, Send(id=f"m{retry_fails}{k}", chat=direct, to=None, body="hi", media=None))
        last = (await world.store.get_chat(direct)).last_seq  # type: ignore[union-attr]
        retry, gate, theirs = await retry_held_while_another_bridge_fails(world, state, there, b, direct, last)
        await here.adopt(3)
        if retry_fails:  # (it keeps what it adopted meanwhile as well as what it held)
            world.store.failing = {"append_receipts"}
        gate.set()
        if retry_fails:
            with pytest.raises(Unavailable):
                await asyncio.wait_for(retry, 5)
            world.store.failing = set()
            now = await records(state)
            assert {k: v for k, v in now.items() if k in theirs} == theirs
            assert recorded_up_to({k: v for k, v in now.items() if k not in theirs}) == [last]
        else:
            await asyncio.wait_for(retry, 5)
            assert await records(state) == theirs
        assert receipt_notices((await world.messenger.read(b, Read(chat=direct, up_to=last))).outs) == [
            (a.user_id, "read", b.user_id, last)]
        assert await records(state) == {}


async def test_a_record_whose_rewrite_failed_is_forgotten_all_the_same(world: World) -> None:
    """A read failed and was recorded; its retry failed again and so did the write of its new
    record (the first stays in the shared state): the retry that finishes forgets the first."""
    a, b = [await world.user(f"+1555000077{i}") for i in range(2)]
    state = MemoryState()
    other_bridge(world, state, b)
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    chat = sent.reply.chat  # type: ignore[union-attr]
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=1))
    first = await records(state)
    put = state.put_unfinished

    async def failing(*_: object) -> None:
        raise ConnectionError("redis is gone")

    state.put_unfinished = failing  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=1))
    state.put_unfinished = put  # type: ignore[method-assign]
    world.store.failing = set()
    assert await records(state) == first
    assert receipt_notices((await world.messenger.read(b, Read(chat=chat, up_to=1))).outs) == [
        (a.user_id, "read", b.user_id, 1)]
    assert await records(state) == {}


async def test_an_acks_retry_forgets_only_the_record_it_finished_not_one_another_bridge_wrote_since(
        world: World) -> None:
    """A device's ack failed part way on this bridge, then (after another message) on a bridge
    whose lease was ending: the retry here moves every receipt and forgets its own record only;
    the other's stays until its retry, which forgets it."""
    a, reader = [await world.user(f"+1555000078{i}") for i in range(2)]
    state = MemoryState()
    there, _, _ = other_bridge(world, state, reader)
    heads = []
    for k, on in enumerate((world.messenger, there)):
        await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=reader.user_id, body="hi", media=None))
        heads.append(await world.store.inbox_head(reader.user_id))
        world.store.failing = {"advance_receipt"}
        with pytest.raises(Unavailable):
            await on.ack(reader, Ack(up_to=heads[-1]))
        world.store.failing = set()
        if k == 0:
            mine = await records(state)
    theirs = {k: v for k, v in (await records(state)).items() if k not in mine}
    assert len(mine) == len(theirs) == 1
    assert receipt_notices((await world.messenger.ack(reader, Ack(up_to=heads[-1]))).outs) == [
        (a.user_id, "delivered", reader.user_id, 2)]
    assert await records(state) == theirs
    assert (await there.ack(reader, Ack(up_to=heads[-1]))).outs == []  # (moved already)
    assert await records(state) == {}


async def test_a_retry_does_not_forget_its_bridges_record_written_again_meanwhile(world: World) -> None:
    """While a retry tells what this bridge held for a member's receipt, another device of the
    member reads further and fails, here too: the bridge's record (its one field) is written
    again with that read's notices. The retry forgets only the value it took on, so the new
    one stays, and the member's next read tells it and forgets it."""
    a, b, c = [await world.user(f"+1555000079{i}") for i in range(3)]
    state = MemoryState()
    other_bridge(world, state, b)
    direct = (await reads_to_tell(world, a, b, c))[0][0]
    await world.messenger.send(a, Send(id="m2", chat=direct, to=None, body="again", media=None))
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=direct, up_to=1))
    world.store.failing = set()
    gate, retry = await read_retry_held_while_the_next_fails(world, world.messenger, b, direct, 1)
    again = await records(state)
    assert recorded_up_to(again) == [2]
    gate.set()
    await asyncio.wait_for(retry, 5)
    assert await records(state) == again
    assert receipt_notices((await world.messenger.read(b, Read(chat=direct, up_to=2))).outs) == [
        (a.user_id, "read", b.user_id, 2)]
    assert await records(state) == {}


async def test_a_record_written_as_bridges_wrote_them_before_is_adopted_told_and_forgotten(world: World) -> None:
    """A record a bridge from before each process had its own field wrote (the name alone, in
    the partition's records as they were): the next holder adopts it, the retry tells it and
    forgets it there."""
    a, b = [await world.user(f"+1555000084{i}") for i in range(2)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, b)
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    chat = sent.reply.chat  # type: ignore[union-attr]
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=1))
    world.store.failing = set()
    [(field, value)] = (await state.unfinished("ks~", 3)).items()
    await state.drop_unfinished("ks~", 3, {field: value})
    await state.put_unfinished("ks", 3, {field.rpartition("~")[0]: value})  # (as written before)
    await theirs.adopt(3)
    assert receipt_notices((await there.read(b, Read(chat=chat, up_to=1))).outs) == [(a.user_id, "read", b.user_id, 1)]
    assert await records(state) == {}


async def test_an_acks_record_adopted_by_the_bridge_that_wrote_its_own_is_forgotten_with_it(world: World) -> None:
    """A device's ack failed part way here, then on another bridge (whose lease was ending);
    this bridge adopted that record beside its own. Its retry finishes both, and forgets both;
    so does one after this bridge's rewrite of its record failed."""
    a, reader = [await world.user(f"+1555000085{i}") for i in range(2)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, reader)
    put = state.put_unfinished

    async def failing(*_: object) -> None:
        raise ConnectionError("redis is gone")

    for k in range(2):
        for on in (world.messenger, there):
            await world.messenger.send(a, Send(id=f"m{k}{on is there}", chat=None, to=reader.user_id, body="hi",
                                               media=None))
            world.store.failing = {"advance_receipt"}
            with pytest.raises(Unavailable):
                await on.ack(reader, Ack(up_to=await world.store.inbox_head(reader.user_id)))
        await here.adopt(3)
        if k == 1:  # (and the retry fails again, its record's rewrite too)
            state.put_unfinished = failing  # type: ignore[method-assign]
            with pytest.raises(Unavailable):
                await world.messenger.ack(reader, Ack(up_to=await world.store.inbox_head(reader.user_id)))
            state.put_unfinished = put  # type: ignore[method-assign]
        world.store.failing = set()
        assert len(await records(state)) == 2
        told = receipt_notices((await world.messenger.ack(reader, Ack(up_to=await world.store.inbox_head(
            reader.user_id)))).outs)
        assert told == [(a.user_id, "delivered", reader.user_id, 2 * k + 2)]
        assert await records(state) == {}


async def test_an_acks_retry_that_fails_again_keeps_what_was_adopted_meanwhile_and_forgets_it_later(
        world: World) -> None:
    """A device's ack failed part way here; while its retry moved receipts, the device's next
    ack failed on another bridge (whose lease was ending) and this bridge adopted that record;
    then the retry failed too. The next retry moves everything both left and forgets both
    bridges' records."""
    a, reader = [await world.user(f"+1555000081{i}") for i in range(2)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, reader)
    head, gate, retry = await ack_retry_held(world, a, reader)
    await world.messenger.send(a, Send(id="m2", chat=None, to=reader.user_id, body="hi", media=None))
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await there.ack(reader, Ack(up_to=await world.store.inbox_head(reader.user_id)))
    await here.adopt(3)
    gate.set()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(retry, 5)
    world.store.failing = set()
    assert len(await records(state)) == 2  # (this bridge's, and the other's it adopted)
    told = receipt_notices((await world.messenger.ack(reader, Ack(up_to=head))).outs)
    assert told == [(a.user_id, "delivered", reader.user_id, 2)]
    assert await records(state) == {}


async def test_an_ack_that_fails_after_adopting_an_earlier_failed_range_keeps_the_lowest_position(
        world: World) -> None:
    """A device's ack failed part way on a bridge whose lease was ending; its next ack, here,
    was moving receipts when this bridge adopted that record, and failed. The retry moves the
    receipts of both ranges, the earlier one's included."""
    a1, a2, reader = [await world.user(f"+1555000082{i}") for i in range(3)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, reader)
    await world.messenger.send(a1, Send(id="m1", chat=None, to=reader.user_id, body="hi", media=None))
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await there.ack(reader, Ack(up_to=await world.store.inbox_head(reader.user_id)))
    world.store.failing = set()
    await world.messenger.send(a2, Send(id="m2", chat=None, to=reader.user_id, body="hi", media=None))
    head = await world.store.inbox_head(reader.user_id)
    gate = world.store.held["advance_receipt"] = asyncio.Event()
    first = asyncio.create_task(world.messenger.ack(reader, Ack(up_to=head)))
    await until(lambda: world.store.calls["advance_receipt"] == 2)
    del world.store.held["advance_receipt"]
    await here.adopt(3)
    world.store.failing = {"advance_receipt"}
    gate.set()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(first, 5)
    world.store.failing = set()
    told = sorted(receipt_notices((await world.messenger.ack(reader, Ack(up_to=head))).outs))
    assert told == sorted([(a1.user_id, "delivered", reader.user_id, 1), (a2.user_id, "delivered", reader.user_id, 1)])
    assert await records(state) == {}


async def test_a_record_adopted_before_many_failed_retries_is_still_forgotten_by_the_one_that_finishes(
        world: World) -> None:
    """Another bridge's record of a member's receipt was adopted here, then the store failed
    the member's retries here again and again (each writes this bridge's record anew): the
    retry that finishes forgets the adopted record as well as this bridge's."""
    a, b, c = [await world.user(f"+1555000083{i}") for i in range(3)]
    state = MemoryState()
    there, here, _ = other_bridge(world, state, b)
    direct = (await reads_to_tell(world, a, b, c))[0][0]
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await there.read(b, Read(chat=direct, up_to=1))
    await here.adopt(3)
    for _ in range(COVERED_KEPT + 2):
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=direct, up_to=1))
    world.store.failing = set()
    assert len(await records(state)) == 2
    assert receipt_notices((await world.messenger.read(b, Read(chat=direct, up_to=1))).outs) == [
        (a.user_id, "read", b.user_id, 1)]
    assert await records(state) == {}


async def test_a_read_failing_while_a_retry_tells_what_it_held_records_that_too(world: World) -> None:
    """While a retry tells what this bridge held for a member's group receipt (here a notice to
    one member the next read does not tell), another read of the member's fails here and writes
    this bridge's record again: the record holds the retry's notice as well as its own, so a
    bridge that died before the retry ended would lose neither. The retry tells its notice and
    the failed read's retry its own, each once."""
    a, b, e = [await world.user(f"+1555000086{i}") for i in range(3)]
    state = MemoryState()
    _, here, _ = other_bridge(world, state, b)
    group, _ = await world.messenger.create_group(a, "team", [b.user_id, e.user_id])
    gid = group.chat_id
    await world.messenger.send(a, Send(id="g1", chat=gid, to=None, body="hi", media=None))
    await world.messenger.send(e, Send(id="g2", chat=gid, to=None, body="hi", media=None))
    for reader in (a, e):
        await world.messenger.read(reader, Read(chat=gid, up_to=2))
    await world.messenger.read(b, Read(chat=gid, up_to=1))
    # (as if this bridge had recorded a notice to e, and adopted it back)
    own = "n" + json.dumps([gid, b.user_id, "read"], separators=(",", ":")) + "~" + here._writer  # noqa: SLF001
    await state.put_unfinished("ks~", 3, {own: f"{int(time.time() * 1000) - 1000} "  # (made before the next)
                                          + json.dumps([[e.user_id, gid, "*", "read", 1]])})
    await here.adopt(3)
    gate, retry = await read_retry_held_while_the_next_fails(world, world.messenger, b, gid, 1)
    again = await records(state)
    assert list(again) == [own]
    assert sorted((n[0], n[3], n[4]) for n in json.loads(again[own].partition(" ")[2])) == sorted(
        [(a.user_id, "delivered", 2), (a.user_id, "read", 2), (e.user_id, "read", 1)])
    gate.set()
    assert receipt_notices((await asyncio.wait_for(retry, 5)).outs) == [(e.user_id, "read", "*", 1)]
    assert await records(state) == again
    told = receipt_notices((await world.messenger.read(b, Read(chat=gid, up_to=2))).outs)
    assert sorted(told) == [(a.user_id, "delivered", "*", 2), (a.user_id, "read", "*", 2)]
    assert await records(state) == {}
    assert not world.messenger._telling and not world.messenger._acking  # noqa: SLF001


async def test_an_ack_failing_while_a_retry_of_the_devices_ack_moves_receipts_records_its_range_too(
        world: World) -> None:
    """While a retry of a device's ack moves the receipts its failed attempt left, the device's
    next ack fails here: its record starts where the retry's range does, so a bridge that died
    before the retry ended would leave the next holder both ranges to move."""
    a1, a2, reader = [await world.user(f"+1555000087{i}") for i in range(3)]
    state = MemoryState()
    other_bridge(world, state, reader)
    _, gate, retry = await ack_retry_held(world, a1, reader)
    await world.messenger.send(a2, Send(id="m2", chat=None, to=reader.user_id, body="hi", media=None))
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await world.messenger.ack(reader, Ack(up_to=await world.store.inbox_head(reader.user_id)))
    world.store.failing = set()
    assert [v.partition(" ")[2] for v in (await records(state)).values()] == ["0"]
    gate.set()
    await asyncio.wait_for(retry, 5)
    told = sorted(receipt_notices((await world.messenger.ack(reader, Ack(up_to=await world.store.inbox_head(
        reader.user_id)))).outs))
    assert told == [(a2.user_id, "delivered", reader.user_id, 1)]  # (a1's was told by the retry)
    assert await records(state) == {}
    assert not world.messenger._telling and not world.messenger._acking  # noqa: SLF001


async def ack_retry_held(world: World, sender: Caller, reader: Caller
                         ) -> tuple[int, asyncio.Event, asyncio.Task[Result]]:
    """A message from ``sender`` to ``reader``, the reader's ack of it failing part way here,
    and its retry held in moving the receipts: the head acked, the gate, and the retry."""
    await world.messenger.send(sender, Send(id="m1", chat=None, to=reader.user_id, body="hi", media=None))
    head = await world.store.inbox_head(reader.user_id)
    world.store.failing = {"advance_receipt"}
    with pytest.raises(Unavailable):
        await world.messenger.ack(reader, Ack(up_to=head))
    world.store.failing = set()
    gate = world.store.held["advance_receipt"] = asyncio.Event()
    calls = world.store.calls["advance_receipt"]
    retry = asyncio.create_task(world.messenger.ack(reader, Ack(up_to=head)))
    await until(lambda: world.store.calls["advance_receipt"] > calls)
    del world.store.held["advance_receipt"]
    return head, gate, retry


def recorded_up_to(recorded: dict[str, str]) -> list[int]:
    """The positions the notices of the records tell."""
    return sorted(n[4] for stored in recorded.values() for n in json.loads(stored.partition(" ")[2]))


async def retry_held_while_another_bridge_fails(world: World, state: MemoryState, there: Messenger, b: Caller,
                                                chat: str, last: int
                                                ) -> tuple[asyncio.Task[Any], asyncio.Event, dict[str, str]]:
    """``b``'s read of its direct chat's message ``last - 1`` fails here; its retry is held in
    appending the notices, and meanwhile ``b``'s read of ``last`` fails on the other bridge.
    The retry, its gate, and the record the other bridge wrote."""
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=last - 1))
    world.store.failing = set()
    mine = await records(state)
    gate, retry = await read_retry_held_while_the_next_fails(world, there, b, chat, last - 1)
    return retry, gate, {k: v for k, v in (await records(state)).items() if k not in mine}


async def read_retry_held_while_the_next_fails(world: World, on: Messenger, b: Caller, chat: str, up_to: int
                                               ) -> tuple[asyncio.Event, asyncio.Task[Result]]:
    """``b``'s retry (here) of a read of ``chat`` up to ``up_to`` held in appending the notices
    it took on, while ``b``'s read one further fails ``on`` a bridge: the gate and the retry."""
    gate = world.store.held["append_receipts"] = asyncio.Event()
    calls = world.store.calls["append_receipts"]
    retry = asyncio.create_task(world.messenger.read(b, Read(chat=chat, up_to=up_to)))
    await until(lambda: world.store.calls["append_receipts"] > calls)  # (it waits there with what it took on)
    del world.store.held["append_receipts"]
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await on.read(b, Read(chat=chat, up_to=up_to + 1))
    world.store.failing = set()
    return gate, retry


async def test_an_ack_whose_receipts_the_store_failed_is_finished_by_the_partitions_next_holder(
        world: World) -> None:
    """The device's acknowledged position moved, then moving a chat's delivered receipt (or
    telling it) failed, and the partition moved before the device acked again: the next holder
    moves the receipts and tells the senders then."""
    a, b, reader = [await world.user(f"+1555000080{i}") for i in range(3)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, reader)
    for seq, failing in ((1, "advance_receipt"), (2, "append_receipts")):
        head = await ack_failing(world, (a, b), reader, seq, failing)
        assert await records(state) != {}
        await theirs.adopt(4)
        if seq == 1:  # (nothing adopted: the position moved already, the receipts do not)
            assert (await there.ack(reader, Ack(up_to=head))).outs == []
        await theirs.adopt(3)
        told = sorted(receipt_notices((await there.ack(reader, Ack(up_to=head))).outs))
        assert told == sorted((s.user_id, "delivered", reader.user_id, seq) for s in (a, b))
        assert await records(state) == {}
        assert (await there.ack(reader, Ack(up_to=head))).outs == []


async def test_a_record_for_a_partition_another_bridge_holds_is_adopted_there_before_the_answer(
        world: World) -> None:
    """The reader's partition is held by another bridge (this bridge's lease ended while it
    handled the read: given back, or run out during a pause): once the record is written, its holder is
    asked to read the partition's records again, before the read is answered unavailable, and
    the retry there tells the notice. Nothing is asked while this bridge's lease on the
    partition stands (held, or being given back: the next holder reads the records once it has
    taken it); a holder that refuses leaves the record for the partition's next holder."""
    a, b = [await world.user(f"+1555000095{i}") for i in range(2)]
    state = MemoryState()
    held_here: list[int] = []
    giving_back: list[int] = []  # (leased here, not held: being given back)

    def parts(held: Callable[[], list[int]], leased: Callable[[int], bool]) -> Any:
        return SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 3 if user == b.user_id else 4,
                               held_partitions=held, leased_here=leased)

    there = Messenger(world.store, world.clock, world.presence, max_group=4)  # type: ignore[arg-type]
    theirs = ReceiptHandover(state, parts(lambda: [3, 4], lambda part: True), there)
    asked: list[tuple[int, dict[str, object]]] = []
    answer: dict[str, object] | None = None

    async def ask_holder(part: int, request: dict[str, object], _timeout: float) -> dict[str, object]:
        asked.append((part, request))
        return answer if answer is not None else await theirs.serve_adopt(request)

    here = ReceiptHandover(state, parts(lambda: held_here, lambda part: part in held_here + giving_back),
                           world.messenger, ask_holder=ask_holder)
    await theirs.adopt(3)  # (it took the partition long before: nothing was recorded then)

    async def read_failing(k: int) -> tuple[str, int]:
        sent = await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=b.user_id, body="hi", media=None))
        chat, seq = sent.reply.chat, sent.reply.seq  # type: ignore[union-attr]
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=chat, up_to=seq))
        world.store.failing = set()
        return chat, seq

    chat, seq = await read_failing(1)
    assert asked == [(3, {"kind": "adopt_unfinished", "part": 3})]
    told = receipt_notices((await there.read(b, Read(chat=chat, up_to=seq))).outs)
    assert told == [(a.user_id, "read", b.user_id, seq)]
    assert await records(state) == {}
    answer = {"error": "partition 3 is not held here"}
    await read_failing(2)
    assert len(asked) == 2 and len(await records(state)) == 1  # (there for the next holder)
    await here.close()  # (it would ask again later)
    giving_back.append(3)
    await read_failing(3)
    held_here.append(3)
    await read_failing(4)
    assert len(asked) == 2
    for request in ({"part": 5}, {"part": "3"}, {"part": True}, {}, {"part": "x" * 10_000}):
        refused = await theirs.serve_adopt(request)
        assert "error" in refused and len(str(refused)) < 300


async def test_an_ask_that_failed_is_made_again_until_a_holder_answers(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder could not be asked (Redis failing, a holder too slow or refusing): the bridge
    asks again in the background, one ask at a time per partition, until an ask made after the
    last failed one is answered, or it takes the partition itself (its records are read then),
    or it stops."""
    import bridge.handover

    monkeypatch.setattr(bridge.handover, "ASK_AGAIN_S", (0.5, 0.05, 0.05, 0.05))
    a, b = [await world.user(f"+1555000097{i}") for i in range(2)]
    state, leased = MemoryState(), []
    parts = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 3, held_partitions=lambda: [],
                            leased_here=lambda part: part in leased)
    # per ask, in turn: None fails it, an Event holds it until set (then it is answered)
    answers: list[dict[str, object] | asyncio.Event | None] = []
    asked: list[int] = []

    async def ask_holder(part: int, request: dict[str, object], _timeout: float) -> dict[str, object]:
        asked.append(part)
        answer = answers.pop(0) if answers else None
        if isinstance(answer, asyncio.Event):
            await answer.wait()
            return {"ok": True}
        if answer is None:
            raise ConnectionError("redis is gone")
        return answer

    here = ReceiptHandover(state, parts, world.messenger, ask_holder=ask_holder)  # type: ignore[arg-type]

    async def read_failing(k: int) -> None:
        sent = await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=b.user_id, body="hi", media=None))
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=sent.reply.chat, up_to=sent.reply.seq))  # type: ignore[union-attr]
        world.store.failing = set()

    def idle() -> bool:
        return not here._asking_again  # noqa: SLF001

    answers[:] = [None, None, {"error": "partition 3 is not held here"}, {"ok": True}]
    await read_failing(1)
    await read_failing(2)  # (failed while the first is asked again: the same task covers it)
    await until(idle)
    assert len(asked) == 4  # (each read's ask, then asked again until one is answered)
    held = asyncio.Event()
    answers[:] = [None, held, None, {"ok": True}]
    await read_failing(3)
    await until(lambda: len(asked) == 6)  # asked again, and that ask is at the holder
    await read_failing(4)  # recorded after that ask reached the holder, and its own ask fails
    held.set()
    await until(idle)
    assert len(asked) == 8  # (asked once more, for the fourth read's record)
    answers[:] = []
    await read_failing(5)
    leased.append(3)  # taken here meanwhile: nothing more to ask
    await until(idle)
    assert len(asked) == 9
    leased.clear()
    await read_failing(6)
    await here.close()
    assert idle() and len(asked) == 10
    await read_failing(7)  # (after it stopped: asked once, within the request, not again)
    await asyncio.sleep(0.6)
    assert idle() and len(asked) == 11


async def test_the_holder_is_asked_over_redis_as_bridges_ask_each_other(world: World) -> None:
    """The same over the bridges' own channel, on the real Redis: the holder serves its
    partition's queue, and the bridge that failed the read asks it there before answering."""
    import secrets

    from bridge.handover import ADOPT
    from storage.state_redis import RedisState
    from tests.conftest import production_url

    url = production_url("PIGEON_REDIS", "redis://")
    a, b = [await world.user(f"+1555000096{i}") for i in range(2)]
    scope = f"ks{secrets.token_hex(4)}"
    mine, holders = RedisState(url, peer_host=None), RedisState(url, peer_host=None)
    await mine.open()
    await holders.open()

    def parts(held: list[int]) -> Any:
        return SimpleNamespace(partition_scope=scope, partition_of_user=lambda user: 3,
                               held_partitions=lambda: held, leased_here=lambda part: part in held)

    there = Messenger(world.store, world.clock, world.presence, max_group=4)  # type: ignore[arg-type]
    theirs = ReceiptHandover(holders, parts([3]), there)
    holders.handle(ADOPT, theirs.serve_adopt)
    serving = asyncio.create_task(holders.serve(lambda: [f"{scope}:p3"]))

    async def ask_holder(part: int, request: dict[str, object], timeout: float) -> dict[str, object]:
        return await mine.call(f"{scope}:p{part}", request, timeout)

    ReceiptHandover(mine, parts([]), world.messenger, ask_holder=ask_holder)
    try:
        sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
        chat, seq = sent.reply.chat, sent.reply.seq  # type: ignore[union-attr]
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=chat, up_to=seq))
        world.store.failing = set()
        told = receipt_notices((await there.read(b, Read(chat=chat, up_to=seq))).outs)
        assert told == [(a.user_id, "read", b.user_id, seq)]
        assert await mine.unfinished(scope, 3) == {}
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await mine.close()
        await holders.close()


async def test_a_holder_asked_again_and_again_reads_a_partitions_records_once_per_wave(world: World) -> None:
    """Asks that come while the holder reads a partition's records share its next read (each
    ask is answered by a read that began after it came); a read that fails is answered as an
    error, so that the bridge asking logs it."""
    state = MemoryState()
    parts = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 3,
                            held_partitions=lambda: [3], leased_here=lambda part: True)
    theirs = ReceiptHandover(state, parts, world.messenger)  # type: ignore[arg-type]
    read, gate, reads = state.unfinished, asyncio.Event(), []

    async def gated(scope: str, part: int) -> dict[str, str]:
        if scope == "ks~":  # (a read of the partition's records reads the writers' own first)
            reads.append(part)
        await gate.wait()
        return await read(scope, part)

    state.unfinished = gated  # type: ignore[method-assign]
    first = asyncio.ensure_future(theirs.serve_adopt({"part": 3}))
    await until(lambda: len(reads) == 1)
    later = [asyncio.ensure_future(theirs.serve_adopt({"part": 3})) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, *later), 2.0) == [{"ok": True}] * 6
    assert reads == [3, 3]  # (the first ask's read, then one for the five that came during it)
    assert await theirs.serve_adopt({"part": 3}) == {"ok": True} and len(reads) == 3

    async def failing(*_: object) -> dict[str, str]:
        raise ConnectionError("redis is gone")

    state.unfinished = failing  # type: ignore[method-assign]
    assert "error" in await theirs.serve_adopt({"part": 3})


async def test_a_notice_kept_for_a_retry_is_told_as_the_receipt_stands_then(world: World) -> None:
    """A record of an untold notice that was told since (its forgetting lost), adopted by the
    next holder: the sender is told the receipt as it stands, never a position behind what it
    was told before, in a direct chat and in a group (there, the lowest of the others')."""
    a, b, c = [await world.user(f"+1555000091{i}") for i in range(3)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, b)
    for k in (1, 2):
        sent = await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=b.user_id, body="hi", media=None))
    direct = sent.reply.chat  # type: ignore[union-attr]
    group, _ = await world.messenger.create_group(a, "team", [b.user_id, c.user_id])
    for k in (1, 2):
        await world.messenger.send(a, Send(id=f"g{k}", chat=group.chat_id, to=None, body="hi", media=None))
    await world.messenger.read(c, Read(chat=group.chat_id, up_to=2))
    for chat, told in ((direct, [(a.user_id, "read", b.user_id, 2)]),
                       (group.chat_id, [(a.user_id, "delivered", "*", 2), (a.user_id, "read", "*", 2)])):
        world.store.failing = {"append_receipts"}
        with pytest.raises(Unavailable):
            await world.messenger.read(b, Read(chat=chat, up_to=1))
        world.store.failing = set()
        [(name, stale)] = (await records(state)).items()
        # (the kept one and the new one: the furthest)
        assert receipt_notices((await world.messenger.read(b, Read(chat=chat, up_to=2))).outs) == told
        # as if its forgetting had been lost (what it left there gone, and the record as it was)
        assert name in await records(state, marks=True)
        await state.put_unfinished("ks~", 3, {name: None})
        await state.put_unfinished("ks~", 3, {name: stale})
        await theirs.adopt(3)
        assert receipt_notices((await there.read(b, Read(chat=chat, up_to=1))).outs) == told
        assert await records(state) == {}


async def test_a_group_read_told_on_its_retry_tells_the_delivered_notice_it_moves_too(world: World) -> None:
    """A group read whose notice the store failed, read again further: the retry tells what was
    kept, and the delivered notice the further read moves (reading implies delivery) too."""
    a, b, c = [await world.user(f"+1555000094{i}") for i in range(3)]
    group, _ = await world.messenger.create_group(a, "team", [b.user_id, c.user_id])
    first, second = [(await world.messenger.send(a, Send(id=f"g{k}", chat=group.chat_id, to=None, body="hi",
                                                          media=None))).reply.seq for k in (1, 2)]  # type: ignore[union-attr]
    await world.messenger.read(c, Read(chat=group.chat_id, up_to=second))
    told = (await world.messenger.ack(b, Ack(up_to=await world.store.inbox_head(b.user_id) - 1))).outs
    assert receipt_notices(told) == [(a.user_id, "delivered", "*", first)]  # (b has the first only)
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=group.chat_id, up_to=first))
    world.store.failing = set()
    assert sorted(receipt_notices((await world.messenger.read(b, Read(chat=group.chat_id, up_to=second))).outs)
                  ) == [(a.user_id, "delivered", "*", second), (a.user_id, "read", "*", second)]


async def test_what_cannot_be_recorded_for_the_next_holder_is_still_finished_here(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared state fails, or hangs: the failed read is answered (at once, or once the
    record's bound has passed), and the retry on the same bridge tells the notice."""
    import bridge.handover

    monkeypatch.setattr(bridge.handover, "HANDOVER_WAIT_S", 1.0)
    a, b = [await world.user(f"+1555000090{i}") for i in range(2)]
    state = MemoryState()
    other_bridge(world, state, b)
    stuck = asyncio.Event()

    async def hanging(*_: object) -> None:
        await stuck.wait()

    async def failing(*_: object) -> None:
        raise ConnectionError("redis is gone")

    for k, put in enumerate((failing, hanging)):
        state.put_unfinished = put  # type: ignore[method-assign]
        sent = await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=b.user_id, body="hi", media=None))
        chat, seq = sent.reply.chat, sent.reply.seq  # type: ignore[union-attr]
        world.store.failing = {"append_receipts"}
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(world.messenger.read(b, Read(chat=chat, up_to=seq)), 3.0)
        took = time.monotonic() - started
        assert took >= 0.9 if put is hanging else took < 0.9
        world.store.failing = set()
        assert receipt_notices((await asyncio.wait_for(world.messenger.read(b, Read(chat=chat, up_to=seq)), 2.0)
                                ).outs) == [(a.user_id, "read", b.user_id, seq)]


async def messages_to_read(world: World, phones: str, n: int
                           ) -> tuple[Caller, Caller, MemoryState, ReceiptHandover, ReceiptHandover, str]:
    """``n`` messages from a to b in their direct chat, b in partition 3 of a second bridge's
    state: a, b, the state, the handovers of this bridge and the other, and the chat."""
    a, b = [await world.user(f"{phones}{i}") for i in range(2)]
    state = MemoryState()
    _, here, theirs = other_bridge(world, state, b)
    for k in range(n):
        sent = await world.messenger.send(a, Send(id=f"m{k}", chat=None, to=b.user_id, body="hi", media=None))
    return a, b, state, here, theirs, sent.reply.chat  # type: ignore[union-attr,return-value]


async def next_holder_reads(world: World, state: MemoryState, handover: ReceiptHandover, b: Caller, chat: str,
                            up_to: int) -> list[Out]:
    """What a bridge taking partition 3 next (adopting its records; its partitions as ``handover``'s)
    tells on b's read of ``chat``."""
    next_holder = Messenger(world.store, world.clock, world.presence, max_group=4)  # type: ignore[arg-type]
    await ReceiptHandover(state, handover._partitions, next_holder).adopt(3)  # type: ignore[arg-type]  # noqa: SLF001
    return (await next_holder.read(b, Read(chat=chat, up_to=up_to))).outs


def records_made(handover: ReceiptHandover) -> list[Any]:
    """The records a bridge makes from now on, as it makes them."""
    made: list[Any] = []
    record = handover.record

    def counted(name: str, value: str) -> Any:
        made.append(record(name, value))
        return made[-1]

    handover.record = counted  # type: ignore[method-assign]
    return made


async def test_two_writes_of_one_record_land_in_the_order_they_were_made(world: World) -> None:
    """Two of a member's devices read one chat and both reads fail part way here, the first
    one's record still being written when the second's is made (it holds both notices): the
    second write goes only once the first has ended, so what stays in Redis is the later
    record, and a bridge that died then would leave the next holder the furthest notice."""
    a, b, state, here, theirs, chat = await messages_to_read(world, "+1555000095", 2)
    put, first_held, made = state.put_unfinished, asyncio.Event(), records_made(here)
    calls: list[dict[str, str]] = []

    async def put_first_slowly(scope: str, part: int, fields: dict[str, str]) -> None:
        calls.append(fields)
        if len(calls) == 1:
            await first_held.wait()
        await put(scope, part, fields)

    state.put_unfinished = put_first_slowly  # type: ignore[method-assign]
    world.store.failing = {"append_receipts"}
    first = asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=1)))
    await until(lambda: len(calls) == 1)
    second = asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=2)))
    await until(lambda: len(made) == 2)  # (the second read failed and made its record)
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # (its write waits for the first one's)
    first_held.set()
    for reading in (first, second):
        with pytest.raises(Unavailable):
            await asyncio.wait_for(reading, 5)
    world.store.failing = set()
    state.put_unfinished = put  # type: ignore[method-assign]
    assert len(calls) == 2 and recorded_up_to(await records(state)) == [2]
    assert receipt_notices(await next_holder_reads(world, state, theirs, b, chat, 2)) == [
        (a.user_id, "read", b.user_id, 2)]
    assert await records(state) == {}


async def test_each_write_of_a_record_has_its_own_bound_and_writes_the_newest(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's reads fail here one after another while the first one's record is being written
    slowly (in 0.8 s, within the bound of 1 s a write has): the next write waits for it, has a
    bound of its own (not what is left of its request's since it was made), and writes the newest
    record made by then, which holds the others too."""
    monkeypatch.setattr(handover_mod, "HANDOVER_WAIT_S", 1.0)
    _, b, state, here, _, chat = await messages_to_read(world, "+1555000096", 3)
    put, calls = state.put_unfinished, []

    async def slow_put(scope: str, part: int, fields: dict[str, str]) -> None:
        calls.append(fields)
        await asyncio.sleep(0.8)
        await put(scope, part, fields)

    state.put_unfinished = slow_put  # type: ignore[method-assign]
    world.store.failing = {"append_receipts"}
    reads = [asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=1)))]
    await until(lambda: len(calls) == 1)
    await asyncio.sleep(0.5)
    reads += [asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=k))) for k in (2, 3)]
    for reading in reads:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(reading, 5)
    world.store.failing = set()
    assert len(calls) == 2 and recorded_up_to(await records(state)) == [3]
    assert here._writing == {}  # (nothing kept for the field once its writes are done)  # noqa: SLF001


async def test_a_record_a_failed_write_held_is_not_written_again_so_waits_stay_bounded(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis does not answer: the first read's write runs out its bound while two more reads of
    the member fail; the next write holds both their records and runs out its own, and the third
    read, whose record that write held, gives up instead of writing it a third time (each more
    would add a bound to its request's wait)."""
    monkeypatch.setattr(handover_mod, "HANDOVER_WAIT_S", 0.3)
    _, b, state, _, _, chat = await messages_to_read(world, "+1555000097", 3)
    calls: list[dict[str, str]] = []

    async def hanging_put(scope: str, part: int, fields: dict[str, str]) -> None:
        calls.append(fields)
        await asyncio.Event().wait()

    state.put_unfinished = hanging_put  # type: ignore[method-assign]
    world.store.failing = {"append_receipts"}
    reads = [asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=1)))]
    await until(lambda: len(calls) == 1)
    reads += [asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=k))) for k in (2, 3)]
    for reading in reads:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(reading, 5)
    world.store.failing = set()
    assert [recorded_up_to(c) for c in calls] == [[1], [3]]  # (the second write, the newest record)
    assert await records(state) == {}


def test_the_records_a_bridge_makes_carry_times_that_grow_when_its_clock_does_not() -> None:
    """Of two records of a field, Redis keeps the later (by the time each starts with): so each
    record of a field a process makes is later than the one before, the clock standing still or
    going back; another field's follows the clock."""
    times = iter([5.0, 5.0, 4.0, 4.0, 6.0])
    handover = ReceiptHandover(MemoryState(), SimpleNamespace(), SimpleNamespace(),  # type: ignore[arg-type]
                               clock=lambda: next(times))
    made = [handover.record(name, "x")[1] for name in ("n1", "n1", "n1", "n2", "n1")]
    assert made == ["5000 x", "5001 x", "5002 x", "4000 x", "6000 x"]  # (each field's own: n2 as the clock)


async def a_read_failing_with_redis_slow(world: World, monkeypatch: pytest.MonkeyPatch, phones: str, n: int
                                         ) -> tuple[Caller, Caller, MemoryState, ReceiptHandover, str, Any,
                                                    list[tuple[Any, ...]]]:
    """``messages_to_read``, then b's read of the first fails here (the store failing appends, as
    it goes on doing) while Redis is slow: its record's write runs out its bound (0.3 s here),
    unanswered. a, b, the state, the other bridge's handover, the chat, the state's own write
    (answered again from now on), and the writes given up on, to land later with it."""
    monkeypatch.setattr(handover_mod, "HANDOVER_WAIT_S", 0.3)
    a, b, state, _, theirs, chat = await messages_to_read(world, phones, n)
    put, held = state.put_unfinished, []

    async def unanswered(*args: Any) -> None:
        held.append(args)
        await asyncio.Event().wait()

    state.put_unfinished = unanswered  # type: ignore[method-assign]
    world.store.failing = {"append_receipts"}
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=1))
    state.put_unfinished = put  # type: ignore[method-assign]
    return a, b, state, theirs, chat, put, held


async def test_a_write_that_lands_after_a_later_one_changes_nothing(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's read fails here while Redis is slow: its record's write runs out its bound
    but reaches Redis later, after the next read's record (further) has landed. The later
    record stays, and the partition's next holder tells the furthest notice."""
    a, b, state, theirs, chat, put, late = await a_read_failing_with_redis_slow(world, monkeypatch, "+1555000098", 2)
    with pytest.raises(Unavailable):
        await world.messenger.read(b, Read(chat=chat, up_to=2))
    world.store.failing = set()
    [first] = late
    assert recorded_up_to(await records(state)) == [2]
    await put(*first)  # (the first write, landing now)
    assert recorded_up_to(await records(state)) == [2]
    assert receipt_notices(await next_holder_reads(world, state, theirs, b, chat, 2)) == [
        (a.user_id, "read", b.user_id, 2)]


async def test_a_write_landing_after_its_retry_forgot_the_record_leaves_nothing_to_tell_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's read fails here while Redis is slow: its record's write runs out its bound, the
    read's retry tells the notice and forgets the record (there is none yet), and then the write
    reaches Redis. What the forgetting left there refuses it: the partition's next holder has
    nothing to tell again."""
    a, b, state, theirs, chat, put, late = await a_read_failing_with_redis_slow(world, monkeypatch, "+1555000099", 1)
    world.store.failing = set()
    assert receipt_notices((await world.messenger.read(b, Read(chat=chat, up_to=1))).outs) == [
        (a.user_id, "read", b.user_id, 1)]
    [first] = late
    await put(*first)  # (the write, landing now)
    assert await records(state) == {} and len(await records(state, marks=True)) == 1
    assert await next_holder_reads(world, state, theirs, b, chat, 1) == []
    assert len(await records(state, marks=True)) == 1  # (adopting left it: a write of it may land later still)


async def test_a_read_cancelled_part_way_is_recorded_for_the_next_holder_all_the_same(world: World) -> None:
    """The bridge stops while a read's notice is being appended (its handler cancelled): the
    notice is recorded for the partition's next holder, without the cancelled read waiting for
    the record, and the bridge's ``flush_keeping`` waits for it before the state closes."""
    a, b = [await world.user(f"+1555000093{i}") for i in range(2)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, b)
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    chat = sent.reply.chat  # type: ignore[union-attr]
    put, slow = state.put_unfinished, asyncio.Event()

    async def slow_put(*args: Any) -> None:
        await slow.wait()
        await put(*args)

    state.put_unfinished = slow_put  # type: ignore[method-assign]
    world.store.held = {"append_receipts": asyncio.Event()}
    reading = asyncio.ensure_future(world.messenger.read(b, Read(chat=chat, up_to=1)))
    await until(lambda: world.store.calls["append_receipts"] == 1)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reading, 1.0)  # (ended while its record is still being written)
    world.store.held = {}
    flushing = asyncio.ensure_future(world.messenger.flush_keeping())
    await asyncio.sleep(0.05)
    assert not flushing.done()
    slow.set()
    await asyncio.wait_for(flushing, 1.0)
    assert await records(state) != {}
    await theirs.adopt(3)
    assert receipt_notices((await there.read(b, Read(chat=chat, up_to=1))).outs) == [(a.user_id, "read", b.user_id, 1)]


async def test_records_that_are_old_or_not_understood_are_dropped_not_adopted(world: World) -> None:
    """Of a partition's records, the next holder adopts those it understands and that were
    written within a day; the others are dropped from the shared state, not adopted (nor
    adopted again each time)."""
    a, b = [await world.user(f"+1555000092{i}") for i in range(2)]
    state = MemoryState()
    there, _, theirs = other_bridge(world, state, b)
    sent = await world.messenger.send(a, Send(id="m1", chat=None, to=b.user_id, body="hi", media=None))
    chat = sent.reply.chat  # type: ignore[union-attr]
    await world.messenger.read(b, Read(chat=chat, up_to=1))
    now = int(time.time() * 1000)

    def record(key: list[str], *notes: list[object]) -> tuple[str, str]:
        return "n" + json.dumps(key, separators=(",", ":")), f"{now} " + json.dumps(notes)

    good_name, good = record([chat, b.user_id, "read"], [a.user_id, chat, b.user_id, "read", 1])
    bad = dict([
        ("x", f"{now} ?"),
        ('n["c","u","seen"]', f"{now} []"),
        record([chat, a.user_id, "read"], [17, chat, "*", "read", 1]),  # (to whom?)
        record(["other", b.user_id, "read"], [a.user_id, chat, b.user_id, "read", 1]),  # (another chat's)
        record([chat, b.user_id, "delivered"], [a.user_id, chat, b.user_id, "read", float("inf")]),
        ("n" + "[" * 100_000, f"{now} []"),
        ('a["u","d"]', f"{now} not a number"),
        ('a["u", "n"]', f"{now} 3"),  # (not named as a bridge names it: its retry would not forget it)
        ("n" + json.dumps([chat, b.user_id, "delivered"]), f"{now} " + json.dumps([[a.user_id, chat, b.user_id,
                                                                                   "delivered", 1]])),
        ('a["u","e"]', f"{now - 2 * 86_400_000} 3"),  # (understood, but two days old)
        ('a["u","f"]', "3"),  # (no time)
        ('a["u","g"]', "\u00b2 3"),  # (a digit, but not one written here)
        ('a["u","h"]', f"{now + 2 * 86_400_000} 3"),  # (two days ahead: would never age)
        ('a["u","i"]', f"{'9' * 5000} 3"),
        ('a{"u":1,"d":2}', f"{now} 3"),
        *((f'a["u","{k}"]', f"{now} {v}") for k, v in (("j", "+3"), ("k", " 3"), ("l", "1_000"), ("m", "\uff13"))),
        record([chat, b.user_id, "delivered"], [a.user_id, chat, b.user_id, "delivered", 2**63]),
        (good_name + "~0a1b2c3d", good),  # (a writer's own field, not among the writers' own records)
    ])
    # (a writer's own field, and one as bridges named them before each wrote its own)
    own, before = {good_name + "~0a1b2c3d": good}, {good_name: good.replace(f"{now} ", f"{now - 1} ", 1)}
    await state.put_unfinished("ks", 3, {**before, **bad})
    await state.put_unfinished("ks~", 3, {**own, good_name: good, **{  # (the name alone, among writers' own)
        good_name + mark: good for mark in ("~zz", "~0a1b2c3d4", "~", "~0a1b2c3d~0a1b2c3d")}})
    await theirs.adopt(3)
    assert await state.unfinished("ks", 3) == before and await state.unfinished("ks~", 3) == own
    assert not there._acks_unfinished and list(there._untold) == [(chat, b.user_id, "read")]  # noqa: SLF001
    assert receipt_notices((await there.read(b, Read(chat=chat, up_to=1))).outs) == [(a.user_id, "read", b.user_id, 1)]
    assert await records(state) == {}  # (finished: both forgotten)
    # one that another bridge writes again between the read and the drop stays
    old_ack = ('a["u","d"]', f"{now - 2 * 86_400_000} 3")
    await state.put_unfinished("ks", 3, dict([old_ack]))
    read = state.unfinished

    async def read_then_written_again(scope: str, part: int) -> dict[str, str]:
        got = await read(scope, part)
        if scope == "ks":
            await state.put_unfinished(scope, part, {old_ack[0]: f"{now} 4"})
        return got

    state.unfinished = read_then_written_again  # type: ignore[method-assign]
    await theirs.adopt(3)
    assert await read("ks", 3) == {old_ack[0]: f"{now} 4"}


def held_handover(world: World, state: MemoryState) -> ReceiptHandover:
    """This bridge's handover, holding partitions 3 and 4 (every user in 3)."""
    parts = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 3, held_partitions=lambda: [3, 4],
                            leased_here=lambda part: True)
    return ReceiptHandover(state, parts, world.messenger)  # type: ignore[arg-type]


async def test_a_sweep_drops_a_held_partitions_old_records_and_marks_and_adopts_nothing(world: World) -> None:
    """Of a partition held for long, the holder drops the records and marks written more than a
    day before (or ahead), and those without a time, and leaves the others, taking none on."""
    state, now, day = MemoryState(), int(time.time() * 1000), 86_400_000
    handover = held_handover(world, state)
    def ack(k: int) -> str:
        return f'a["u","d{k}"]~0a1b2c3d'

    old = {ack(1): f"{now - 2 * day} 3", ack(2): f"{now - 2 * day}", ack(3): f"{now + 2 * day}", ack(4): "3"}
    young = {ack(5): f"{now} 3", ack(6): f"{now - day // 2}"}
    await state.put_unfinished("ks~", 3, {**old, **young})
    await state.put_unfinished("ks", 3, {'a["u","d"]': f"{now - 2 * day} 3", 'a["u","e"]': f"{now} 3"})
    await handover.sweep(3)
    assert await state.unfinished("ks~", 3) == young
    assert await state.unfinished("ks", 3) == {'a["u","e"]': f"{now} 3"}
    assert not world.messenger._acks_unfinished  # noqa: SLF001


async def test_a_holder_sweeps_its_partitions_from_its_first_adoption_until_it_closes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge sweeps the partitions it holds about every SWEEP_S once it has adopted one (it
    holds partitions), and stops when it closes."""
    monkeypatch.setattr(handover_mod, "SWEEP_S", 0.05)
    state, old = MemoryState(), f"{int(time.time() * 1000) - 2 * 86_400_000}"
    handover = held_handover(world, state)
    await state.put_unfinished("ks~", 4, {'a["u","d"]~0a1b2c3d': old})
    await asyncio.sleep(0.2)
    assert await state.unfinished("ks~", 4) != {}  # (nothing adopted yet: no sweeping)
    await handover.adopt(3)
    await until(lambda: not state._unfinished[("ks~", 4)])  # noqa: SLF001
    sweeper = handover._sweeper  # noqa: SLF001
    assert sweeper is not None and not sweeper.done()
    await handover.close()
    assert sweeper.done()


async def test_a_group_notice_a_higher_one_overtook_is_not_told(world: World) -> None:
    """A higher group notice, worked out on another bridge, reached the sender's inbox first:
    the store does not append the lower one (position 0), and nobody is told it."""
    owner, b = [await world.user(f"+1555000060{i}") for i in range(2)]
    chat, _ = await world.messenger.create_group(owner, "team", [b.user_id])
    await world.messenger.send(owner, Send(id="o1", chat=chat.chat_id, to=None, body="hi", media=None))
    await world.store.append_receipts([(owner.user_id, ReceiptNote(chat.chat_id, "*", "delivered", 3))])
    head = await world.store.inbox_head(b.user_id)
    assert (await world.messenger.ack(b, Ack(up_to=head))).outs == []
    assert [r.delivered for r in await world.store.get_receipts(chat.chat_id) if r.user_id == b.user_id] == [2]


async def test_members_acking_together_are_worked_out_together(world: World) -> None:
    """Members acking one group message at once: the sender hears once, and the members'
    receipts are not read once per ack."""
    owner, *members = [await world.user(f"+1555000020{i}") for i in range(4)]
    chat, _ = await world.messenger.create_group(owner, "team", [m.user_id for m in members])
    await world.messenger.send(owner, Send(id="o1", chat=chat.chat_id, to=None, body="hi", media=None))
    heads = [await world.store.inbox_head(m.user_id) for m in members]
    world.store.calls.clear()
    results = await asyncio.gather(*(world.messenger.ack(m, Ack(up_to=h)) for m, h in zip(members, heads, strict=True)))
    told = [json.loads(encode_v1(o.event)) for r in results for o in r.outs]
    assert [(t["user"], t["kind"], t["up_to"]) for t in told] == [("*", "delivered", 2)]
    assert world.store.calls["get_receipts"] == 2  # the first ack's round, and one more for the other two

    async def next_message_acked_one_by_one() -> None:
        await world.messenger.send(owner, Send(id=f"o{world.clock.now_ms()}", chat=chat.chat_id, to=None,
                                               body="again", media=None))
        world.store.calls.clear()
        for m in members:
            await world.messenger.ack(m, Ack(up_to=await world.store.inbox_head(m.user_id)))

    await next_message_acked_one_by_one()
    assert world.store.calls["get_chat"] == 0  # the chat as the acks just before read it
    world.clock.advance(3)
    await next_message_acked_one_by_one()
    assert world.store.calls["get_chat"] == 1  # read again once it is older than a moment


async def test_acks_that_find_the_chat_unread_join_one_read_of_it(world: World) -> None:
    """A group's members ack together: those that miss the chat while it is being read wait for
    that read rather than each reading the chat and its members; a member added meanwhile is
    not judged on a read begun before the addition."""
    owner, *members = [await world.user(f"+1555000030{i}") for i in range(4)]
    chat, _ = await world.messenger.create_group(owner, "team", [m.user_id for m in members[:2]])
    await world.messenger.send(owner, Send(id="o1", chat=chat.chat_id, to=None, body="hi", media=None))
    heads = [await world.store.inbox_head(m.user_id) for m in members[:2]]
    world.store.calls.clear()
    world.store.held["get_chat"] = gate = asyncio.Event()
    acks = [asyncio.ensure_future(world.messenger.ack(m, Ack(up_to=h)))
            for m, h in zip(members[:2], heads, strict=True)]
    await until(lambda: world.store.calls["read_inbox"], 2)
    await asyncio.sleep(0.2)  # both acks have read their inbox and reached the chat by now
    gate.set()
    told = [json.loads(encode_v1(o.event)) for r in await asyncio.gather(*acks) for o in r.outs]
    assert [(t["user"], t["kind"], t["up_to"]) for t in told] == [("*", "delivered", 2)]
    assert world.store.calls["get_chat"] == 1

    # a read under way when a member is added is not one the next ack joins: that one reads anew
    # (joining it would wait on the closed gate)
    world.clock.advance(3)
    world.store.calls.clear()
    world.store.held["get_chat"] = gate = asyncio.Event()
    late = members[2]
    begun_before = asyncio.ensure_future(world.messenger._recent_chat(chat.chat_id))
    await until(lambda: world.store.calls["get_chat"], 1)
    del world.store.held["get_chat"]
    await world.messenger.add_member(owner, chat.chat_id, late.user_id)
    fresh = await asyncio.wait_for(world.messenger._recent_chat(chat.chat_id), 5)
    assert fresh is not None and fresh.member(late.user_id) is not None
    gate.set()
    await begun_before


async def test_group_size_is_limited(world: World) -> None:
    users = [await world.user(f"+1555000000{i}") for i in range(5)]
    with pytest.raises(BadRequest):
        await world.messenger.create_group(users[0], "too many", [u.user_id for u in users[1:]])
    chat, _ = await world.messenger.create_group(users[0], "ok", [u.user_id for u in users[1:4]])
    from bridge.errors import Conflict

    with pytest.raises(Conflict):
        await world.messenger.add_member(users[0], chat.chat_id, users[4].user_id)


async def test_media_done_checks_what_was_stored(world: World) -> None:
    a = await world.user("+15550000001")
    data = b"hello media"
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(TooLarge):
        await world.media.upload(a, "r", sha, 5000, "text/plain")
    reply = await world.media.upload(a, "r", sha, len(data), "text/plain")
    assert reply["exists"] is False and reply["upload"]["method"] == "PUT"
    with pytest.raises(BadRequest, match="nothing has been uploaded"):
        await world.media.done(a, "r", sha)
    world.blobs.put(sha, b"other bytes")
    with pytest.raises(BadRequest, match="does not match"):
        await world.media.done(a, "r", sha)
    assert sha not in world.blobs.objects  # the bad object is gone
    world.blobs.put(sha, data)
    assert (await world.media.done(a, "r", sha))["type"] == "media_ready"
    world.blobs.down = True
    other = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(Unavailable):
        await world.media.upload(a, "r", other, 1, "text/plain")


def test_signed_blob_urls_expire_and_bind_their_operation(tmp_path: Path) -> None:
    blobs = LocalMediaStore(tmp_path, SECRET, "http://h")
    key = "a" * 64
    sig = blobs._sign("put", key, 1000, 10)  # noqa: SLF001
    blobs.check_signature("put", key, 1000, 10, sig, now=999)
    with pytest.raises(SignatureError, match="expired"):
        blobs.check_signature("put", key, 1000, 10, sig, now=1001)
    with pytest.raises(SignatureError):
        blobs.check_signature("get", key, 1000, 10, sig, now=999)
    with pytest.raises(SignatureError):
        blobs.check_signature("put", key, 1000, 11, sig, now=999)


def test_parse_request_codes() -> None:
    with pytest.raises(UnknownType):
        parse_request(b'{"type":"nope"}', 100)
    with pytest.raises(TooLarge):
        parse_request(b"x" * 101, 100)
    with pytest.raises(BadRequest) as info:
        parse_request(b'{"type":"send","id":"i","body":"x"}', 100)
    assert info.value.request_id == "i"
    req = parse_request(b'{"type":"sync","id":"s","unknown":1}', 100)  # unknown fields are ignored
    assert req.type == "sync"


async def test_sdk_orders_live_events_and_trusts_sync_across_a_missing_position() -> None:
    from clients.sdk import Device, Profile

    dev = Device(Profile(http_url="http://127.0.0.1:9", user_id="u", device_id="d", token="t", expires_at=0,
                         mqtt_host="127.0.0.1", mqtt_port=9, ws_url="ws://127.0.0.1:9/mqtt"))
    try:
        dev._take({"inbox": 1, "n": 1})  # noqa: SLF001
        dev._take({"inbox": 3, "n": 3})  # noqa: SLF001 - live, after a gap: held back
        dev._take({"inbox": 1, "n": 1})  # noqa: SLF001 - duplicate: dropped
        assert [e["n"] for e in dev.pending_events()] == [1]
        dev._take({"inbox": 2, "n": 2})  # noqa: SLF001 - the gap fills: both follow in order
        assert [e["n"] for e in dev.pending_events()] == [2, 3]
        dev._take({"inbox": 5, "n": 5})  # noqa: SLF001
        dev._take({"inbox": 6, "n": 6}, from_store=True)  # noqa: SLF001 - sync says 4 does not exist
        assert [e["n"] for e in dev.pending_events()] == [5, 6] and dev.cursor == 6
    finally:
        await dev.api.close()


async def test_unconfirmed_uploads_are_swept(world: World) -> None:
    a = await world.user("+15550000001")
    data = b"never confirmed"
    sha = hashlib.sha256(data).hexdigest()
    await world.media.upload(a, "r", sha, len(data), "text/plain")
    world.blobs.put(sha, data)
    assert await world.media.sweep(older_than_s=3600) == 0  # too young
    world.clock.advance(3601)
    assert await world.media.sweep(older_than_s=3600) == 1
    assert sha not in world.blobs.objects
    with pytest.raises(NotFound):
        await world.media.done(a, "r", sha)


async def test_online_count_is_taken_at_most_every_few_seconds(world: World) -> None:
    """Counting walks every online user in the shared state: two asks close together (a scrape
    of /metrics) count once; after ONLINE_COUNT_TTL_S a new count is taken."""
    from bridge.presence import ONLINE_COUNT_TTL_S

    a, b = await world.user("+15550000201"), await world.user("+15550000202")
    await world.presence.device_online(a.user_id, a.device_id)
    assert await world.presence.online_devices() == 1
    await world.presence.device_online(b.user_id, b.device_id)
    assert await world.presence.online_devices() == 1
    world.clock.advance(ONLINE_COUNT_TTL_S)
    assert await world.presence.online_devices() == 2


async def test_a_device_that_stated_its_keepalive_is_offline_after_one_and_a_half_of_silence(world: World) -> None:
    a, b = await world.user("+15550009001"), await world.user("+15550009002")
    up = f"up/{b.user_id}/{b.device_id}"
    await world.router.handle(up, b'{"type":"presence","state":"online","keepalive":2}')
    assert await world.presence.is_online(b.user_id)
    world.clock.advance(2.9)
    assert await world.presence.expire_silent() == []
    # a request counts as activity: the allowance starts again from it
    await world.router.handle(up, b'{"type":"sync","id":"s1","after":0}')
    world.clock.advance(2.9)
    assert await world.presence.expire_silent() == []
    assert await world.presence.is_online(b.user_id)
    world.clock.advance(0.2)
    await world.presence.expire_silent()
    assert not await world.presence.is_online(b.user_id)
    user = await world.store.get_user(b.user_id)
    assert user is not None and user.last_seen == world.clock.now_ms()
    # the will arriving later changes nothing more
    assert await world.router.handle(up, b'{"type":"presence","state":"offline"}') == []
    # a device that stated no keepalive is left to the broker
    await world.router.handle(f"up/{a.user_id}/{a.device_id}", b'{"type":"presence","state":"online"}')
    world.clock.advance(3600)
    assert await world.presence.expire_silent() == []
    assert await world.presence.is_online(a.user_id)


@pytest.mark.parametrize("keepalive", ['"2"', "0", "-1", "65536", "1.5", "true", "[]"])
async def test_a_stated_keepalive_of_the_wrong_type_or_range_is_a_bad_request(world: World, keepalive: str) -> None:
    b = await world.user("+15550009003")
    outs = await world.router.handle(f"up/{b.user_id}/{b.device_id}",
                                     f'{{"type":"presence","state":"online","keepalive":{keepalive}}}'.encode())
    assert [json.loads(encode_v1(o.event))["code"] for o in outs] == ["bad_request"]
    assert not await world.presence.is_online(b.user_id)


async def test_over_mqtt_every_error_code_is_one_of_the_protocols(world: World) -> None:
    """Found by tests/test_fuzz_protocol.py: the same content declared twice with two sizes was
    answered ``conflict``, a code section 3 of the protocol does not have (HTTP keeps its 409)."""
    a = await world.user("+15550009011")
    up = f"up/{a.user_id}/{a.device_id}"
    sha = "0" * 64
    first = await world.router.handle(up, json.dumps(
        {"type": "media_upload", "id": "m1", "sha256": sha, "size": 2, "mime": "image/jpeg"}).encode())
    assert json.loads(encode_v1(first[-1].event))["type"] == "media_upload"
    again = await world.router.handle(up, json.dumps(
        {"type": "media_upload", "id": "m2", "sha256": sha, "size": 3, "mime": "image/jpeg"}).encode())
    error = json.loads(encode_v1(again[-1].event))
    assert (error["type"], error["code"], error["id"]) == ("error", "bad_request", "m2")
    assert "another size" in error["message"]


@pytest.mark.parametrize("payload", [
    b'{"type":"sync","id":"\xed\xa0\x80x"}',  # a UTF-16 surrogate encoded as if it were UTF-8
    b'{"type":"sync","id":"\\ud800x"}',  # a lone surrogate as a JSON escape
    b'{"type":"send","id":"s","to":"u","body":"\\udfff"}',
    b'{"type":"send","id":"s","to":"u","body":"ok","x":{"y":["\\ud83d"]}}',  # even in an ignored field
])
async def test_a_lone_surrogate_is_a_bad_request_not_an_internal_error(world: World, payload: bytes) -> None:
    """Found by tests/test_fuzz_protocol.py: Python's JSON reader lets lone surrogates through
    (from bytes, with 'surrogatepass'), and the reply that echoed them could not be encoded: the
    device got ``unavailable``, "internal error"."""
    with pytest.raises(BadRequest):
        parse_request(payload, 1000)
    a = await world.user("+15550009021")
    outs = await world.router.handle(f"up/{a.user_id}/{a.device_id}", payload)
    assert [json.loads(encode_v1(o.event))["code"] for o in outs] == ["bad_request"]


@pytest.mark.parametrize("payload", [
    b"[" * 5000,
    b'{"type":"send","id":"s","to":"u","body":"x","extra":' + b"[" * 5000 + b"]" * 5000 + b"}",
])
async def test_a_payload_nested_past_the_parsers_depth_is_a_bad_request(world: World, payload: bytes) -> None:
    """A few kilobytes of arrays within arrays took Python's JSON reader past its depth: a
    RecursionError, which stopped the connection that read it when admission control parsed the
    publish (tests/test_admission.py, tests/test_mqtt_ingest_publish.py)."""
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_request(payload, 64 * 1024)
    a = await world.user("+15550009022")
    outs = await world.router.handle(f"up/{a.user_id}/{a.device_id}", payload)
    assert [json.loads(encode_v1(o.event))["code"] for o in outs] == ["bad_request"]


def test_a_surrogate_pair_escape_is_a_character_like_any_other() -> None:
    req = parse_request(b'{"type":"send","id":"s","to":"u","body":"\\ud83d\\ude00"}', 1000)
    assert isinstance(req, Send) and req.body == "\U0001f600"


async def test_a_direct_chats_messages_go_out_marked_direct_and_a_groups_do_not(world: World) -> None:
    """(v2 leaves the chat out of the peer's live copy of a direct message: bridge/wire_v2.py)"""
    a, b = [await world.user(f"+1555000020{i}") for i in range(2)]
    direct = await world.messenger.send(a, Send(id="1", chat=None, to=b.user_id, body="hi", media=None))
    assert [type(o.event).__name__ for o in direct.outs] == ["MsgEvent", "MsgEvent"]
    assert all(isinstance(o.event, MsgEvent) and o.event.direct for o in direct.outs)
    chat, _ = await world.messenger.create_group(a, "team", [b.user_id])
    group = await world.messenger.send(a, Send(id="2", chat=chat.chat_id, to=None, body="hi", media=None))
    assert group.outs and not any(isinstance(o.event, MsgEvent) and o.event.direct for o in group.outs)
