"""The storage contract, run unchanged against every backend.

A backend joins by adding a parameter to the ``store`` fixture that yields an opened, empty
store of that kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import storage.cassandra
from storage import StorageError, cassandra_contact, cassandra_credentials, open_store
from storage.base import Chat, LoginCode, MediaObject, MediaRef, Message, NewMessage, NotStored, ReceiptNote, Store
from storage.cassandra import CassandraStore
from storage.state import open_state
from tests.conftest import fresh_store_url, production_url

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def cassandra_url() -> str:
    """The keyspace these tests share (one store at a time holds its partitions)."""
    return fresh_store_url()


@pytest.fixture(params=["sqlite", "cassandra", "cassandra+redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    state = None
    if request.param == "sqlite":
        s = open_store(f"sqlite://{tmp_path / 'contract.db'}")
    else:
        s = open_store(request.getfixturevalue("cassandra_url"))
        if request.param == "cassandra+redis":  # with counter hints and the recent-sends window
            state = open_state(production_url("PIGEON_REDIS", "redis://"))
            await state.open()
            s.use_state(state)
    await s.migrate()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        if state is not None:
            await state.close()


_run = random.randrange(10**6)
_n = itertools.count()


def phone() -> str:
    """A phone number no other test (nor an earlier run on a shared keyspace) has used."""
    return f"+1{_run:06d}{next(_n):06d}"


@pytest.fixture
async def cassandra(cassandra_url: str) -> AsyncIterator[CassandraStore]:
    """A Cassandra store of its own, migrated and open (for tests of Cassandra's own behaviour)."""
    store = open_store(cassandra_url)
    assert isinstance(store, CassandraStore)
    await store.migrate()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def text(chat: str, sender: str, cid: str | None, body: str = "x", ts: int = T0) -> NewMessage:
    return NewMessage(chat_id=chat, sender=sender, device=phone_of(sender), client_id=cid, ts=ts, kind="text",
                      body=body)


def phone_of(user: str) -> str:
    """The device a user's messages come from in these tests: unique, as device ids are, so that
    a send id one test uses is never taken for another test's retry on a shared keyspace."""
    return f"{user}-phone"


async def two_users(store: Store) -> tuple[str, str]:
    P1, P2 = phone(), phone()
    a = await store.create_user(P1, T0)
    b = await store.create_user(P2, T0)
    return a.user_id, b.user_id


async def test_users_are_unique_per_phone_and_keep_their_fields(store: Store) -> None:
    P1 = phone()
    u = await store.create_user(P1, T0)
    assert await store.create_user(P1, T0 + 5) == u
    assert await store.user_by_phone(P1) == u
    assert await store.get_user(u.user_id) == u
    assert (await store.set_user_name(u.user_id, "Ann")).name == "Ann"
    await store.set_last_seen(u.user_id, T0 + 10)
    await store.set_last_seen(u.user_id, T0 + 5)  # never backwards
    got = await store.get_user(u.user_id)
    assert got is not None and got.last_seen == T0 + 10
    with pytest.raises(NotStored):
        await store.set_user_name("u-missing", "x")
    assert await store.get_user("u-missing") is None


async def test_devices_and_push_targets(store: Store) -> None:
    P1 = phone()
    u = await store.create_user(P1, T0)
    d = await store.add_device(u.user_id, "phone", "android", T0)
    assert await store.get_device(d.device_id) == d
    updated = await store.set_push_target(d.device_id, "fcm", "tok")
    assert (updated.push_provider, updated.push_token) == ("fcm", "tok")
    with pytest.raises(NotStored):
        await store.set_push_target("d-missing", "fcm", "tok")


async def test_a_users_devices_and_clearing_a_push_target(store: Store) -> None:
    u = await store.create_user(phone(), T0)
    other = await store.create_user(phone(), T0)
    d1 = await store.add_device(u.user_id, "phone", "android", T0)
    d2 = await store.add_device(u.user_id, "laptop", "web", T0 + 1)
    await store.add_device(other.user_id, "theirs", "ios", T0)
    assert [d.device_id for d in await store.user_devices(u.user_id)] == [d1.device_id, d2.device_id]
    assert await store.user_devices("u-nobody") == []
    await store.set_push_target(d1.device_id, "webhook", "https://a.example/1")
    # a push service refused an older token: the newer registration stays
    assert await store.clear_push_target(d1.device_id, "https://a.example/old") is False
    assert (await store.get_device(d1.device_id)).push_token == "https://a.example/1"  # type: ignore[union-attr]
    assert await store.clear_push_target(d1.device_id, "https://a.example/1") is True
    got = await store.get_device(d1.device_id)
    assert got is not None and (got.push_provider, got.push_token) == (None, None)
    assert await store.clear_push_target(d1.device_id) is False  # nothing left to clear
    await store.set_push_target(d2.device_id, "fcm", "tok")
    assert await store.clear_push_target(d2.device_id) is True
    await store.remove_device(d2.device_id)
    assert [d.device_id for d in await store.user_devices(u.user_id)] == [d1.device_id]


async def test_login_codes_replace_and_delete(store: Store) -> None:
    P1 = phone()
    code = LoginCode(phone=P1, code_hash="h1", expires_at=T0, attempts=0, locked_until=0)
    await store.put_login_code(code)
    await store.put_login_code(LoginCode(P1, "h2", T0 + 1, 2, 0))
    assert await store.get_login_code(P1) == LoginCode(P1, "h2", T0 + 1, 2, 0)
    await store.delete_login_code(P1)
    assert await store.get_login_code(P1) is None


async def test_direct_chat_is_created_once_for_the_pair(store: Store) -> None:
    a, b = await two_users(store)
    c1 = await store.direct_chat(a, b, T0)
    c2 = await store.direct_chat(b, a, T0 + 1)
    assert c1.chat_id == c2.chat_id and c1.kind == "direct" and set(c1.member_ids) == {a, b}
    assert await store.share_chat(a, b)
    assert [c.chat_id for c in await store.user_chats(a)] == [c1.chat_id]


async def test_a_known_pairs_chat_is_found_without_a_statement(store: Store) -> None:
    """Every send with ``to`` looks the pair's chat up: once known, that costs the store nothing,
    and a caller that asks for the chat's current seq still gets it."""
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"k{i}"), [a, b])
    before = store.ops.statements
    again = await store.direct_chat(b, a, T0 + 5, current_seq=False)
    assert store.ops.statements == before
    assert again.chat_id == chat.chat_id and set(again.member_ids) == {a, b}
    assert (await store.direct_chat(a, b, T0 + 6)).last_seq == 3


async def test_first_uses_of_a_pair_at_once_make_one_chat(store: Store) -> None:
    a, b = await two_users(store)
    chats = await asyncio.gather(*(store.direct_chat(*((a, b) if k % 2 else (b, a)), T0 + k) for k in range(6)))
    assert len({c.chat_id for c in chats}) == 1 and all(set(c.member_ids) == {a, b} for c in chats)
    assert [c.chat_id for c in await store.user_chats(b)] == [chats[0].chat_id]


async def test_groups_members_and_roles(store: Store) -> None:
    P3 = phone()
    a, b = await two_users(store)
    c = await store.create_user(P3, T0)
    g = await store.create_group(a, "team", [b, b, a], T0)
    assert g.kind == "group" and g.title == "team" and g.member(a) and g.member(a).role == "admin"  # type: ignore[union-attr]
    assert sorted(g.member_ids) == sorted([a, b])
    assert await store.add_member(g.chat_id, c.user_id, "member", T0) is True
    assert await store.add_member(g.chat_id, c.user_id, "member", T0) is False
    assert await store.remove_member(g.chat_id, b) is True
    assert await store.remove_member(g.chat_id, b) is False
    got = await store.get_chat(g.chat_id)
    assert got is not None and sorted(got.member_ids) == sorted([a, c.user_id])
    assert not await store.share_chat(a, b)
    with pytest.raises(NotStored):
        await store.add_member("g-missing", a, "member", T0)
    assert await store.get_chat("g-missing") is None


