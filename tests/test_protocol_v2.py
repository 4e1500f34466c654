"""Protocol v2 means what v1 means: every event a v1 event exists for, encoded as v2 for a
device of the sender and for a device of another member, decodes to the same event; every
request reads as the same typed request as its v1 JSON; malformed v2 is refused."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import BadRequest, ProtocolError, TooLarge, UnknownType
from bridge.outbox import Out, ToDevice, ToUser
from bridge.protocol import (
    Batch,
    ChatMessage,
    MsgEvent,
    PresenceEvent,
    ReceiptEvent,
    Sent,
    TypingEvent,
    WireEvent,
    decode_payload,
    parse_request,
)
from bridge.wire import DeviceKinds, V1Readers, encode_v1, publishes
from bridge.wire_v2 import (
    REQUEST_NUMBERS,
    Unawaited,
    Unresolved,
    decode,
    encode,
    encode_request,
    id_in,
    id_out,
    is_v2,
    parse_request_v2,
)
from bridge.wire_v2 import REQUESTS as V2_REQUESTS
from storage.sqlite import new_id
from tests.test_protocol_events import EVENTS

SENDER, OTHER = "u_a", "u_b"


def clock(event: object) -> int:
    """A device's estimate of the server's clock when a live event comes: a few seconds after its
    time (live events are published as they happen; v2 carries the low 32 bits of their ts)."""
    ts = getattr(getattr(event, "message", event), "ts", None)
    return (ts if isinstance(ts, int) else 1_795_438_173_378) + 2_500


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_v2_event_means_what_its_v1_event_means(event: WireEvent) -> None:
    v1 = decode_payload(encode_v1(event))  # type: ignore[arg-type]
    assert decode(encode(event, SENDER), SENDER, now_ms=clock(event)) == v1  # type: ignore[arg-type]
    assert decode(encode(event, OTHER), OTHER, now_ms=clock(event)) == v1  # type: ignore[arg-type]
    assert is_v2(encode(event, OTHER)) and len(encode(event, OTHER)) < len(encode_v1(event))  # type: ignore[arg-type]


REQUESTS: list[dict[str, Any]] = [
    {"type": "send", "id": "7", "to": "u_b", "body": "hi"},
    {"type": "send", "id": "k1", "chat": "c_1", "media": {"key": "k", "mime": "a/b", "size": 3, "sha256": "a" * 64}},
    {"type": "sync", "id": "2", "after": 10, "limit": 50}, {"type": "sync", "id": "3"},
    {"type": "ack", "up_to": 12}, {"type": "read", "chat": "c_1", "up_to": 4}, {"type": "typing", "chat": "c_1"},
    {"type": "presence", "state": "online", "keepalive": 60}, {"type": "presence", "state": "offline"},
    {"type": "watch", "id": "w", "users": ["u_b", "u_c"], "ttl": 30},
    {"type": "media_upload", "id": "m", "sha256": "b" * 64, "size": 10, "mime": "image/png"},
    {"type": "media_done", "id": "d", "key": "k"}, {"type": "media_url", "id": "g", "key": "k", "chat": "c_1"},
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r["type"])
def test_every_v2_request_reads_as_its_v1_request(request_: dict[str, Any]) -> None:
    raw = encode_request(request_)
    assert is_v2(raw) and not is_v2(json.dumps(request_).encode())
    assert parse_request_v2(raw, 4096) == parse_request(json.dumps(request_).encode(), 4096)


def test_a_short_numeric_request_id_is_read_as_its_digits() -> None:
    req = parse_request_v2(msgpack.packb([2, 17, 0]), 100)
    assert req.id == "17"


@pytest.mark.parametrize(("raw", "error"), [
    (msgpack.packb([99, "x"]), UnknownType),
    (msgpack.packb([1, "id", None, None, "hi"]), BadRequest),  # neither chat nor to
    (msgpack.packb([3, "twelve"]), BadRequest),
    (msgpack.packb([6, "online"]), BadRequest),  # presence state is a boolean in v2
    (msgpack.packb([2, "s", 0, 10, "extra"]), BadRequest),
    (msgpack.packb({"type": "sync"}), BadRequest),
    (b"\x92\xc1", BadRequest),  # not MessagePack
    (msgpack.packb([1, "i", None, "u_b", "x" * 200]), TooLarge),
    (b"\x92\x05\xd7\xfb12345678", BadRequest),  # exts that are no ids: a negative type,
    (b"\x92\x05\xd7\xff12345678", BadRequest),  # a timestamp,
    (msgpack.packb([5, msgpack.ExtType(0x7F, b"12345678")]), BadRequest),  # not a letter
    (msgpack.packb([5, msgpack.ExtType(0, b"12345678")]), BadRequest),
])
def test_malformed_v2_is_refused(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_request_v2(raw, 100)


# -- who gets which version (bridge/wire.py) -------------------------------------------------------
MSG_FROM_A = MsgEvent(5, ChatMessage(chat="c_1", seq=1, id="m1", sender="u_a", device="d_a1", ts=1, kind="text",
                                     body="hi"))


def routes(outs: list[Out], kinds: DeviceKinds, v1_read: Any = None) -> list[tuple[str, str, int]]:
    """Topic, version and QoS of each publish."""
    return [(t, "v2" if is_v2(p) else "v1", q) for t, p, q in publishes(outs, kinds, v1_read=v1_read)]


def test_an_event_for_one_device_goes_in_the_version_it_spoke_last() -> None:
    kinds = DeviceKinds()
    reply = Out(ToDevice("u_a", "d_a1"), Sent("m1", "c_1", 1, 1, inbox=5))
    assert routes([reply], kinds) == [("down/u_a/d_a1", "v1", 1)]
    kinds.saw("u_a", "d_a1", v2=True)
    assert routes([reply], kinds) == [("down/u_a/d_a1", "v2", 0)]
    kinds.saw("u_a", "d_a1", v2=False)
    assert routes([reply], kinds) == [("down/u_a/d_a1", "v1", 1)]


def test_an_event_for_a_user_goes_in_v1_always_and_in_v2_where_a_v2_device_may_listen() -> None:
    kinds = DeviceKinds()
    to_b = [Out(ToUser("u_b"), MSG_FROM_A)]
    assert routes(to_b, kinds) == [("down/u_b/v2", "v2", 0), ("down/u_b", "v1", 1)]  # not known here
    kinds.saw("u_b", "d_b1", v2=False)
    assert routes(to_b, kinds) == [("down/u_b", "v1", 1)]  # known: v1 devices only
    kinds.saw("u_b", "d_b2", v2=True)
    assert routes(to_b, kinds) == [("down/u_b/v2", "v2", 0), ("down/u_b", "v1", 1)]


def test_the_sending_v2_device_gets_no_copy_of_its_message_its_other_v2_devices_do() -> None:
    kinds = DeviceKinds()
    kinds.saw("u_a", "d_a1", v2=True)  # the sending device
    to_a = [Out(ToUser("u_a"), MSG_FROM_A)]
    assert routes(to_a, kinds) == [("down/u_a", "v1", 1)]
    kinds.saw("u_a", "d_a2", v2=True)
    assert routes(to_a, kinds) == [("down/u_a/v2", "v2", 0), ("down/u_a", "v1", 1)]


def test_a_user_with_no_v1_reader_gets_v2_only_and_the_sender_alone_nothing() -> None:
    kinds = DeviceKinds()
    to_b = [Out(ToUser("u_b"), MSG_FROM_A)]
    no_v1 = {"u_a": False, "u_b": False, "u_c": True}.__getitem__
    assert routes(to_b, kinds, no_v1) == [("down/u_b/v2", "v2", 0)]  # not known here
    kinds.saw("u_b", "d_b1", v2=False)  # (said proto 2 at login, speaks v1 to this bridge)
    assert routes(to_b, kinds, no_v1) == [("down/u_b/v2", "v2", 0)]
    assert routes([Out(ToUser("u_c"), MSG_FROM_A)], kinds, no_v1) == [
        ("down/u_c/v2", "v2", 0), ("down/u_c", "v1", 1)]
    kinds.saw("u_a", "d_a1", v2=True)  # the sending device, the only one heard from
    assert routes([Out(ToUser("u_a"), MSG_FROM_A)], kinds, no_v1) == []
    kinds.saw("u_a", "d_a2", v2=False)  # said proto 2, speaks v1: still reads the v2 topic
    assert routes([Out(ToUser("u_a"), MSG_FROM_A)], kinds, no_v1) == [("down/u_a/v2", "v2", 0)]
    reply = Out(ToDevice("u_a", "d_a1"), Sent("m1", "c_1", 1, 1, inbox=5))
    assert routes([reply], kinds, no_v1) == [("down/u_a/d_a1", "v2", 0)]  # one device's: unchanged


async def test_v1_readers_answer_from_the_store_and_forget_a_user_whose_devices_changed() -> None:
    import asyncio

    has_v1 = {"u_a": False, "u_b": True}
    reads: list[str] = []
    gate = asyncio.Event()
    hearing = [True]

    async def reads_v1(user: str) -> bool:
        reads.append(user)
        await gate.wait()
        return has_v1[user]

    readers = V1Readers(reads_v1, lambda: hearing[0], max_reads=1)
    assert readers("u_a") and readers("u_b")  # not known yet: the copy goes; one read at a time
    gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert reads == ["u_a"] and not readers("u_a")
    assert readers("u_b") and readers("u_b")  # read now
    await asyncio.sleep(0)
    assert reads == ["u_a", "u_b"]
    has_v1["u_a"] = True  # a v1 device linked
    readers.changed("u_a")
    assert readers("u_a")
    await asyncio.sleep(0)
    assert readers("u_a") and reads == ["u_a", "u_b", "u_a"]
    has_v1["u_a"] = False
    gate.clear()
    readers.changed(None)  # news missed: nothing known is kept
    assert readers("u_a")
    readers.changed("u_a")  # heard while the read was on its way: its answer is not kept
    gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert readers("u_a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not readers("u_a")
    hearing[0] = False  # cannot hear news: every copy goes, nothing is read
    assert readers("u_a") and reads.count("u_a") == 4
    await readers.close()


def test_a_forgotten_user_gets_both_versions_again() -> None:
    clock = [0.0]
    kinds = DeviceKinds(ttl_s=10.0, timer=lambda: clock[0])
    kinds.saw("u_b", "d_b1", v2=False)
    assert kinds.v2_devices("u_b") == frozenset()
    clock[0] = 11.0
    assert kinds.v2_devices("u_b") is None


INTS = st.integers(-(1 << 63), (1 << 64) - 1)  # what MessagePack can carry


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 11), st.lists(st.one_of(
    st.none(), st.booleans(), INTS, st.text(max_size=80), st.binary(max_size=20), st.floats(),
    st.lists(st.one_of(INTS, st.text(max_size=70)), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(INTS, st.text(max_size=70)), max_size=5)), max_size=6))
def test_any_v2_array_is_a_request_or_a_protocol_error(kind: int, fields: list[Any]) -> None:
    try:
        req = parse_request_v2(msgpack.packb([kind, *fields]), 1 << 16)
    except ProtocolError:
        return
    assert req.type == V2_REQUESTS[kind][0]


def test_a_sent_for_a_send_that_named_its_chat_leaves_the_chat_to_the_device() -> None:
    named = Sent("k1", "c_1", 7, 1795438173378, chat_known=True)
    raw = encode(named, SENDER)
    assert len(raw) == len(encode(Sent("k1", "c_1", 7, 1795438173378), SENDER)) - len("c_1")  # (nil in its place)
    v1 = decode_payload(encode_v1(named))
    assert v1.to_json() == {"type": "sent", "id": "k1", "chat": "c_1", "seq": 7, "ts": 1795438173378}
    assert decode(raw, SENDER, {"k1": "c_1", "k2": "c_2"}, now_ms=clock(named)) == v1
    with pytest.raises(Unawaited):  # a device that awaits no such send: a repeat, answered before
        decode(raw, SENDER, {}, now_ms=clock(named))
    with pytest.raises(BadRequest) as refused:  # nothing to tell by: no chat, refused
        decode(raw, SENDER, now_ms=clock(named))
    assert not isinstance(refused.value, Unawaited)
    with_inbox = decode(encode(Sent("k1", "c_1", 7, 1795438173378, inbox=9, chat_known=True), SENDER), SENDER,
                        {"k1": "c_1"}, now_ms=clock(named))
    assert isinstance(with_inbox, Sent) and (with_inbox.chat, with_inbox.inbox) == ("c_1", 9)


# -- ids in the store's shape go as their 64 bits ----------------------------------------------------
def store_ids() -> dict[str, str]:
    return {"user_a": new_id("u"), "user_b": new_id("u"), "device": new_id("d"), "direct": new_id("c"),
            "group": new_id("g")}


def id_events(ids: dict[str, str]) -> list[WireEvent]:
    text = ChatMessage(chat=ids["direct"], seq=3, id="7", sender=ids["user_a"], device=ids["device"],
                       ts=1_795_438_173_378, kind="text", body="x" * 20)
    system = ChatMessage(chat=ids["group"], seq=1, id=f"{ids['group']}:1", sender=ids["user_a"],
                         device=ids["device"], ts=1_795_438_173_378, kind="system", event="member_added",
                         user=ids["user_b"])
    return [
        MsgEvent(7, text), MsgEvent(8, system),
        ReceiptEvent(9, ids["direct"], ids["user_b"], "delivered", 3), ReceiptEvent(10, ids["group"], "*", "read", 1),
        Sent("7", ids["direct"], 3, 1_795_438_173_378), PresenceEvent(user=ids["user_b"], online=True, last_seen=9),
        TypingEvent(user=ids["user_b"], chat=ids["group"]),
        Batch(id="s", events=(MsgEvent(7, text), ReceiptEvent(9, ids["direct"], ids["user_b"], "delivered", 3)),
              last=9, more=False),
    ]


@pytest.mark.parametrize("n", range(20))
def test_store_shaped_ids_mean_the_same_in_v2(n: int) -> None:
    ids = store_ids()
    for event in id_events(ids):
        v1 = decode_payload(encode_v1(event))  # type: ignore[arg-type]
        for user in (ids["user_a"], ids["user_b"]):
            assert decode(encode(event, user), user, now_ms=clock(event)) == v1  # type: ignore[arg-type]


def test_a_store_shaped_id_is_nine_bytes_or_ten_for_another_letter_and_any_other_id_its_string() -> None:
    ids = store_ids()
    assert len(msgpack.packb(id_out(ids["user_a"], "u"))) == 9
    assert len(msgpack.packb(id_out(ids["direct"], "c"))) == 9
    assert len(msgpack.packb(id_out(ids["group"], "c"))) == 10
    for other in ("u_a", "*", "u" + "0123456789abcdef", ids["user_a"][:-1] + "-", "u" + "z" * 11):  # 62**11 > 2**64
        assert id_out(other, "u") == other and id_in(other, "u") == other
    for s in ids.values():
        assert id_in(id_out(s, "c"), "c") == s
    text = id_events(ids)[0]
    assert isinstance(text, MsgEvent)
    # chat, from and device as 9 bytes each rather than 13
    as_str = msgpack.packb([1, 7, ids["direct"], 3, 1_795_438_173_378 & 0xFFFFFFFF, 0, ids["user_a"], "x" * 20, "7",
                            ids["device"]])
    assert len(encode(text, ids["user_b"])) == len(as_str) - 3 * 4


@pytest.mark.parametrize("request_", [
    {"type": "send", "id": "7", "chat": "c", "body": "hi"}, {"type": "send", "id": "8", "to": "u", "body": "hi"},
    {"type": "read", "chat": "g", "up_to": 4}, {"type": "typing", "chat": "c"},
    {"type": "watch", "id": "w", "users": ["u", "u"], "ttl": 30},
    {"type": "media_url", "id": "g", "key": "k", "chat": "g"},
], ids=lambda r: r["type"])
def test_requests_with_store_shaped_ids_read_the_same_and_are_shorter(request_: dict[str, Any]) -> None:
    ids = {"c": new_id("c"), "g": new_id("g"), "u": new_id("u")}
    d = {k: ids.get(v, v) if isinstance(v, str) and k != "id" else v for k, v in request_.items()}
    if "users" in d:
        d["users"] = [new_id("u") for _ in d["users"]]
    raw = encode_request(d)
    assert parse_request_v2(raw, 4096) == parse_request(json.dumps(d).encode(), 4096)
    as_str = msgpack.packb(request_array_as_str(d))
    assert len(raw) < len(as_str)


def request_array_as_str(d: dict[str, Any]) -> list[Any]:
    n, keys = REQUEST_NUMBERS[d["type"]]
    a: list[Any] = [n, *(d.get(k) for k in keys)]
    while a[-1] is None:
        a.pop()
    return a


# -- a live msg in a direct chat leaves the chat to the peer's device ----------------------------------
def test_a_live_direct_msg_leaves_the_chat_out_for_the_peer_whose_device_knows_or_fetches_it() -> None:
    ids = store_ids()
    a, b, chat = ids["user_a"], ids["user_b"], ids["direct"]
    text = ChatMessage(chat=chat, seq=3, id="7", sender=a, device=ids["device"], ts=1_795_438_173_378, kind="text",
                       body="x" * 20)
    live = MsgEvent(7, text, direct=True)
    v1 = decode_payload(encode_v1(live))
    assert encode_v1(live) == encode_v1(MsgEvent(7, text))  # v1 is not touched
    to_peer = encode(live, b)
    assert len(to_peer) == len(encode(MsgEvent(7, text), b)) - 8  # a nil where the 9-byte chat was
    assert decode(to_peer, b, peers={a: chat}, now_ms=clock(live)) == v1
    with pytest.raises(Unresolved) as info:  # a device that does not know the chat yet: it syncs
        decode(to_peer, b, peers={ids["user_b"]: ids["group"]}, now_ms=clock(live))
    assert (info.value.inbox, info.value.peer) == (7, a)
    # the sender's other devices get the chat: nothing in their copy names the peer
    assert decode(encode(live, a), a, now_ms=clock(live)) == v1
    # what sync returns always carries it (and tells a device the chat it could not place)
    batch = Batch(id="s", events=(live,), last=7, more=False)
    assert decode(encode(batch, b), b) == decode_payload(encode_v1(batch))
    # a batch item without its chat is malformed, not unresolved
    with pytest.raises(BadRequest) as refused:
        decode(msgpack.packb([4, "s", 7, False, [msgpack.unpackb(to_peer)]]), b, peers={a: chat}, now_ms=clock(live))
    assert not isinstance(refused.value, Unresolved)


# -- a live msg or sent carries the low 32 bits of its time ----------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 50), st.integers(-(1 << 31) + 1, (1 << 31) - 1))
def test_a_live_time_is_placed_by_a_clock_estimate_within_24_days(ts: int, skew: int) -> None:
    text = ChatMessage(chat="c_1", seq=1, id="7", sender=SENDER, device="d_a", ts=ts, kind="text", body="x")
    sent = Sent("7", "c_1", 1, ts, inbox=4)  # (fresh: its time goes as its low 32 bits)
    for event in (MsgEvent(3, text), sent):
        assert decode(encode(event, OTHER), OTHER, {"7": "c_1"}, now_ms=ts + skew) == event


def test_a_live_time_is_five_bytes_a_batch_keeps_whole_times_and_gives_the_clock() -> None:
    ts = 1_795_438_173_378
    text = ChatMessage(chat="c_1", seq=1, id="7", sender=SENDER, device="d_a", ts=ts, kind="text", body="x")
    live = msgpack.unpackb(encode(MsgEvent(3, text), OTHER))
    assert live[4] == ts & 0xFFFFFFFF and len(msgpack.packb(live[4])) == 5
    assert msgpack.unpackb(encode(Sent("7", "c_1", 1, ts, inbox=4), SENDER))[4] == ts & 0xFFFFFFFF
    # a send answered from an earlier attempt (no inbox position) may be old: its time goes whole
    old = Sent("7", "c_1", 1, ts - 60 * 86_400_000)
    assert msgpack.unpackb(encode(old, SENDER))[4] == old.ts
    assert decode(encode(old, SENDER), SENDER, {"7": "c_1"}, now_ms=ts) == old
    assert decode(encode(old, SENDER), SENDER, {"7": "c_1"}) == old  # (no estimate needed)
    with pytest.raises(Unresolved) as info:  # no estimate of the server's clock yet: the device syncs
        decode(encode(MsgEvent(3, text), OTHER), OTHER)
    assert info.value.inbox == 3
    with pytest.raises(Unresolved):
        decode(encode(Sent("7", "c_1", 1, ts, inbox=4), SENDER), SENDER)
    # a whole time (a server before 2026-12-01 sent them so) is taken as it is, estimate or not
    assert decode(msgpack.packb([3, "7", "c_1", 1, ts, 4]), SENDER).ts == ts
    assert decode(msgpack.packb([1, 3, "c_1", 1, ts, 0, SENDER, "x", None, "d_a"]), OTHER).message.ts == ts
    for bad in (-1, "1", 1.5):  # anything else is malformed
        with pytest.raises(BadRequest):
            decode(msgpack.packb([3, "7", "c_1", 1, bad, 4]), SENDER, now_ms=ts)
    batch = Batch(id="s", events=(MsgEvent(3, text),), last=3, more=False, now=ts + 40)
    raw = encode(batch, OTHER)
    assert msgpack.unpackb(raw)[4][0][4] == ts
    got = decode(raw, OTHER)  # (no estimate needed)
    assert isinstance(got, Batch) and got.now == ts + 40 and got == decode_payload(encode_v1(batch))
    assert "now" not in encode_v1(batch).decode()  # v1 is not touched
