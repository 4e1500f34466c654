"""Protocol v2 means what v1 means: every event a v1 event exists for, encoded as v2 for a
device of the sender and for a device of another member, decodes to the same event; every
request reads as the same typed request as its v1 JSON; malformed v2 is refused."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from bridge.errors import BadRequest, TooLarge, UnknownType
from bridge.protocol import WireEvent, decode_payload, parse_request
from bridge.wire import encode_v1
from bridge.wire_v2 import decode, encode, encode_request, is_v2, parse_request_v2
from tests.test_protocol_events import EVENTS

SENDER, OTHER = "u_a", "u_b"


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_v2_event_means_what_its_v1_event_means(event: WireEvent) -> None:
    v1 = decode_payload(encode_v1(event))  # type: ignore[arg-type]
    assert decode(encode(event, SENDER), SENDER) == v1  # type: ignore[arg-type]
    assert decode(encode(event, OTHER), OTHER) == v1  # type: ignore[arg-type]
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
])
def test_malformed_v2_is_refused(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_request_v2(raw, 100)