async def test_append_numbers_gap_free_and_fills_inboxes(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    results = [await store.append_message(text(chat.chat_id, a, f"m{i}", body=f"b{i}"), [a, b]) for i in range(5)]
    assert [r.message.seq for r in results] == [1, 2, 3, 4, 5]
    assert [r.inbox[b] for r in results] == [1, 2, 3, 4, 5]
    entries = await store.read_inbox(b, 0, 100)
    assert [e.pos for e in entries] == [1, 2, 3, 4, 5]
    assert isinstance(entries[0].item, Message) and entries[0].item.body == "b0"
    assert await store.inbox_head(b) == 5
    assert [e.pos for e in await store.read_inbox(b, 2, 2)] == [3, 4]


async def test_append_is_idempotent_on_device_and_client_id(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    first = await store.append_message(text(chat.chat_id, a, "same"), [a, b])
    again = await store.append_message(text(chat.chat_id, a, "same", body="changed"), [a, b])
    assert again.duplicate and again.message == first.message and dict(again.inbox) == {}
    assert await store.find_sent(phone_of(a), "same") == first.message
    assert len(await store.history(chat.chat_id, None, 10)) == 1
    assert await store.inbox_head(b) == 1


async def test_two_devices_of_one_user_may_use_the_same_request_id(store: Store) -> None:
    """Request ids are unique per device: the same id from a second device is a new message."""
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    phone_msg = await store.append_message(text(chat.chat_id, a, "1", body="from phone"), [a, b])
    laptop = replace(text(chat.chat_id, a, "1", body="from laptop"), device=f"{a}-laptop")
    laptop_msg = await store.append_message(laptop, [a, b])
    assert not laptop_msg.duplicate and laptop_msg.message.seq == phone_msg.message.seq + 1
    assert (await store.append_message(laptop, [a, b])).duplicate
    found_phone, found_laptop = await store.find_sent(phone_of(a), "1"), await store.find_sent(f"{a}-laptop", "1")
    assert found_phone is not None and found_phone.body == "from phone"
    assert found_laptop is not None and found_laptop.body == "from laptop"
    assert await store.inbox_head(b) == 2


async def test_concurrent_appends_never_share_a_seq(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    results = await asyncio.gather(*(store.append_message(text(chat.chat_id, a, f"c{i}"), [a, b]) for i in range(40)))
    assert sorted(r.message.seq for r in results) == list(range(1, 41))
    assert sorted(r.inbox[a] for r in results) == list(range(1, 41))


@contextlib.asynccontextmanager
async def second_bridge(store: Store, request: pytest.FixtureRequest) -> AsyncIterator[list[Store]]:
    """``[store]``, and on Cassandra with the shared state a second store instance beside it, as
    a second bridge process would be: it holds none of the partitions at first, so the first
    numbers for it (its appends are forwarded), and it takes a share of them within a second
    or two (a rebalance, which the appends in flight meet)."""
    if not (isinstance(store, CassandraStore) and store.shared_state is not None):
        yield [store]
        return
    state = open_state(production_url("PIGEON_REDIS", "redis://"))
    await state.open()
    other = open_store(request.getfixturevalue("cassandra_url"))
    try:
        await other.open()
        other.use_state(state)
        yield [store, other]
    finally:
        await other.close()
        await state.close()


async def test_many_senders_at_once_fill_one_inbox_without_gaps_or_repeats(
        store: Store, request: pytest.FixtureRequest) -> None:
    """A hot inbox (one reader, many chats writing at once), and on Cassandra with the shared
    state a second store instance, as a second bridge process would be, writing into it at the
    same time (the first one numbers for it, and gives it a share of the partitions)."""
    reader = (await store.create_user(phone(), T0)).user_id
    senders = [(await store.create_user(phone(), T0)).user_id for _ in range(12)]
    chats = [await store.direct_chat(s, reader, T0) for s in senders]
    async with second_bridge(store, request) as stores:
        results = await asyncio.gather(*(
            stores[(i + k) % len(stores)].append_message(text(c.chat_id, s, f"m{k}"), [s, reader])
            for i, (s, c) in enumerate(zip(senders, chats, strict=True)) for k in range(4)))
    assert sorted(r.inbox[reader] for r in results) == list(range(1, 49))
    for s in senders:
        assert sorted(r.inbox[s] for r in results if r.message.sender == s) == [1, 2, 3, 4]
        assert sorted(r.message.seq for r in results if r.message.sender == s) == [1, 2, 3, 4]
    assert [e.pos for e in await store.read_inbox(reader, 0, 100)] == list(range(1, 49))


async def test_append_to_missing_chat_raises_and_stores_nothing(store: Store) -> None:
    a, b = await two_users(store)
    with pytest.raises(NotStored):
        await store.append_message(text("c-missing", a, "x"), [a, b])
    assert await store.inbox_head(b) == 0 and await store.find_sent(phone_of(a), "x") is None


async def test_history_pages_newest_first(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(6):
        await store.append_message(text(chat.chat_id, a, None, body=f"h{i}"), [a, b])
    assert [m.seq for m in await store.history(chat.chat_id, None, 4)] == [6, 5, 4, 3]
    assert [m.seq for m in await store.history(chat.chat_id, 3, 4)] == [2, 1]


async def test_media_roundtrip_and_chat_carriage(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    key = f"{random.getrandbits(256):064x}"
    obj = MediaObject(key=key, sha256=key, size=10, mime="image/png", owner=a, state="pending", created_at=T0)
    assert await store.put_media(obj) == obj
    assert (await store.put_media(replace(obj, size=99, owner=b))).size == 10  # the first record stays
    await store.mark_media_ready(obj.key)
    got = await store.get_media(obj.key)
    assert got is not None and got.state == "ready"
    with pytest.raises(NotStored):
        await store.mark_media_ready("missing")
    ref = MediaRef(key=obj.key, mime="image/png", size=10, sha256=obj.sha256, name="p.png")
    assert not await store.message_carries_media(chat.chat_id, obj.key)
    stored = await store.append_message(
        NewMessage(chat_id=chat.chat_id, sender=a, device=phone_of(a), client_id="m", ts=T0, kind="media",
                   media=ref), [a, b]
    )
    assert stored.message.media == ref
    assert await store.message_carries_media(chat.chat_id, obj.key)
    entry = (await store.read_inbox(b, 0, 1))[0]
    assert isinstance(entry.item, Message) and entry.item.media == ref


async def test_receipts_move_forward_and_reading_implies_delivery(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    assert await store.advance_receipt(chat.chat_id, b, "delivered", 3) is True
    assert await store.advance_receipt(chat.chat_id, b, "delivered", 2) is False
    assert await store.advance_receipt(chat.chat_id, b, "read", 5) is True
    got = {r.user_id: r for r in await store.get_receipts(chat.chat_id)}
    assert (got[b].delivered, got[b].read) == (5, 5) and (got[a].delivered, got[a].read) == (0, 0)
    assert await store.advance_group_notice(chat.chat_id, a, "read", 2) is True
    assert await store.advance_group_notice(chat.chat_id, a, "read", 2) is False
    assert await store.advance_group_notice(chat.chat_id, a, "delivered", 1) is True


async def test_cassandra_a_receipt_moved_twice_at_once_is_not_told_going_back(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two devices of a user read a chat at once, up to 9 and up to 5, and the 9 is written first:
    the 5 is no news (its notice would take the receipt back), and 9 stands."""
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    assert await store.advance_receipt(chat.chat_id, b, "read", 3) is True
    run, nine_written = store._per_chat.run, asyncio.Event()

    async def five_after_nine(partition: str, name: str, params: tuple[Any, ...]) -> None:
        if params[0] == 5:
            await nine_written.wait()
        await run(partition, name, params)
        if params[0] == 9 and name == "set_read":
            nine_written.set()

    monkeypatch.setattr(store._per_chat, "run", five_after_nine)
    nine, five = await asyncio.wait_for(asyncio.gather(store.advance_receipt(chat.chat_id, b, "read", 9),
                                                       store.advance_receipt(chat.chat_id, b, "read", 5)), 10)
    assert (nine, five) == (True, False)
    assert await store.advance_receipt(chat.chat_id, b, "read", 7) is False
    assert {r.user_id: r.read for r in await store.get_receipts(chat.chat_id)}[b] == 9


async def test_cassandra_receipts_moved_on_by_another_bridge_are_not_told_again_after_a_partition_comes_back(
        cassandra: CassandraStore) -> None:
    """This bridge knew b's read receipt at 3; the partition went to another bridge, which moved
    it to 10, and came back. A read up to 7 here is then no news: what this bridge knew of the
    partition's receipts was dropped with it."""
    from storage.cassandra_owner import partition_of

    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    assert await store.advance_receipt(chat.chat_id, b, "read", 3) is True
    store._lost(partition_of(f"u:{b}"))  # (the leases as they were: only what it knew is dropped)
    await store._x("set_read", 10, 10, chat.chat_id, b)  # the other bridge
    await store._x("set_delivered", 10, 10, chat.chat_id, b)
    assert await store.advance_receipt(chat.chat_id, b, "read", 7) is False
    assert await store.advance_receipt(chat.chat_id, b, "read", 11) is True


async def test_many_members_receipts_moved_at_once_are_all_kept(store: Store) -> None:
    """A group's members acknowledging the same message together: every move is kept (a backend
    may write them as one request), and each member's read implies delivered."""
    owner = (await store.create_user(phone(), T0)).user_id
    members = [(await store.create_user(phone(), T0)).user_id for _ in range(24)]
    g = await store.create_group(owner, "crowd", members, T0)
    for m in members:
        assert await store.advance_receipt(g.chat_id, m, "delivered", 1) is True
    def receipt_writes() -> int:  # requests carrying receipt moves (one batch counts once)
        return sum(n for name, n in store.ops.by_name.items() if name.startswith(("set_delivered", "set_read")))

    before = receipt_writes()
    moved = await asyncio.gather(*(store.advance_receipt(g.chat_id, m, "read" if i % 3 == 0 else "delivered", 7 + i)
                                   for i, m in enumerate(members)))
    assert moved == [True] * len(members)
    if isinstance(store, CassandraStore):  # one write under way, the rest joined in one batch
        assert receipt_writes() - before <= 2
    got = {r.user_id: r for r in await store.get_receipts(g.chat_id)}
    for i, m in enumerate(members):
        assert (got[m].delivered, got[m].read) == (7 + i, 7 + i if i % 3 == 0 else 0), m
    assert (got[owner].delivered, got[owner].read) == (0, 0)


async def test_receipt_notes_share_the_inbox_sequence(store: Store) -> None:
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    await store.append_message(text(chat.chat_id, b, "m"), [a, b])
    positions = await store.append_receipts([(a, ReceiptNote(chat.chat_id, b, "read", 1))])
    assert positions == [2]
    entries = await store.read_inbox(a, 0, 10)
    assert entries[1].item == ReceiptNote(chat.chat_id, b, "read", 1)


async def test_a_group_notice_a_higher_one_overtook_is_not_appended(
        store: Store, request: pytest.FixtureRequest) -> None:
    """Two bridges worked out group notices for one member at once, and the higher reached the
    member's inbox first: the lower one is not appended (position 0), wherever it was worked
    out, so the notices in the inbox only move forward. An equal one (a retry) and a direct
    chat's receipt are appended as they come."""
    owner, member = await two_users(store)
    g = await store.create_group(owner, "team", [member], T0)
    d = await store.direct_chat(owner, member, T0)
    base = await store.inbox_head(owner)
    async with second_bridge(store, request) as stores:
        here, there = stores[0], stores[-1]
        assert await there.append_receipts([(owner, ReceiptNote(g.chat_id, "*", "delivered", 7))]) == [base + 1]
        assert await here.append_receipts([
            (owner, ReceiptNote(g.chat_id, "*", "delivered", 5)),  # overtaken
            (owner, ReceiptNote(g.chat_id, "*", "read", 5)),  # another kind
            (owner, ReceiptNote(g.chat_id, "*", "delivered", 7)),  # equal
            (owner, ReceiptNote(d.chat_id, member, "delivered", 1)),
            (owner, ReceiptNote(d.chat_id, member, "delivered", 1))]) == [0, base + 2, base + 3, base + 4, base + 5]
        assert await there.append_receipts([(owner, ReceiptNote(g.chat_id, "*", "read", 4))]) == [0]
    got = [(e.item.chat_id, e.item.kind, e.item.up_to) for e in await store.read_inbox(owner, base, 10)
           if isinstance(e.item, ReceiptNote)]
    assert got == [(g.chat_id, "delivered", 7), (g.chat_id, "read", 5), (g.chat_id, "delivered", 7),
                   (d.chat_id, "delivered", 1), (d.chat_id, "delivered", 1)]


async def test_cassandra_an_inbox_s_next_holder_does_not_append_a_group_notice_its_tail_overtook(
        cassandra_url: str) -> None:
    """A bridge appended a group notice (delivered up to 7) to a member's inbox and gave the
    partitions up (it stopped); the next holder, asked for a lower notice of the same kind as
    its first append to that inbox, does not append it: it read the notices among the inbox's
    newest entries when it opened it. An equal one and another kind are appended."""
    first = open_store(cassandra_url)
    await first.open()
    try:
        owner, member = await two_users(first)
        g = await first.create_group(owner, "team", [member], T0)
        base = await first.inbox_head(owner)
        assert await first.append_receipts([(owner, ReceiptNote(g.chat_id, "*", "delivered", 7))]) == [base + 1]
    finally:
        await first.close()
    second = open_store(cassandra_url)
    await second.open()
    try:
        assert await second.append_receipts([(owner, ReceiptNote(g.chat_id, "*", "delivered", 5))]) == [0]
        assert await second.append_receipts([
            (owner, ReceiptNote(g.chat_id, "*", "delivered", 7)),
            (owner, ReceiptNote(g.chat_id, "*", "read", 3))]) == [base + 2, base + 3]
        got = [(e.item.kind, e.item.up_to) for e in await second.read_inbox(owner, base, 10)
               if isinstance(e.item, ReceiptNote)]
        assert got == [("delivered", 7), ("delivered", 7), ("read", 3)]
    finally:
        await second.close()


async def test_device_acks_move_the_users_position_forward_only(store: Store) -> None:
    a, b = await two_users(store)
    d = await store.add_device(b, "p", "ios", T0)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"m{i}"), [a, b])
    assert await store.advance_device_ack(d.device_id, b, 2) == (0, 2)
    assert await store.advance_device_ack(d.device_id, b, 1) == (2, 2)
    assert await store.advance_device_ack(d.device_id, b, 99) == (2, 3)  # capped at the inbox head


async def test_inbox_positions_tell_what_no_device_acknowledged(store: Store) -> None:
    a, b = await two_users(store)
    d = await store.add_device(b, "p", "ios", T0)
    assert await store.inbox_positions(b) == (0, 0)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"m{i}"), [a, b])
    assert await store.inbox_positions(b) == (0, 3)
    await store.advance_device_ack(d.device_id, b, 2)
    assert await store.inbox_positions(b) == (2, 3)
    assert await store.inbox_positions("u-nobody") == (0, 0)


async def test_unconfirmed_uploads_can_be_found_and_dropped(store: Store) -> None:
    def obj(created: int, state: str = "pending") -> MediaObject:
        key = f"{random.getrandbits(256):064x}"
        return MediaObject(key=key, sha256=key, size=5, mime="a/b", owner="u", state=state, created_at=created)  # type: ignore[arg-type]

    now = 1_800_000_000_000
    old, fresh, done = obj(now - 3 * 86_400_000), obj(now - 1000), obj(now - 3 * 86_400_000)
    for o in (old, fresh, done):
        await store.put_media(o)
    await store.mark_media_ready(done.key)
    stale = {m.key for m in await store.stale_uploads(now - 86_400_000, 1000)}
    assert old.key in stale and fresh.key not in stale and done.key not in stale
    assert await store.drop_media(old.key) is True
    assert await store.get_media(old.key) is None
    assert await store.drop_media(done.key) is False  # ready media is never dropped
    assert await store.get_media(done.key) is not None


async def test_an_unlinked_device_is_gone(store: Store) -> None:
    u = await store.create_user(phone(), T0)
    d = await store.add_device(u.user_id, "old phone", "ios", T0)
    assert await store.remove_device(d.device_id) is True
    assert await store.get_device(d.device_id) is None
    assert await store.remove_device(d.device_id) is False


async def messages_to_b(store: Store, n: int, label: str) -> tuple[str, str]:
    """Two new users a and b, and ``n`` messages from a to b in their direct chat."""
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(n):
        await store.append_message(text(chat.chat_id, a, f"{label}{i}"), [a, b])
    return a, b


async def test_an_acknowledged_position_outlives_the_store_instance(
        store: Store, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """What a user acknowledged is still known to the next process (a backend may write it
    behind, but no later than its close), once the receipts it led to have moved: an ack whose
    receipts had not (the process died between the two) is done again by the next one."""
    a, b = await messages_to_b(store, 4, "ack")
    assert await store.advance_device_ack(phone_of(b), b, 1) == (0, 1)
    assert await store.advance_device_ack(phone_of(b), b, 2) == (1, 2)  # (on from the first, still moving)
    await store.device_ack_done(b, 1)
    assert await store.advance_device_ack(phone_of(b), b, 3) == (2, 3)  # (its receipts never moved)
    await store.device_ack_done(b, 0)
    await store.close()
    url = f"sqlite://{tmp_path / 'contract.db'}" if not isinstance(store, CassandraStore) \
        else request.getfixturevalue("cassandra_url")
    again = open_store(url)
    await again.open()
    try:
        assert await again.advance_device_ack(phone_of(b), b, 2) == (2, 2)
        assert await again.advance_device_ack(phone_of(b), b, 3) == (2, 3)
    finally:
        await again.close()


async def test_cassandra_writes_acknowledged_positions_a_period_after_they_move_not_in_one_burst(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each user's position is written about ACK_FLUSH_S (here a second) after it first moved:
    users whose acks came half a second apart are written half a second apart, not together."""
    monkeypatch.setattr(storage.cassandra, "ACK_FLUSH_S", 1.0)
    store = cassandra
    a, b = await messages_to_b(store, 2, "slice")
    base = store.ops.by_name.get("set_acked", 0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for user in (a, b):
        await store.advance_device_ack(phone_of(user), user, 1)
        await store.device_ack_done(user, 0)
        if user == a:
            await asyncio.sleep(0.5)
    written: list[float] = []
    while len(written) < 2 and loop.time() - start < 4:
        await asyncio.sleep(0.01)
        while store.ops.by_name.get("set_acked", 0) - base > len(written):
            written.append(loop.time() - start)
    assert len(written) == 2, written
    assert 0.9 <= written[0] <= 1.4, written
    assert written[1] - written[0] >= 0.3, written


async def test_cassandra_writes_a_position_no_further_than_an_ack_whose_receipts_are_moving(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's position written behind stops where an ack still moving its receipts began (a
    crash then leaves that ack to the device's next one), written once while that ack moves
    (it may wait long: a failed ack waits for its retry), and goes on once that ack is done."""
    monkeypatch.setattr(storage.cassandra, "ACK_FLUSH_S", 0.3)
    store = cassandra
    a, b = await messages_to_b(store, 3, "moving")

    async def written() -> int:
        rows = await store._x("user_state", b)  # noqa: SLF001
        return int(rows[0][1] or 0) if rows else 0

    assert await store.advance_device_ack(phone_of(b), b, 1) == (0, 1)
    await store.device_ack_done(b, 0)
    assert await store.advance_device_ack(phone_of(b), b, 3) == (1, 3)
    await asyncio.sleep(0.6)
    writes = store.ops.by_name.get("set_acked", 0)
    await asyncio.sleep(1.2)  # (four periods)
    assert await written() == 1
    assert store.ops.by_name.get("set_acked", 0) == writes  # (held, not written again and again)
    await store.device_ack_done(b, 1)
    for _ in range(100):
        if await written() == 3:
            break
        await asyncio.sleep(0.05)
    assert await written() == 3


async def test_cassandra_statement_without_an_answer_fails_after_the_timeout() -> None:
    """The driver runs statements without a timer of its own; the store's sweep fails the ones
    not answered in time (and leaves answered ones alone)."""
    from storage.base import StorageUnavailable
    from storage.cassandra import _Results

    loop = asyncio.get_running_loop()
    results = _Results(loop, 0.3)
    silent: asyncio.Future[list[object]] = loop.create_future()
    answered: asyncio.Future[list[object]] = loop.create_future()
    results.watch(silent, "put_msg")
    results.watch(answered, "get_sent")
    loop.run_in_executor(None, results.put, answered, ["row"], None)  # as the driver's thread does
    assert await asyncio.wait_for(answered, 1) == ["row"]
    with pytest.raises(StorageUnavailable, match="put_msg: no answer in 0.3 s"):
        await asyncio.wait_for(silent, 2)


def test_cassandra_keeps_what_it_caches_as_tuples_the_garbage_collector_leaves_alone() -> None:
    """Inbox entries and completed sends are cached by the hundred thousand, as the inbox rows'
    values: a message (with or without media) or a receipt note comes back equal, and the tuple
    is one the cyclic collector stops tracking, so no collection walks it again."""
    import gc

    from storage.base import MediaRef, Message, ReceiptNote
    from storage.cassandra import _inbox_item, _inbox_values

    messages = [
        Message("c1", 7, "rid", "u1", "d1", T0, "text", body="hello"),
        Message("c1", 8, None, "u1", "d1", T0 + 1, "media", body="look",
                media=MediaRef("k/1", "image/png", 123, "ab" * 32, "cat.png"), event=None, target="u2"),
    ]
    note = ReceiptNote("c1", "u2", "delivered", 8)
    packed = [_inbox_values(m) for m in messages] + [(note.chat_id, *[None] * 10, note.kind, note.user, note.up_to)]
    assert [_inbox_item(t) for t in packed] == [*messages, note]
    gc.collect()
    assert not any(gc.is_tracked(t) for t in packed)


async def test_cassandra_finds_a_send_only_once_every_members_entry_is_written(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry that finds its send answers `sent` without storing anything more, so the send's
    record must come after the members' inbox entries: when writing an entry fails, the send is
    not found, and the retry completes the entries."""
    from storage.base import StorageUnavailable

    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    number = store._number_soon

    async def inbox_write_fails(key: str, values: tuple[object, ...], ident: object) -> tuple[int, bool]:
        if key == f"u:{b}":
            await asyncio.sleep(0.05)  # the other writes of the send go ahead meanwhile
            raise StorageUnavailable("the recipient's inbox entry was not written")
        return await number(key, values, ident)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_number_soon", inbox_write_fails)
    with pytest.raises(StorageUnavailable):
        await store.append_message(text(chat.chat_id, a, "once"), [a, b])
    await asyncio.sleep(0.1)
    monkeypatch.setattr(store, "_number_soon", number)
    assert await store.find_sent(phone_of(a), "once") is None
    retried = await store.append_message(text(chat.chat_id, a, "once"), [a, b])
    assert retried.message.seq == 1 and b in retried.inbox
    assert [e.item.seq for e in await store.read_inbox(b, 0, 10) if isinstance(e.item, Message)] == [1]
    assert await store.find_sent(phone_of(a), "once") is not None


async def chat_with_late_rows(store: CassandraStore, late: int) -> tuple[str, str, Chat]:
    """A direct chat with three messages of its own (seq 1..3) and, after them, ``late`` rows of
    an older holder's epoch that landed past the fence (seq 4 on, hidden from readers)."""
    from storage.cassandra_owner import partition_of

    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"own{i}"), [a, b])
    epoch = store._leases.epoch(partition_of(f"c:{chat.chat_id}"))  # type: ignore[union-attr]
    assert epoch is not None
    for seq in range(4, 4 + late):
        await store._x("put_msg", chat.chat_id, seq // storage.cassandra.BUCKET, seq, epoch - 1, f"late{seq}", a,
                       phone_of(a), T0, "text", "stale", None, None, None)
    return a, b, chat


async def test_cassandra_a_key_opened_past_a_late_batch_of_an_older_holder_keeps_its_head(
        cassandra: CassandraStore) -> None:
    """Rows of an older epoch that landed past the fence after it was written are hidden; when
    there are more of them than one read of the tail takes, the head is still the highest row of
    the key's own, not the bucket's start: nothing stored is numbered again."""
    store = cassandra
    a, b, chat = await chat_with_late_rows(store, storage.cassandra.RECENT_SCAN + 10)
    key = f"c:{chat.chat_id}"
    assert (await store._tail(key))[0] == 3
    store._logs.drop(key)  # opened again, as after its log was dropped from memory
    again = await store.append_message(text(chat.chat_id, a, "after"), [a, b])
    assert again.message.seq == 4
    assert [m.body for m in await store.history(chat.chat_id, None, 10)] == ["x", "x", "x", "x"]
    assert [m.client_id for m in await store.history(chat.chat_id, None, 10)] == ["after", "own2", "own1", "own0"]


async def test_cassandra_a_late_write_of_an_older_holder_past_a_bucket_does_not_move_the_head(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older holder's late batch that started a new bucket also moved the head hint there; its
    rows are hidden, and the head is still the highest row of the key's own, below the hint."""
    monkeypatch.setattr(storage.cassandra, "BUCKET", 10)
    store = cassandra
    a, b, chat = await chat_with_late_rows(store, 9)  # 4..12, into the next bucket
    key = f"c:{chat.chat_id}"
    await store._x("set_chat_head", 10, 10, chat.chat_id)
    assert (await store._tail(key))[0] == 3
    store._logs.drop(key)
    assert (await store.append_message(text(chat.chat_id, a, "after"), [a, b])).message.seq == 4


def a_new_epoch(store: CassandraStore, monkeypatch: pytest.MonkeyPatch, key: str, epoch: int) -> None:
    """This process holds ``key``'s partition at ``epoch`` from now on (as after a takeover)."""
    from storage.cassandra_owner import partition_of

    leases, part = store._leases, partition_of(key)
    assert leases is not None
    for held in store._logs.of_partition(part):  # every key of the partition is opened again
        store._logs.drop(held.key)
    held_epoch, held_valid = leases.epoch, leases.valid
    monkeypatch.setattr(leases, "epoch", lambda p: epoch if p == part else held_epoch(p))
    monkeypatch.setattr(leases, "valid", lambda p, e: e == epoch if p == part else held_valid(p, e))


async def chat_of_three_under_the_next_epoch(store: CassandraStore, monkeypatch: pytest.MonkeyPatch,
                                             epoch_after: int) -> tuple[str, str, Chat, str, int]:
    """A chat with three messages (seq 1..3), its key's epoch then ``epoch_after`` higher (as
    after a takeover); the epoch it had."""
    from storage.cassandra_owner import partition_of

    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"own{i}"), [a, b])
    key = f"c:{chat.chat_id}"
    epoch = store._leases.epoch(partition_of(key))  # type: ignore[union-attr]
    assert epoch is not None
    a_new_epoch(store, monkeypatch, key, epoch + epoch_after)
    return a, b, chat, key, epoch


def opening_held(store: CassandraStore, monkeypatch: pytest.MonkeyPatch, chat_id: str
                 ) -> tuple[asyncio.Event, asyncio.Event]:
    """From now on an opening of the chat's key stops at its read of the chat's head: the first
    event is set when one gets there, and it goes on once the second is set."""
    run, reached, go_on = store._x, asyncio.Event(), asyncio.Event()

    async def held(name: str, *values: Any, **kw: Any) -> Any:
        if name == "chat_head" and values == (chat_id,) and not go_on.is_set():
            reached.set()
            await go_on.wait()
        return await run(name, *values, **kw)

    monkeypatch.setattr(store, "_x", held)
    return reached, go_on


async def chat_opened_again_until(store: CassandraStore, monkeypatch: pytest.MonkeyPatch, statement: str,
                                  epoch_after: int) -> tuple[str, str, Chat, str, int]:
    """A chat with three messages (seq 1..3), then opened under the next epoch with ``statement``
    failing once between the opening's two fences; the caller of that opening told unavailable."""
    from storage.base import StorageUnavailable

    a, b, chat, key, epoch = await chat_of_three_under_the_next_epoch(store, monkeypatch, epoch_after)
    run = store._x
    failing = [statement]

    async def fails_once(name: str, *values: Any, **kw: Any) -> Any:
        if name in failing and values and key.endswith(str(values[0])):
            failing.remove(name)
            raise StorageUnavailable(f"{name}: no answer")
        return await run(name, *values, **kw)

    monkeypatch.setattr(store, "_x", fails_once)
    with pytest.raises(StorageUnavailable):
        await store.append_message(text(chat.chat_id, a, "cut short"), [a, b])
    assert not failing
    return a, b, chat, key, epoch


@pytest.mark.parametrize("statement", ["chat_head", "fence_put"])
async def test_cassandra_an_opening_cut_short_between_its_fences_is_finished_from_where_the_key_stood(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    """A new holder's opening of a key hides the older rows (its first fence), reads the tail, and
    puts its second fence at the head. When a statement in between fails, the holder opens the
    key again by itself: the history comes back, and the next send gets seq 4, not 1."""
    store = cassandra
    a, b, chat, key, epoch = await chat_opened_again_until(store, monkeypatch, statement, 1)
    assert await store.history(chat.chat_id, None, 10) == []  # hidden: an opening is under way
    await asyncio.wait_for(store._finishing[key], 5)  # the holder opens the key again by itself
    assert [m.client_id for m in await store.history(chat.chat_id, None, 10)] == ["own2", "own1", "own0"]
    assert await store._fence(key) == (epoch + 1, 3)
    assert (await store.append_message(text(chat.chat_id, a, "after"), [a, b])).message.seq == 4


async def test_cassandra_an_opening_cut_short_is_finished_by_the_next_holder(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder whose opening was cut short lost the partition before opening the key again:
    the next holder, whose epoch is newer still, reads the key under the fence the cut-short
    opening started from, and numbers on from 3."""
    store = cassandra
    a, b, chat, key, epoch = await chat_opened_again_until(store, monkeypatch, "chat_tail", 1)
    a_new_epoch(store, monkeypatch, key, epoch + 2)  # at once: the finishing waits at least 0.15 s
    sent = await store.append_message(text(chat.chat_id, a, "after"), [a, b])
    assert sent.message.seq == 4
    assert [m.client_id for m in await store.history(chat.chat_id, None, 10)] == ["after", "own2", "own1", "own0"]
    assert await store._fence(key) == (epoch + 2, 3)


async def test_cassandra_an_opener_cancelled_leaves_the_others_told_unavailable_and_the_key_whole(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two callers wait for one opening of a key; the one that started it is cancelled between the
    two fences. The other is told the store is unavailable (not cancelled itself), and the key is
    opened again where it stood."""
    from storage.base import StorageUnavailable

    store = cassandra
    a, b, chat, key, epoch = await chat_of_three_under_the_next_epoch(store, monkeypatch, 1)
    reached, go_on = opening_held(store, monkeypatch, chat.chat_id)
    first = asyncio.create_task(store._log(key))
    await asyncio.wait_for(reached.wait(), 5)
    second = asyncio.create_task(store._log(key))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(StorageUnavailable, match="interrupted"):
        await second
    go_on.set()
    assert (await store.append_message(text(chat.chat_id, a, "after"), [a, b])).message.seq == 4
    assert await store._fence(key) == (epoch + 1, 3)


async def test_cassandra_appends_that_waited_for_a_keys_opening_come_before_any_made_after_it(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two appends wait while a key is opened; a third is made in the first turn of the loop in
    which the key's log is open. The three are numbered in the order they were made (an inbox
    keeps a chat's messages in seq order when a fan-out arrives as the inbox is opened)."""
    store = cassandra
    a, b, chat, key, _epoch = await chat_of_three_under_the_next_epoch(store, monkeypatch, 1)
    reached, go_on = opening_held(store, monkeypatch, chat.chat_id)
    row = (a, phone_of(a), T0, "text", "x", None, None, None)
    third: list[asyncio.Future[tuple[int, bool]]] = []
    put = store._logs.put

    def cached(log_: Any) -> None:  # the third append comes in the next turn of the loop
        put(log_)
        if log_.key == key:
            asyncio.get_running_loop().call_soon(
                lambda: third.append(asyncio.ensure_future(store._number_soon(key, ("w3", *row), None))))

    monkeypatch.setattr(store._logs, "put", cached)
    first = asyncio.ensure_future(store._number_soon(key, ("w1", *row), None))
    await asyncio.wait_for(reached.wait(), 5)
    second = asyncio.ensure_future(store._number_soon(key, ("w2", *row), None))
    go_on.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    numbers = [n for n, _dup in await asyncio.wait_for(asyncio.gather(first, second, *third), 5)]
    assert numbers == [4, 5, 6]
    assert [m.client_id for m in await store.history(chat.chat_id, None, 3)] == ["w3", "w2", "w1"]


async def test_cassandra_a_late_row_of_an_older_holder_landing_between_a_syncs_reads_is_not_returned(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the two reads of a sync (the inbox's rows, the fence), a newer holder fences the
    inbox at 3 and a late write of the older one lands at 4. The sync returns 1..3: the fence is
    read after the rows, so a row read is either hidden by it or was kept by the newer holder."""
    from storage.cassandra_owner import partition_of

    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(3):
        await store.append_message(text(chat.chat_id, a, f"r{i}"), [a, b])
    await store.settled()
    key = f"u:{b}"
    epoch = store._leases.epoch(partition_of(key))  # type: ignore[union-attr]
    assert epoch is not None
    late = store._entries[(b, 3)]
    store._logs.drop(key)  # read from Cassandra, as by a bridge not holding the inbox
    run, reads = store._x, []

    async def newer_holder_between_the_reads(name: str, *values: Any, **kw: Any) -> Any:
        got = await run(name, *values, **kw)
        if name in ("fence_get", "read_inbox") and values and key.endswith(str(values[0])):
            reads.append(name)
            if len(reads) == 1:
                await run("fence_put", key, epoch + 1, 3, 2 * (epoch + 1) + 1)
                await store._write_rows(key, epoch, [(4, late)], True)  # the older holder's late row
        return got

    monkeypatch.setattr(store, "_x", newer_holder_between_the_reads)
    assert [e.pos for e in await store.read_inbox(b, 0, 10)] == [1, 2, 3]


async def test_cassandra_a_partition_given_back_waits_for_the_keys_being_opened_in_it(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition is given back (a second bridge came) while one of its keys is being opened for
    an append: the release waits for the opening and the append's write, and the append is
    stored, rather than failed with "changed hands" as the lease goes."""
    from storage.cassandra_owner import partition_of

    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    key, leases = f"c:{chat.chat_id}", store._leases
    assert leases is not None
    part = partition_of(key)
    reached, go_on = opening_held(store, monkeypatch, chat.chat_id)
    appended = asyncio.ensure_future(store._number_soon(key, ("opening", a, phone_of(a), T0, "text", "x", None,
                                                              None, None), None))
    await asyncio.wait_for(reached.wait(), 5)
    releasing = asyncio.create_task(leases.release(part))
    await asyncio.sleep(0.2)
    assert not releasing.done() and leases.epoch(part) is None  # new work goes elsewhere meanwhile
    go_on.set()
    assert await asyncio.wait_for(appended, 5) == (1, False)
    await asyncio.wait_for(releasing, 10)
    assert part not in leases.held()
    assert [m.client_id for m in await store.history(chat.chat_id, None, 5)] == ["opening"]


@pytest.mark.parametrize("asked_again_of", ["the holder", "itself"])
async def test_cassandra_a_forwarded_append_that_reached_a_bridge_giving_its_partition_up_is_asked_again(
        asked_again_of: str, cassandra: CassandraStore, cassandra_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second bridge forwards an append to the holder, which has just given the partition up
    (a rebalance) when the request reaches it: nothing is numbered there, the answer says so,
    and the forwarder asks again instead of failing the send (of the next holder, or numbering
    it itself if the partition came to it meanwhile); it is stored once, as seq 1."""
    from storage.cassandra_owner import partition_of

    here, states = cassandra, [open_state(production_url("PIGEON_REDIS", "redis://")) for _ in range(2)]
    for state in states:
        await state.open()
    there = open_store(cassandra_url)  # never opened: it holds no partition, so it forwards
    assert isinstance(there, CassandraStore)
    try:
        here.use_state(states[0])
        there.use_state(states[1])
        a, b = await two_users(here)
        chat = await here.direct_chat(a, b, T0)
        key, leases = f"c:{chat.chat_id}", here._leases
        assert leases is not None and leases.epoch(partition_of(key)) is not None
        answers: list[dict[str, Any]] = []

        async def given_up_at_first(req: dict[str, Any]) -> dict[str, Any]:
            with monkeypatch.context() as giving_up:
                if not answers:  # (the holder's check of its lease is made as the request comes)
                    giving_up.setattr(leases, "epoch", lambda part: None)
                answer = here._serve_forwarded(req)
            answers.append(await answer)
            return answers[-1]

        states[0].handle("number", given_up_at_first)
        values = ("moved", a, phone_of(a), T0, "text", "x", None, None, None)
        forwarder = there if asked_again_of == "the holder" else here  # (here: its lease stands again)
        assert await asyncio.wait_for(forwarder._forward(partition_of(key), key, values, None), 10) == (1, False)
        assert [("error" in got, "n" in got) for got in answers] == [
            (True, False), *([(False, True)] if forwarder is there else [])]
        assert [m.client_id for m in await here.history(chat.chat_id, None, 5)] == ["moved"]
    finally:
        await there.close()
        for state in states:
            await state.close()


async def test_cassandra_closes_and_gives_its_partitions_back_when_its_serving_loop_lost_a_cancellation(
        cassandra_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py can take the cancellation of a blocking pop and return as if none had come; the
    loop serving the other bridges then went on, and the store's close waited for it for ever
    (its leases held until they ran out). The close ends, and the partitions are free at once."""
    state = open_state(production_url("PIGEON_REDIS", "redis://"))
    await state.open()
    pop, popping, lost = state._pop, asyncio.Event(), []  # type: ignore[attr-defined]

    async def pop_losing_a_cancellation(keys: list[str], what: str) -> Any:
        popping.set()
        try:
            return await pop(keys, what)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(keys)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return None

    monkeypatch.setattr(state, "_pop", pop_losing_a_cancellation)
    store = open_store(cassandra_url)
    try:
        store.use_state(state)
        await store.migrate()
        await store.open()
        await asyncio.wait_for(popping.wait(), 10)
        await asyncio.wait_for(store.close(), 30)
        assert lost
    finally:
        await state.close()
    after = open_store(cassandra_url)  # no shared state: it numbers only what it holds itself
    await after.open()
    try:
        a, b = await two_users(after)
        chat = await after.direct_chat(a, b, T0)
        assert (await after.append_message(text(chat.chat_id, a, "c"), [a, b])).message.seq == 1
    finally:
        await after.close()


async def send_with_an_entry_failing(store: CassandraStore, msg: NewMessage, members: list[str], failing: str) -> None:
    """Send ``msg`` while writing ``failing``'s inbox entry fails: numbered and stored, its caller
    told the store is unavailable, the other members' entries written."""
    from storage.base import StorageUnavailable

    number_soon = store._number_soon

    async def inbox_write_fails() -> tuple[int, bool]:
        raise StorageUnavailable("the recipient's inbox entry was not written")

    def fails_for_one(key: str, values: tuple[Any, ...], ident: Any) -> Awaitable[tuple[int, bool]]:
        return inbox_write_fails() if key == f"u:{failing}" else number_soon(key, values, ident)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(store, "_number_soon", fails_for_one)
        with pytest.raises(StorageUnavailable):
            await store.append_message(msg, members)


async def test_cassandra_a_send_left_incomplete_is_found_by_its_retry_after_the_chat_is_opened_again(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send numbered whose fan-out failed, and whose device_sent record was lost (a crash
    between the two statements of the chat's write): only the chat's writer knows its id. A
    writer opening the chat again remembers the ids of as many of its newest messages as it keeps
    itself, across a bucket's start too, so the retry gets the same seq."""

    monkeypatch.setattr(storage.cassandra, "BUCKET", 100)  # a bucket's start among the messages
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(90):
        await store.append_message(text(chat.chat_id, a, f"before{i}"), [a, b])
    await send_with_an_entry_failing(store, text(chat.chat_id, a, "incomplete"), [a, b], b)
    await store._blocking(store._session.execute, f"DELETE FROM {store.keyspace}.device_sent WHERE device=%s "
                          "AND client_id=%s", (phone_of(a), "incomplete"))
    for i in range(60):  # more than one read of the chat's tail, past the bucket's start at 100
        await store.append_message(text(chat.chat_id, a, f"after{i}"), [a, b])
    store._logs.drop(f"c:{chat.chat_id}")  # opened again, as after a restart
    retried = await store.append_message(text(chat.chat_id, a, "incomplete"), [a, b])
    assert retried.message.seq == 91 and b in retried.inbox


async def test_cassandra_an_inbox_whose_oldest_entries_expired_is_opened_without_reading_below_them(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inbox rows expire (30 days). Opening an inbox whose newest bucket has fewer entries than a
    page of the tail, none of them at the bucket's start, reads that bucket once: the short page
    held all there is of it, so the ids remembered from below come from the bucket before it."""
    monkeypatch.setattr(storage.cassandra, "BUCKET", 100)
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(140):  # b's inbox: 1..140, bucket 1 holding 100..140
        await store.append_message(text(chat.chat_id, a, f"m{i}"), [a, b])
    await store._blocking(store._session.execute, f"DELETE FROM {store.keyspace}.inbox WHERE user_id=%s "
                          "AND bucket=%s AND pos < %s", (b, 1, 130))  # as if 100..129 had expired
    store._logs.drop(f"u:{b}")  # opened again, as after a restart
    x, reads = store._x, []

    async def counted(name: str, *params: Any, **kw: Any) -> list[Any]:
        rows = await x(name, *params, **kw)
        if name.startswith("inbox_tail") and params and params[0] == b:
            reads.append((name, params[1], len(rows)))
        return rows

    monkeypatch.setattr(store, "_x", counted)
    sent = await store.append_message(text(chat.chat_id, a, "after"), [a, b])
    assert sent.inbox[b] == 141
    # the newest page (130..140), then bucket 0 from its top; nothing below 130 in bucket 1
    assert [(name, bucket) for name, bucket, _n in reads] == [("inbox_tail", 1), ("inbox_tail_below", 0)]
    assert reads[1][2] == 99  # all of bucket 0 (fewer than the 256 ids remembered)
    entries = await store.read_inbox(b, 129, 100)
    assert [e.pos for e in entries] == list(range(130, 142))


async def test_cassandra_a_sync_from_below_expired_entries_starts_at_the_oldest_kept(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inbox rows expire (30 days), the oldest first. A device syncing from a position below the
    oldest entry kept (a new device from 0, or one offline that long) gets the entries from the
    oldest kept on, across buckets with none left; a device caught up gets nothing."""
    monkeypatch.setattr(storage.cassandra, "BUCKET", 100)
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    for i in range(250):  # b's inbox: 1..250 in buckets 0, 1 and 2
        await store.append_message(text(chat.chat_id, a, f"m{i}"), [a, b])
    await store.settled()
    drop = f"DELETE FROM {store.keyspace}.inbox WHERE user_id=%s AND bucket=%s"
    await store._blocking(store._session.execute, drop, (b, 0))  # as if 1..129 had expired
    await store._blocking(store._session.execute, drop + " AND pos < %s", (b, 1, 130))
    for held in (True, False):  # the inbox's log open here, then not (its partition elsewhere, or a restart)
        if not held:
            store._logs.drop(f"u:{b}")
        store._entries.clear()
        assert [e.pos for e in await store.read_inbox(b, 0, 50)] == list(range(130, 180))
        assert [e.pos for e in await store.read_inbox(b, 140, 500)] == list(range(141, 251))
        assert [e.pos for e in await store.read_inbox(b, 129, 3)] == [130, 131, 132]
        assert await store.read_inbox(b, 250, 10) == []
    await store._blocking(store._session.execute, drop, (b, 1))  # and then 130..204: a bucket with none left
    await store._blocking(store._session.execute, drop + " AND pos < %s", (b, 2, 205))
    assert [e.pos for e in await store.read_inbox(b, 17, 3)] == [205, 206, 207]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_send_left_open_is_completed_by_its_retry_however_many_messages_came_after(
        cassandra_url: str, writes: str) -> None:
    """The chat's writer records where a send was numbered beside the message: a retry of a send
    whose fan-out failed gets its seq and completes the fan-out even after more later messages
    than any writer remembers the ids of (the chat's log opened again meanwhile), writing only
    the entries that were missing, also when two repeats come at once; on the loop's own
    connection and through the driver alike."""
    from storage.cassandra_owner import RECENT_IDS

    store = open_store(f"{cassandra_url}?writes={writes}")
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        assert (store._wire is None) == (writes == "driver")
        a, b = await two_users(store)
        chat = await store.direct_chat(a, b, T0)
        await send_with_an_entry_failing(store, text(chat.chat_id, a, "open"), [a, b], b)
        later = RECENT_IDS + 20
        await asyncio.gather(*(store.append_message(text(chat.chat_id, b, f"later{i}"), [a, b])
                               for i in range(later)))
        store._logs.drop(f"c:{chat.chat_id}")  # opened again, as after a restart
        store._unsent.clear()
        # two repeats at once (a device resending while its first resend is under way)
        retried, twice = await asyncio.gather(*(store.append_message(text(chat.chat_id, a, "open"), [a, b])
                                                for _ in range(2)))
        assert retried.message == twice.message and retried.message.seq == 1 and retried.message.client_id == "open"
        # b's entry written once, a's not again (it was written the first time)
        assert sorted([*retried.inbox, *twice.inbox]) == [b] and retried.duplicate != twice.duplicate
        assert (await store.get_chat(chat.chat_id)).last_seq == later + 1  # type: ignore[union-attr]
        for user in (a, b):
            entries = await store.read_inbox(user, 0, later + 10)
            assert [e.item.seq for e in entries if isinstance(e.item, Message) and e.item.seq == 1] == [1]
        assert await store.find_sent(phone_of(a), "open") == retried.message
        await store.settled()
        assert await store._x("get_sent", phone_of(a), "open") == [(chat.chat_id, 1, chat.chat_id, 1)]
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _own_store(cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[tuple[CassandraStore, str, str, Chat]]:
    """A store of the test's own writing one way (``direct`` or ``driver``), two users and their
    chat; afterwards what the test patched is undone and the store closed (unless it was)."""
    store = open_store(f"{cassandra_url}?writes={writes}")
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        a, b = await two_users(store)
        yield store, a, b, await store.direct_chat(a, b, T0)
    finally:
        monkeypatch.undo()
        if not store._closed:
            await store.close()


async def _until(check: Callable[[], bool], what: str, seconds: float = 3.0) -> None:
    for _ in range(int(seconds * 100)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds} s: {what}")


def _records_failing(store: CassandraStore, writes: str, monkeypatch: pytest.MonkeyPatch, *,
                     record: str = "open_sent", wrong: bool = False, rows_too: bool = False) -> Callable[[], int]:
    """Every write of a send's ``record`` (``open_sent``, written before the chat's rows, or
    ``put_sent``, written behind once the send is complete; with ``rows_too``, of a chat's rows
    as well) fails until ``monkeypatch.undo()``. On the loop's own connection the server refuses
    it: asked at consistency TWO of a keyspace with one replica, it answers "unavailable" (as when
    replicas are down); with ``wrong``, at SERIAL, it answers that the request is invalid. Through
    the driver the store's call fails the same ways. Returns how many record writes were tried."""
    from cassandra import InvalidRequest

    from storage.base import StorageUnavailable

    failing = {record} | ({"put_msg", "put_msg_full"} if rows_too else set())
    if writes == "direct":
        for name in failing:
            query_id, _ = store._wire_ok[name]
            monkeypatch.setitem(store._wire_ok, name, (query_id, 0x0008 if wrong else 0x0002))
        before = store.ops.by_name.get(record, 0)
        return lambda: store.ops.by_name.get(record, 0) - before
    x = store._x
    tried = [0]

    async def record_fails(name: str, *params: Any, statement: Any = None) -> list[Any]:
        if name not in failing:
            return await x(name, *params, statement=statement)
        tried[0] += name == record
        if wrong:
            raise StorageUnavailable(f"cassandra {name}: refused") from InvalidRequest("refused")
        raise StorageUnavailable(f"{name}: its partition did not answer")

    monkeypatch.setattr(store, "_x", record_fails)
    return lambda: tried[0]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_sends_open_record_that_fails_holds_back_the_chats_rows_until_it_lands(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat's rows go out only once the records of where their sends were numbered have landed
    (the record lives in the sender's device_sent partition, the row in the chat's): while the
    record fails, nothing of the chat is stored and its caller is told the store is unavailable;
    the chat's log writes record and row again, keeping the number (a send numbered into that
    batch is told the same, and stored with it). A retry of the send then gets its seq and
    completes the fan-out however many messages the chat had since, the chat's writer opened
    again meanwhile."""
    from storage.base import StorageUnavailable
    from storage.cassandra_owner import RECENT_IDS

    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        tries = _records_failing(store, writes, monkeypatch)
        with pytest.raises(StorageUnavailable):
            await store.append_message(text(chat.chat_id, a, "held"), [a, b])
        with pytest.raises(StorageUnavailable):  # (numbered into the batch written again)
            await store.append_message(text(chat.chat_id, b, "behind"), [a, b])
        await _until(lambda: tries() >= 3, "the chat's log writing its batch again", 15.0)
        assert await store.history(chat.chat_id, None, 10) == []
        assert await store._x("get_sent", phone_of(a), "held") == []
        monkeypatch.undo()
        log_ = store._logs.get(f"c:{chat.chat_id}")
        await _until(lambda: log_ is not None and not log_.busy(), "the chat's batch written", 15.0)
        assert [m.client_id for m in await store.history(chat.chat_id, None, 10)] == ["behind", "held"]
        assert await store._x("get_sent", phone_of(a), "held") == [(None, None, chat.chat_id, 1)]
        assert (await store.append_message(text(chat.chat_id, b, "behind"), [a, b])).message.seq == 2
        later = RECENT_IDS + 20
        await asyncio.gather(*(store.append_message(text(chat.chat_id, b, f"later{i}"), [a, b])
                               for i in range(later)))
        store._logs.drop(f"c:{chat.chat_id}")  # as after a restart
        store._unsent.clear()
        retried = await store.append_message(text(chat.chat_id, a, "held"), [a, b])
        assert retried.message.seq == 1 and retried.message.client_id == "held" and set(retried.inbox) == {a, b}
        assert (await store.get_chat(chat.chat_id)).last_seq == 2 + later  # type: ignore[union-attr]
        for user in (a, b):
            entries = await store.read_inbox(user, 0, later + 10)
            assert [e.item.seq for e in entries if isinstance(e.item, Message) and e.item.client_id == "held"] == [1]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_send_whose_record_never_landed_is_numbered_once_after_the_writer_forgot_it(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No message row is stored without its send's record: when the send's records keep failing
    and the process ends (as in a crash), nothing of the send was stored, so its retry, coming to the
    next holder of the chat after more later messages than any writer remembers the ids of, is
    numbered once and the chat holds that message once."""
    from storage.base import StorageUnavailable
    from storage.cassandra_owner import RECENT_IDS

    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        _records_failing(store, writes, monkeypatch)
        _records_failing(store, writes, monkeypatch, record="put_sent")
        with contextlib.suppress(StorageUnavailable):  # (told so: the test before this one)
            await store.append_message(text(chat.chat_id, a, "lost"), [a, b])
        await asyncio.sleep(0.3)  # (its log writing it again meanwhile)
        await store.close()
        monkeypatch.undo()
    store = open_store(f"{cassandra_url}?writes={writes}")
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        later = RECENT_IDS + 20
        await asyncio.gather(*(store.append_message(text(chat.chat_id, b, f"later{i}"), [a, b])
                               for i in range(later)))
        retried = await store.append_message(text(chat.chat_id, a, "lost"), [a, b])
        again = await store.append_message(text(chat.chat_id, a, "lost"), [a, b])
        assert again.message.seq == retried.message.seq and again.duplicate
        history = await store.history(chat.chat_id, None, later + 10)
        assert [m.seq for m in history if m.client_id == "lost"] == [later + 1] == [retried.message.seq]
        assert [m.seq for m in history] == list(range(later + 1, 0, -1))
    finally:
        await store.close()


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_rows_do_not_go_out_once_the_lease_ended_while_their_records_were_written(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row takes its Cassandra timestamp when it is sent, and a newer holder's row at the same
    number must win over it: so a chat's rows, which wait for their records, go out only if the
    lease under which they were numbered still holds then. When it ended meanwhile, the caller
    is told the store is unavailable and nothing of the chat is stored; its retry, once the
    partition is held again, is numbered anew."""
    from storage.base import StorageUnavailable

    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        assert store._leases is not None
        valid, count = store._leases.valid, store._count
        ended = [False]

        def ends_with_the_record(name: str) -> None:  # (counted as it is sent)
            ended[0] = ended[0] or name == "open_sent"
            count(name)

        monkeypatch.setattr(store._leases, "valid", lambda part, epoch: not ended[0] and valid(part, epoch))
        monkeypatch.setattr(store, "_count", ends_with_the_record)
        with pytest.raises(StorageUnavailable):
            await store.append_message(text(chat.chat_id, a, "late"), [a, b])
        assert await store._x("get_sent", phone_of(a), "late") == [(None, None, chat.chat_id, 1)]
        assert await store.history(chat.chat_id, None, 10) == []
        monkeypatch.undo()
        retried = await store.append_message(text(chat.chat_id, a, "late"), [a, b])
        assert retried.message.seq == 1 and set(retried.inbox) == {a, b}
        assert [m.client_id for m in await store.history(chat.chat_id, None, 10)] == ["late"]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_complete_record_that_fails_is_written_again_until_it_lands(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record that a send is complete is written behind the reply: when it fails, the send is
    answered all the same and the record is written again until it lands; meanwhile a retry
    finds the send open and is answered with its seq, storing nothing new."""
    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        _records_failing(store, writes, monkeypatch, record="put_sent")
        sent = [await store.append_message(text(chat.chat_id, a, f"rec{i}"), [a, b]) for i in range(3)]
        assert [r.message.seq for r in sent] == [1, 2, 3] and all(b in r.inbox for r in sent)
        await _until(lambda: store._retrying_behind == 3, "the three records written again")
        store._sent_here.clear()  # (as in another process)
        store._unsent.clear()
        retried = await store.append_message(text(chat.chat_id, a, "rec0"), [a, b])
        assert retried.message.seq == 1 and retried.duplicate and not retried.inbox
        await asyncio.sleep(0.5)  # (failing again meanwhile)
        monkeypatch.undo()
        await store.settled()
        assert store._retrying_behind == 0
        assert await store._x("get_sent", phone_of(a), "rec2") == [(chat.chat_id, 3, chat.chat_id, 3)]
        assert (await store.get_chat(chat.chat_id)).last_seq == 3  # type: ignore[union-attr]


async def test_cassandra_a_send_whose_complete_record_was_lost_is_not_fanned_out_twice(
        cassandra_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send fanned out in full whose complete record never landed (its process ended while the
    record failed): its retry in another process finds it open and completes it, and a member
    whose inbox has had more entries since than its writer remembers, and who has the entry, does
    not get it a second time; nor does the sender."""
    from storage.cassandra_owner import RECENT_IDS

    async with _own_store(cassandra_url, "direct", monkeypatch) as (store, a, b, chat):
        _records_failing(store, "direct", monkeypatch, record="put_sent")
        first = await store.append_message(text(chat.chat_id, a, "twice"), [a, b])
        assert first.message.seq == 1 and set(first.inbox) == {a, b}
        await store.close()  # (the complete record given up)
        monkeypatch.undo()
    store = open_store(cassandra_url)
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        assert await store._x("get_sent", phone_of(a), "twice") == [(None, None, chat.chat_id, 1)]
        c = (await store.create_user(phone(), T0)).user_id
        other = await store.direct_chat(c, b, T0)
        later = RECENT_IDS + 20
        for i in range(later):  # (one at a time: b's inbox, opened here, forgets the first entry)
            await store.append_message(text(other.chat_id, c, f"later{i}"), [c, b])
        retried = await store.append_message(text(chat.chat_id, a, "twice"), [a, b])
        assert retried.message.seq == 1 and retried.duplicate and not retried.inbox
        for user in (a, b):
            entries = await store.read_inbox(user, 0, later + 10)
            assert [e.pos for e in entries if isinstance(e.item, Message) and e.item.chat_id == chat.chat_id] \
                == [first.inbox[user]]
        await store.settled()
        assert await store._x("get_sent", phone_of(a), "twice") == [(chat.chat_id, 1, chat.chat_id, 1)]
    finally:
        await store.close()


async def test_cassandra_a_repeats_read_back_stops_at_the_entries_written_before_its_message(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back of a repeat's fan-out covers only what a member's inbox got since the message
    was accepted: past the entries written before it, it stops, and a member who lacks the entry
    gets it. (The clocks' margin is taken as none here: the test's writes are all one clock's.)"""
    from storage.cassandra_owner import RECENT_IDS

    monkeypatch.setattr(storage.cassandra, "INBOX_SINCE_SKEW_US", 0)
    store = cassandra
    a, b = await two_users(store)
    c = (await store.create_user(phone(), T0)).user_id
    chat, other = await store.direct_chat(a, b, T0), await store.direct_chat(c, b, T0)
    for i in range(600):  # (before the message: not read)
        await store.append_message(text(other.chat_id, c, f"before{i}"), [c, b])
    await asyncio.sleep(0.01)
    now = int(time.time() * 1000)
    await send_with_an_entry_failing(store, text(chat.chat_id, a, "lacking", ts=now), [a, b], b)
    later = RECENT_IDS + 20
    for i in range(later):
        await store.append_message(text(other.chat_id, c, f"after{i}"), [c, b])
    store._logs.drop(f"u:{b}")  # (as in another process: b's writer remembers none of it)
    store._logs.drop(f"u:{a}")
    store._fanned.clear()
    store._unsent.clear()
    reads = store.ops.by_name.get("inbox_since", 0)
    retried = await store.append_message(text(chat.chat_id, a, "lacking", ts=now), [a, b])
    assert retried.message.seq == 1 and list(retried.inbox) == [b]
    # b's pages (50, 200, 500) read the later entries and stop at the first written before (one
    # more page would read on through the 600 before them); a's entry is its newest (one page)
    assert store.ops.by_name.get("inbox_since", 0) - reads == 4
    entries = await store.read_inbox(b, 0, 2 * later + 700)
    assert [e.item.client_id for e in entries if isinstance(e.item, Message) and e.item.chat_id == chat.chat_id] \
        == ["lacking"]


async def test_cassandra_a_repeat_joins_inbox_entries_still_being_written_rather_than_skipping_them(
        cassandra_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeat of a send whose members' entries are still being written (their writes failing)
    waits for those writes like the first attempt: it is told the store is unavailable too, not
    answered with the send recorded complete before any entry is stored; once they land, a
    repeat is answered with nothing written again."""
    from storage.base import StorageUnavailable

    async with _own_store(cassandra_url, "direct", monkeypatch) as (store, a, b, chat):
        _records_failing(store, "direct", monkeypatch, record="put_inbox")
        with pytest.raises(StorageUnavailable):
            await store.append_message(text(chat.chat_id, a, "pending"), [a, b])
        with pytest.raises(StorageUnavailable):
            await store.append_message(text(chat.chat_id, a, "pending"), [a, b])
        assert await store._x("get_sent", phone_of(a), "pending") == [(None, None, chat.chat_id, 1)]
        monkeypatch.undo()
        for user in (a, b):
            log_ = store._logs.get(f"u:{user}")
            await _until(lambda: log_ is not None and not log_.busy(), "the entries written", 15.0)  # noqa: B023
        retried = await store.append_message(text(chat.chat_id, a, "pending"), [a, b])
        assert retried.message.seq == 1 and retried.duplicate and not retried.inbox
        for user in (a, b):
            entries = await store.read_inbox(user, 0, 10)
            assert [e.item.client_id for e in entries if isinstance(e.item, Message)] == ["pending"]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_record_that_keeps_failing_is_given_up_past_the_bound_and_at_close(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Records written again are bounded: past RETRYING_BEHIND_MAX of them at once, one more
    that fails is given up at once; and closing the store wakes each from its pause to try it
    once more, then gives it up rather than waiting for Cassandra."""
    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        monkeypatch.setattr(storage.cassandra, "RETRYING_BEHIND_MAX", 1)
        monkeypatch.setattr(storage.cassandra, "AGAIN_S", (60.0, 60.0))  # woken only by the close
        _records_failing(store, writes, monkeypatch, record="put_sent")
        with caplog.at_level(logging.INFO, logger="storage.cassandra"):
            await store.append_message(text(chat.chat_id, a, "kept"), [a, b])
            await _until(lambda: store._retrying_behind == 1, "the first record written again")
            await store.append_message(text(chat.chat_id, a, "dropped"), [a, b])
            await _until(lambda: "failed, given up:" in caplog.text and store._behind == 1,
                         "the second record given up, every other write behind answered")
            assert store._retrying_behind == 1
            began = time.monotonic()
            await store.close()
            assert time.monotonic() - began < 30  # (its pause was 60 s)
            assert store._behind == 0 and store._retrying_behind == 0
            assert "given up at close after 2 tries" in caplog.text


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_a_record_cassandra_refuses_as_wrong_is_not_written_again(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only a write that may land later is written again: a complete record Cassandra refused as
    invalid is given up at once (logged), and the send it records is answered all the same."""
    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        tries = _records_failing(store, writes, monkeypatch, record="put_sent", wrong=True)
        with caplog.at_level(logging.INFO, logger="storage.cassandra"):
            sent = await store.append_message(text(chat.chat_id, a, "wrong"), [a, b])
            await _until(lambda: store._behind == 0, "every write behind answered")
            await asyncio.sleep(0.5)  # (no later try either)
        assert sent.message.seq == 1 and "failed, given up:" in caplog.text and store._retrying_behind == 0
        assert "writing it again" not in caplog.text and tries() == 1
        monkeypatch.undo()
        assert await store._x("get_sent", phone_of(a), "wrong") == [(None, None, chat.chat_id, 1)]


@pytest.mark.parametrize("writes", ["direct", "driver"])
async def test_cassandra_rows_that_fail_after_their_records_landed_are_written_again_with_them(
        cassandra_url: str, writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a chat's rows fail after their records landed, the chat's log writes records and rows
    again itself (nothing is handed to the writes behind), and a retry once they landed gets the
    send's seq and completes it."""
    from storage.base import StorageUnavailable

    async with _own_store(cassandra_url, writes, monkeypatch) as (store, a, b, chat):
        rows_tried = _records_failing(store, writes, monkeypatch, record="put_msg", rows_too=True)
        records_before = store.ops.by_name.get("open_sent", 0)
        with pytest.raises(StorageUnavailable):
            await store.append_message(text(chat.chat_id, a, "both"), [a, b])
        await _until(lambda: rows_tried() >= 2, "the chat's log writing its batch again", 15.0)
        assert store.ops.by_name.get("open_sent", 0) - records_before >= 2  # each try wrote the record first
        assert store._retrying_behind == 0 and store._behind == 0
        assert await store._x("get_sent", phone_of(a), "both") == [(None, None, chat.chat_id, 1)]
        monkeypatch.undo()
        # (a try sent before the undo may still fail, and with it a retry that joined it)
        log_ = store._logs.get(f"c:{chat.chat_id}")
        await _until(lambda: log_ is not None and not log_.busy(), "the chat's batch written", 15.0)
        retried = await store.append_message(text(chat.chat_id, a, "both"), [a, b])
        assert retried.message.seq == 1 and set(retried.inbox) == {a, b}
        await store.settled()
        assert await store._x("get_sent", phone_of(a), "both") == [(chat.chat_id, 1, chat.chat_id, 1)]
        assert (await store.get_chat(chat.chat_id)).last_seq == 1  # type: ignore[union-attr]


async def test_cassandra_an_open_send_whose_id_comes_again_for_another_chat_completes_in_its_own(
        cassandra: CassandraStore) -> None:
    """A send id is the device's for one send: when it comes again naming another chat while
    the first send is open, the first send's fan-out is completed among its own chat's members,
    and nothing goes to the other chat."""
    store = cassandra
    a, b = await two_users(store)
    c = (await store.create_user(phone(), T0)).user_id
    first, other = await store.direct_chat(a, b, T0), await store.direct_chat(a, c, T0)
    await send_with_an_entry_failing(store, text(first.chat_id, a, "reused"), [a, b], b)
    again = await store.append_message(text(other.chat_id, a, "reused"), [a, c])
    assert again.message.chat_id == first.chat_id and again.message.seq == 1 and set(again.inbox) == {b}
    assert await store.read_inbox(c, 0, 10) == []
    assert (await store.get_chat(other.chat_id)).last_seq == 0  # type: ignore[union-attr]


async def test_cassandra_a_send_whose_complete_record_was_lost_is_answered_by_its_retry_storing_nothing(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record of a complete send is written after every member's entry, without the reply
    waiting for it; when it never landed (a crash), a retry finds the send open and completes a
    fan-out that was complete, storing nothing new, without asking the chat's writer."""
    from storage.base import StorageUnavailable

    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    first = await store.append_message(text(chat.chat_id, a, "lost"), [a, b])
    await store.settled()
    assert await store._x("get_sent", phone_of(a), "lost") == [(chat.chat_id, 1, chat.chat_id, 1)]
    await store._blocking(store._session.execute, f"DELETE chat_id, seq FROM {store.keyspace}.device_sent "
                          "WHERE device=%s AND client_id=%s", (phone_of(a), "lost"))
    store._sent_here.clear()  # as after a restart
    number = store._number

    async def no_chat_numbering(key: str, values: tuple[object, ...], ident: object) -> tuple[int, bool]:
        if key.startswith("c:"):
            raise StorageUnavailable("the chat's writer was asked")
        return await number(key, values, ident)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_number", no_chat_numbering)
    retried = await store.append_message(text(chat.chat_id, a, "lost"), [a, b])
    assert retried.duplicate and retried.inbox == {} and retried.message == first.message
    assert [e.pos for e in await store.read_inbox(b, 0, 10)] == [1]
    assert (await store.get_chat(chat.chat_id)).last_seq == 1  # type: ignore[union-attr]
    await store.settled()
    assert await store._x("get_sent", phone_of(a), "lost") == [(chat.chat_id, 1, chat.chat_id, 1)]


async def test_cassandra_plain_writes_go_out_on_the_loops_own_connection(cassandra: CassandraStore) -> None:
    """Unconditional writes and unlogged batches go on the event loop's own native-protocol
    connection (storage/cql_wire.py), and what they wrote reads back through the driver."""
    store = cassandra
    wire = store._wire
    assert wire is not None, "the store opened no write connection of its own"
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    before = wire.sent
    await store.set_user_name(a, "Ann")
    sent = await asyncio.gather(*(store.append_message(text(chat.chat_id, a, f"w{i}"), [a, b]) for i in range(20)))
    assert wire.sent > before + 20  # messages, inbox entries (single and batched), send records
    assert (await store.get_user(a)).name == "Ann"  # type: ignore[union-attr]
    assert [m.seq for m in await store.history(chat.chat_id, None, 50)] == list(range(20, 0, -1))
    inbox = [e.item.seq for e in await store.read_inbox(b, 0, 50) if isinstance(e.item, Message)]
    assert sorted(inbox) == [s.message.seq for s in sorted(sent, key=lambda s: s.message.seq)]
    assert all(await asyncio.gather(*(store.find_sent(phone_of(a), f"w{i}") for i in range(20))))
    assert store._results is not None and not store._results._waiting  # nothing answered is held on to


async def test_cassandra_write_the_server_does_not_know_is_prepared_again_by_the_driver(
        cassandra: CassandraStore) -> None:
    """A restarted Cassandra forgets prepared statements and answers "unprepared": the write
    then goes through the driver, which prepares it again, and lands once."""
    store = cassandra
    a, _b = await two_users(store)
    driver_before = store.ops.by_name.get("set_name", 0)
    store._wire_ok["set_name"] = (b"\x13" * 16, store._wire_ok["set_name"][1])  # an id the server never saw
    await store.set_user_name(a, "Bea")
    assert (await store.get_user(a)).name == "Bea"  # type: ignore[union-attr]
    assert store.ops.by_name["set_name"] == driver_before + 2  # the refused try, then the driver's


async def test_cassandra_write_refused_by_the_server_is_unavailable_with_its_reason(
        cassandra: CassandraStore) -> None:
    from storage.base import StorageUnavailable

    store = cassandra
    a, _b = await two_users(store)
    # set_name's two values bound to a statement that takes more: the server refuses it
    store._wire_ok["set_name"] = store._wire_ok["put_msg"]
    with pytest.raises(StorageUnavailable, match=r"set_name: error 0x2200"):
        await store.set_user_name(a, "Cy")
    assert (await store.get_user(a)).name == ""  # type: ignore[union-attr]


async def test_cassandra_write_connection_lost_fails_what_was_in_flight_then_the_driver_carries_writes(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write in flight when the connection drops fails as unavailable (it may or may not have
    landed, as with the driver); the next writes go through the driver; the connection is
    opened again a moment later and carries writes again."""
    from storage.base import StorageUnavailable

    monkeypatch.setattr(storage.cassandra, "WIRE_RETRY_S", 0.2)
    store = cassandra
    a, _b = await two_users(store)
    wire = store._wire
    assert wire is not None
    in_flight = asyncio.create_task(store._x("set_name", "lost?", a))
    await asyncio.sleep(0)  # queued on the connection
    assert wire._transport is not None
    wire._transport.abort()
    with pytest.raises(StorageUnavailable, match="may still land"):
        await in_flight
    assert store._wire is None
    await store.set_user_name(a, "Dee")  # the driver
    assert (await store.get_user(a)).name == "Dee"  # type: ignore[union-attr]
    for _ in range(100):
        if store._wire is not None:
            break
        await asyncio.sleep(0.05)
    again = store._wire
    assert again is not None and again is not wire
    await store.set_user_name(a, "Eve")
    assert again.sent == 1
    assert (await store.get_user(a)).name == "Eve"  # type: ignore[union-attr]


async def test_cassandra_loops_connection_keeps_a_window_of_statements_in_flight_and_the_rest_in_order(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most WINDOW statements wait on Cassandra from the loop's own connection; the others
    wait in the bridge, go out in order as answers come, and one whose caller gave up meanwhile
    is never sent."""
    import storage.cql_wire

    monkeypatch.setattr(storage.cql_wire, "WINDOW", 4)
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    wire = store._wire
    assert wire is not None
    in_flight: list[int] = []
    held: list[int] = []
    watching = True

    async def watch() -> None:
        while watching:
            in_flight.append(wire.in_flight)
            held.append(wire.held)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    sends = [asyncio.create_task(store.append_message(text(chat.chat_id, a, f"k{i}"), [a, b])) for i in range(30)]
    for _ in range(20):
        await asyncio.sleep(0)
        if wire.held:
            break
    assert wire.held > 0, "30 messages at once and nothing waited for the window"
    given_up = asyncio.create_task(store._x("set_name", "never", a))
    await asyncio.sleep(0)
    assert wire.held > 0
    given_up.cancel()
    done = await asyncio.gather(*sends)
    await store.settled()  # the sends' records, written after their replies
    watching = False
    await watcher
    assert max(in_flight) <= 4 and max(held) > 0, (max(in_flight), max(held))
    assert wire.in_flight == 0 and wire.held == 0
    assert sorted(d.message.seq for d in done) == list(range(1, 31))
    assert [m.seq for m in await store.history(chat.chat_id, None, 50)] == list(range(30, 0, -1))
    assert (await store.get_user(a)).name != "never"  # type: ignore[union-attr]


async def test_cassandra_point_reads_of_the_message_path_go_on_the_loops_own_connection(
        cassandra: CassandraStore) -> None:
    """A send id's record and a message are read on the event loop's own connection, and the rows
    decoded there are the rows the driver reads (nulls, text, numbers, a media reference)."""
    store = cassandra
    wire = store._wire
    assert wire is not None
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    await store.append_message(text(chat.chat_id, a, "r1"), [a, b])
    media = MediaRef(key="k/1", mime="image/png", size=3, sha256="ab" * 32, name="p.png")
    pic = NewMessage(chat_id=chat.chat_id, sender=a, device=phone_of(a), client_id="r2", ts=T0 + 1, kind="media",
                     body=None, media=media)
    await store.append_message(pic, [a, b])
    await store.settled()  # the records of the complete sends
    reads = wire.reads
    on_wire = [await store._x("get_sent", phone_of(a), "r1"), await store._x("get_sent", phone_of(a), "nothing"),
               await store._x("message", chat.chat_id, 0, 1), await store._x("message", chat.chat_id, 0, 2)]
    assert wire.reads == reads + 4
    held, store._wire_reads = store._wire_reads, {}
    try:
        by_driver = [await store._x("get_sent", phone_of(a), "r1"), await store._x("get_sent", phone_of(a), "nothing"),
                     await store._x("message", chat.chat_id, 0, 1), await store._x("message", chat.chat_id, 0, 2)]
    finally:
        store._wire_reads = held
    assert wire.reads == reads + 4
    assert on_wire == [[tuple(r) for r in rows] for rows in by_driver]
    assert on_wire[1] == [] and on_wire[0] == [(chat.chat_id, 1, chat.chat_id, 1)]
    found = await store.find_sent(phone_of(a), "r2")
    assert found is not None and found.media == media and found.body is None and found.seq == 2


async def test_cassandra_read_the_server_does_not_know_or_whose_connection_drops_is_asked_through_the_driver(
        cassandra: CassandraStore) -> None:
    """A read on the loop's own connection that the server answers "unprepared", or whose
    connection ends before the answer, is asked again through the driver: a read changes nothing,
    so the caller gets its rows rather than an error."""
    store = cassandra
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    await store.append_message(text(chat.chat_id, a, "u1"), [a, b])
    await store.settled()  # its record, written after the reply
    query_id, consistency, types = store._wire_reads["get_sent"]
    store._wire_reads["get_sent"] = (b"\x13" * 16, consistency, types)
    try:
        before = store.ops.by_name.get("get_sent", 0)
        assert await store._x("get_sent", phone_of(a), "u1") == [(chat.chat_id, 1, chat.chat_id, 1)]
        assert store.ops.by_name["get_sent"] == before + 2  # the refused try, then the driver's
    finally:
        store._wire_reads["get_sent"] = (query_id, consistency, types)
    wire = store._wire
    assert wire is not None
    reading = asyncio.create_task(store._x("get_sent", phone_of(a), "u1"))
    await asyncio.sleep(0)  # queued on the connection
    assert wire._transport is not None
    wire._transport.abort()
    assert [tuple(r) for r in await reading] == [(chat.chat_id, 1, chat.chat_id, 1)]


@pytest.mark.parametrize("read", ["get_chat", "user_chats"])
async def test_cassandra_a_chats_members_are_as_new_as_its_last_seq(
        cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """A description of a chat read at last_seq N lists every member whose ``member_added`` message
    is at or below N: a client keeps, of two descriptions, the one with the higher last_seq (the web
    page does, issue 14). Here a member is added while the description is read, at the worst moment
    for it: its members are read at once but answered after the addition, its seq read after it."""
    store = cassandra
    a, b = await two_users(store)
    c = (await store.create_user(phone(), T0)).user_id
    g = await store.create_group(a, "book club", [b], T0)
    created = NewMessage(chat_id=g.chat_id, sender=a, device=phone_of(a), client_id=None, ts=T0, kind="system",
                         event="created")
    assert (await store.append_message(created, [a, b])).message.seq == 1
    x = store._x
    started, changed = asyncio.Event(), asyncio.Event()
    seq_reads = {"fence_get": f"c:{g.chat_id}", "chat_head": g.chat_id, "chat_tail": g.chat_id}

    async def worst_moment(name: str, *params: Any, **kw: Any) -> list[Any]:
        if changed.is_set() or not params:
            return await x(name, *params, **kw)
        if seq_reads.get(name) == params[0]:  # the seq is read after the addition
            started.set()
            await changed.wait()
            return await x(name, *params, **kw)
        rows = await x(name, *params, **kw)
        if name == "members" and params[0] == g.chat_id:  # the members as they were, answered after it
            started.set()
            await changed.wait()
        return rows

    monkeypatch.setattr(store, "_x", worst_moment)
    reading = asyncio.create_task(store.get_chat(g.chat_id) if read == "get_chat" else store.user_chats(a))
    await asyncio.wait_for(started.wait(), 10)
    monkeypatch.setattr(store, "_x", x)  # the addition's own statements go straight through
    assert await store.add_member(g.chat_id, c, "member", T0)
    added = replace(created, event="member_added", target=c)
    assert (await store.append_message(added, [a, b, c])).message.seq == 2
    changed.set()
    got = await asyncio.wait_for(reading, 10)
    desc = got if not isinstance(got, list) else next(ch for ch in got if ch.chat_id == g.chat_id)
    assert desc is not None
    assert desc.last_seq < 2 or c in desc.member_ids, (desc.last_seq, desc.member_ids)


async def test_a_device_keeps_the_protocol_it_reads_and_the_user_whether_any_reads_v1(store: Store) -> None:
    u = await store.create_user(phone(), T0)
    assert await store.reads_v1(u.user_id) is False  # no device: nobody reads
    d2 = await store.add_device(u.user_id, "phone", "android", T0, proto=2)
    assert d2.proto == 2 and await store.get_device(d2.device_id) == d2
    assert await store.reads_v1(u.user_id) is False
    d1 = await store.add_device(u.user_id, "cli", "linux", T0 + 1)
    assert d1.proto == 1 and [d.proto for d in await store.user_devices(u.user_id)] == [2, 1]
    assert await store.reads_v1(u.user_id) is True
    assert await store.remove_device(d1.device_id)
    assert await store.reads_v1(u.user_id) is False


async def test_cassandra_values_are_serialised_exactly_as_the_drivers_bind_does(cassandra: CassandraStore) -> None:
    """The loop's own connection serialises a statement's values itself (storage/cql_wire.py,
    ``Binder``): byte for byte what the driver's ``bind`` gives for every kind of column the
    message path writes, nulls and unset values included; a short list is padded with unset
    values, and a value of the wrong type, too many values or an unset key is refused with the
    column named, before anything is sent."""
    store = cassandra
    unset = store._unset
    samples: dict[str, tuple[Any, ...]] = {
        "put_inbox": ("u1", 0, 17, 3, "c1", 12, "r1", "u2", "d1", T0, "text", "héllo ✓", unset, None, unset,
                      unset, unset, unset),
        "put_msg": ("c1", 0, 5, 2, "r1", "u2", "d1", T0, "media", None, '{"key": "k/1"}', None, unset),
        "set_dev_ack": (T0 * 1000, 41, "d1"),
        "put_sent": ("d1", "r1", "c1", 2**40),
        "put_code": ("+15550001", "ab" * 32, T0, 0, None, 600),
        "get_sent": ("d1", "r1"),
    }
    for name, values in samples.items():
        ps = store._ps[name]
        assert store._binders[name](values) == ps.bind(values).values, name
    for name in ("put_inbox", "put_msg"):  # short: padded with unset
        short = samples[name][:-3]
        assert store._binders[name](short) == store._ps[name].bind(short).values == [
            *store._binders[name](short)[:-3], unset, unset, unset]
    with pytest.raises(TypeError, match="'pos'"):
        store._binders["put_inbox"](("u1", 0, "seventeen"))
    with pytest.raises(ValueError, match="too many"):
        store._binders["get_sent"](("d1", "r1", "extra"))
    for short in ((unset, "r1"), ("d1",)):  # a key left unset
        with pytest.raises(ValueError, match="routing key"):
            store._binders["get_sent"](short)
        with pytest.raises(ValueError, match="routing key"):
            store._ps["get_sent"].bind(short)
    wire = store._wire
    assert wire is not None
    sent = wire.sent
    with pytest.raises(storage.cassandra.StorageUnavailable, match="'seq'"):
        await store._x("put_sent", "d1", "r1", "c1", "not a number")
    assert wire.sent == sent
    assert await store._x("get_sent", "d1", "r1") == []


def _credentials_of(url: str) -> tuple[str, str]:
    """The password the test Cassandra asks for (scripts/services starts it with one)."""
    creds = cassandra_credentials(url)
    if creds is None:
        message = "the Cassandra given in PIGEON_STORE asks for no password (scripts/services starts one that does)"
        if os.environ.get("PIGEON_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return creds


async def _a_message_on_the_own_connection(store: CassandraStore, send_id: str) -> None:
    """A message sent through ``store`` goes out on the loop's own connection and is read back
    from the recipient's inbox."""
    assert store._wire is not None
    a, b = await two_users(store)
    chat = await store.direct_chat(a, b, T0)
    before = store._wire.sent
    appended = await store.append_message(text(chat.chat_id, a, send_id), [a, b])
    assert store._wire.sent > before
    got = await store.read_inbox(b, 0, 50)
    assert [e.item for e in got if isinstance(e.item, Message)][-1] == appended.message


async def test_cassandra_asks_for_a_password_and_both_connections_log_in(cassandra_url: str) -> None:
    """As a deployment's would, the test Cassandra asks for a password: the driver and the
    loop's own connection both log in with the URL's credentials, and a message's plain writes
    go on that connection (they used to fall back to the driver on such a cluster)."""
    _credentials_of(cassandra_url)
    store = open_store(cassandra_url)
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        await _a_message_on_the_own_connection(store, "through-the-login")
    finally:
        await store.close()


async def test_cassandra_own_connection_logs_in_only_with_the_right_password(cassandra_url: str) -> None:
    from storage.cql_wire import CqlError, CqlWire, WireUnsupported

    user, password = _credentials_of(cassandra_url)
    hosts, port, _keyspace, _creds = cassandra_contact(cassandra_url)

    def open_wire(credentials: tuple[str, str] | None) -> Awaitable[CqlWire]:
        return CqlWire.open(hosts[0], port, object(), lambda: 0, lambda wire: None, credentials=credentials)

    with pytest.raises(WireUnsupported, match="no credentials"):
        await open_wire(None)
    with pytest.raises(CqlError) as refused:
        await open_wire((user, password + "-not"))
    assert refused.value.code == 0x0100  # the protocol's "bad credentials"
    wire = await open_wire((user, password))
    assert wire.usable
    wire.close()


async def test_cassandra_a_refused_login_is_a_clear_error_without_the_password(cassandra_url: str) -> None:
    user, password = _credentials_of(cassandra_url)
    wrong = f"{password}-wrong"
    url = cassandra_url.replace(f"{user}:{password}@", f"{user}:{wrong}@", 1)
    store = open_store(url)
    with pytest.raises(StorageError, match="refused the login") as err:
        await store.open()
    assert wrong not in str(err.value) and password not in str(err.value)


def _through_tls(cassandra_url: str) -> str:
    """The same keyspace as ``cassandra_url``, through TLS (scripts/services: the node's native
    port takes both, PIGEON_STORE_TLS trusting the run's CA)."""
    tls = production_url("PIGEON_STORE_TLS", "cassandras://")
    keyspace = cassandra_contact(cassandra_url)[2]
    base, _, query = tls.partition("?")  # (the query holds a path: split it off first)
    return f"{base.rpartition('/')[0]}/{keyspace}?{query}"


async def test_cassandra_through_tls_on_both_connections(cassandra_url: str) -> None:
    """cassandras:// puts the driver's connections and the loop's own connection through TLS,
    checking the node's certificate against the URL's CA; messages are written and read as ever."""
    store = open_store(_through_tls(cassandra_url))
    assert isinstance(store, CassandraStore)
    await store.open()
    try:
        assert store._wire is not None and store._wire._transport is not None
        assert store._wire._transport.get_extra_info("ssl_object") is not None
        await _a_message_on_the_own_connection(store, "through-tls")
    finally:
        await store.close()


async def test_cassandra_through_tls_without_the_ca_is_a_clear_error(cassandra_url: str) -> None:
    """Without ?ca= the system's CAs are trusted, and the run's own CA is not one of them: the
    store refuses the node at start rather than talking to it unchecked."""
    url = _through_tls(cassandra_url).split("?", 1)[0]
    store = open_store(url)
    with pytest.raises(StorageError, match="TLS to the nodes failed"):
        await store.open()
