"""The typed envelopes of everything the server sends: v1 encoding and decoding agree, the
fan-out fast path gives the same bytes, and a malformed event is refused."""

from __future__ import annotations

import json

import pytest

from bridge.errors import BadRequest, UnknownType
from bridge.outbox import Out, ToDevice, ToUser
from bridge.protocol import (
    Attachment,
    Batch,
    ChatMessage,
    ErrorReply,
    MediaReady,
    MediaUploadReply,
    MediaUrlReply,
    MsgEvent,
    PresenceEvent,
    ReceiptEvent,
    Sent,
    TypingEvent,
    UploadTicket,
    WireEvent,
    decode_payload,
)
from bridge.wire import encode_v1, publishes, topic_of

TEXT = ChatMessage(chat="c_1", seq=3, id="m1", sender="u_a", device="d_a", ts=1_700_000_000_000, kind="text",
                   body="héllo 👋")
MEDIA = ChatMessage(chat="c_1", seq=4, id="m2", sender="u_a", device="d_a", ts=1, kind="media",
                    media=Attachment(key="k" * 64, mime="image/png", size=10, sha256="a" * 64, name="x.png"))
SYSTEM = ChatMessage(chat="c_1", seq=5, id="c_1:5", sender="u_a", device="d_a", ts=2, kind="system",
                     event="member_added", user="u_c")
EVENTS: list[WireEvent] = [
    MsgEvent(7, TEXT), MsgEvent(8, MEDIA), MsgEvent(9, SYSTEM),
    ReceiptEvent(inbox=10, chat="c_1", user="*", kind="read", up_to=3),
    Sent(id="m1", chat="c_1", seq=3, ts=5),
    Batch(id="s1", events=(MsgEvent(7, TEXT), ReceiptEvent(8, "c_1", "u_b", "delivered", 3)), last=8, more=True),
    Batch(id="s2", events=(), last=0, more=False),
    ErrorReply(id=None, code="bad_request", message="no"), ErrorReply(id="r", code="rate_limited", message="slow",
                                                                       retry_after_ms=250),
    PresenceEvent(user="u_b", online=True, last_seen=9), PresenceEvent(user="u_b", online=False, last_seen=9, id="w"),
    TypingEvent(user="u_a", chat="c_1"),
    MediaUploadReply(id="u", key="k", exists=True),
    MediaUploadReply(id="u", key="k", exists=False, upload=UploadTicket(
        method="POST", url="http://h/x", expires=5, fields=(("policy", "p"),), headers=(("x-a", "b"),))),
    MediaReady(id="d", key="k"), MediaUrlReply(id="g", key="k", url="http://h/y", expires=6),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_event_decodes_to_itself_and_reads_as_its_json(event: WireEvent) -> None:
    payload = encode_v1(event)  # type: ignore[arg-type]
    assert decode_payload(payload) == event
    assert dict(event) == json.loads(payload) == event  # the mapping view is the v1 object
    assert event["type"] == event.type


def test_the_v1_bytes_of_a_msg_are_as_documented() -> None:
    assert encode_v1(MsgEvent(7, TEXT)) == (
        '{"type":"msg","inbox":7,"chat":"c_1","seq":3,"id":"m1","from":"u_a","device":"d_a",'
        '"ts":1700000000000,"kind":"text","body":"héllo 👋"}').encode()


def test_a_fan_out_is_encoded_as_each_event_alone() -> None:
    outs = [Out(ToUser("u_a"), MsgEvent(7, TEXT)), Out(ToUser("u_b"), MsgEvent(3, TEXT)),
            Out(ToDevice("u_a", "d_a"), Sent("m1", "c_1", 3, 5)), Out(ToUser("u_b"), TypingEvent("u_a", "c_1"), qos=0)]
    assert publishes(outs) == [(topic_of(o.to), encode_v1(o.event), o.qos) for o in outs]
    assert [t for t, _, _ in publishes(outs)] == ["down/u_a", "down/u_b", "down/u_a/d_a", "down/u_b"]


@pytest.mark.parametrize("raw", [
    b'{"type":"msg","chat":"c","seq":1,"id":"i","from":"u","device":"d","ts":1,"kind":"text"}',  # no inbox
    b'{"type":"sent","id":"i","chat":"c","seq":1}',  # no ts
    b'{"type":"receipt","inbox":1,"chat":"c","user":"u","kind":"seen","up_to":1}',
    b'{"type":"batch","id":"s","items":[{"type":"typing","chat":"c","user":"u"}],"last":1,"more":false}',
    b'[1,2]', b'not json',
])
def test_a_malformed_event_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_payload(raw)


def test_an_unknown_event_type_is_named() -> None:
    with pytest.raises(UnknownType, match="nope"):
        decode_payload(b'{"type":"nope"}')
