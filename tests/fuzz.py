"""Hypothesis strategies for the protocol's request envelopes and for broken MQTT packets.

``envelope(kind, ids)`` draws a valid request of that type; ``request_case(ids)`` draws a
valid one or a mutation of it (a field missing, of the wrong type, a huge or negative number, a
long or odd string, invalid UTF-8, not JSON at all), and says whether the mutation is certain to
be invalid. ``ids`` are the ids worth using (the device's own chat, its peer), so valid requests
reach the handlers instead of stopping at ``not_found``.

How many cases: ``PIGEON_FUZZ=long`` multiplies every test's examples by LONG_FACTOR (the long
run of RELIABILITY.md); unset, the fast profile every CI run uses.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from clients.bench.mqtt import mqtt_str, varint

LONG = os.environ.get("PIGEON_FUZZ", "") == "long"
LONG_FACTOR = 25
ERROR_CODES = {"bad_request", "unknown_type", "too_large", "forbidden", "not_found", "rate_limited", "unavailable"}
KINDS = ("send", "sync", "ack", "read", "typing", "presence", "watch", "media_upload", "media_done", "media_url")
# the kinds whose valid requests always get a reply carrying their id
ANSWERED = {"send": {"sent"}, "sync": {"batch"}, "media_upload": {"media_upload"}, "media_done": {"media_ready"},
            "media_url": {"media_url"}}


# pytest-timeout's limit for a fuzz test: the long run takes many times the fast one's minute
TIMEOUT_S = 7200 if LONG else 300


def examples(n: int) -> settings:
    """Hypothesis settings for a test of ``n`` cases (× LONG_FACTOR in the long run)."""
    return settings(max_examples=n * (LONG_FACTOR if LONG else 1), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@dataclass(frozen=True)
class Ids:
    chat: str
    peer: str
    me: str


# -- values ----------------------------------------------------------------------------------
odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
long_text = st.integers(65, 20_000).map(lambda n: "x" * n)
huge_ints = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64 + 7, 10**30, -(2**63) - 1])
wrong_values = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(-(10**20), 10**20), huge_ints,
    st.integers(max_value=-1), odd_text, long_text, st.just(""),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
rid = st.one_of(st.uuids().map(str), st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)),
                                             min_size=1, max_size=64))
sha = st.text("0123456789abcdef", min_size=64, max_size=64)


def envelope(kind: str, ids: Ids) -> st.SearchStrategy[dict[str, Any]]:
    """A valid request of ``kind`` (valid as the protocol reads it; it may still be refused,
    e.g. a chat the device is not in)."""
    chat = st.one_of(st.just(ids.chat), st.text(min_size=1, max_size=64))
    seq = st.integers(0, 10**6)
    fields: dict[str, st.SearchStrategy[Any]]
    optional: dict[str, st.SearchStrategy[Any]] = {}
    if kind == "send":
        fields = {"id": rid, "body": st.text(min_size=1, max_size=200)}
        target = st.one_of(st.fixed_dictionaries({"chat": chat}), st.fixed_dictionaries({"to": st.just(ids.peer)}))
        return st.builds(lambda f, t: {"type": kind, **f, **t}, st.fixed_dictionaries(fields), target)
    if kind == "sync":
        fields = {"id": rid}
        optional = {"after": seq, "limit": st.integers(1, 1000)}
    elif kind == "ack":
        fields = {"up_to": seq}
    elif kind == "read":
        fields = {"chat": chat, "up_to": seq}
    elif kind == "typing":
        fields = {"chat": chat}
    elif kind == "presence":
        fields = {"state": st.sampled_from(["online", "offline"])}
    elif kind == "watch":
        fields = {"id": rid, "users": st.lists(st.one_of(st.just(ids.peer), st.text(min_size=1, max_size=64)),
                                               max_size=5)}
        optional = {"ttl": st.integers(1, 86_400)}
    elif kind == "media_upload":
        fields = {"id": rid, "sha256": sha, "size": st.integers(1, 10**6), "mime": st.sampled_from(
            ["image/jpeg", "application/octet-stream"])}
    elif kind == "media_done":
        fields = {"id": rid, "key": st.text(min_size=1, max_size=128)}
    else:  # media_url
        fields = {"id": rid, "key": st.text(min_size=1, max_size=128), "chat": chat}
    return st.builds(lambda f: {"type": kind, **f}, st.fixed_dictionaries(fields, optional=optional))


REQUIRED = {"send": ("id", "body"), "sync": ("id",), "ack": ("up_to",), "read": ("chat", "up_to"),
            "typing": ("chat",), "presence": ("state",), "watch": ("id", "users"),
            "media_upload": ("id", "sha256", "size", "mime"), "media_done": ("id", "key"),
            "media_url": ("id", "key", "chat")}


@dataclass(frozen=True)
class Case:
    payload: bytes
    kind: str
    mutation: str  # "" for a valid request
    invalid: bool  # certain to be refused by the protocol's parsing


def _dump(d: Any) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode()


@st.composite
def request_case(draw: st.DrawFn, ids: Ids) -> Case:
    kind = draw(st.sampled_from(KINDS))
    d = draw(envelope(kind, ids))
    how = draw(st.sampled_from([
        "valid", "valid", "drop required", "wrong type", "wrong value", "unknown type", "type not a string",
        "extra fields", "bad id", "invalid utf-8", "not json", "not an object", "too large",
    ]))
    if how == "valid":
        return Case(_dump(d), kind, "", False)
    if how == "drop required":
        name = draw(st.sampled_from(REQUIRED[kind]))
        del d[name]
        # a send keeps a 'to'/'chat' target but needs a body (or media); the rest need each field
        return Case(_dump(d), kind, f"{how} {name}", True)
    if how in ("wrong type", "wrong value"):
        name = draw(st.sampled_from(sorted(k for k in d if k != "type")))
        value = draw(wrong_values)
        d[name] = value
        return Case(_dump(d), kind, f"{how} {name}={value!r:.40}", False)  # some values happen to be valid
    if how == "unknown type":
        d["type"] = draw(odd_text.filter(lambda t: t not in KINDS))
        return Case(_dump(d), kind, how, True)
    if how == "type not a string":
        d["type"] = draw(wrong_values.filter(lambda v: not isinstance(v, str)))
        return Case(_dump(d), kind, how, True)
    if how == "extra fields":
        d.update(draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in d and k not in REQUIRED[kind]),
                                      wrong_values, min_size=1, max_size=4)))
        d.pop("id", None) if kind not in ("send", "sync", "watch") and draw(st.booleans()) else None
        return Case(_dump(d), kind, how, False)
    if how == "bad id":
        d["id"] = draw(st.one_of(st.just(""), st.integers(65, 500).map(lambda n: "i" * n),
                                 wrong_values.filter(lambda v: v is not None and not isinstance(v, str))))
        return Case(_dump(d), kind, how, True)
    raw = _dump(d)
    if how == "invalid utf-8":
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return Case(raw[:at] + bad + raw[at:], kind, how, True)
    if how == "not json":
        return Case(raw[: draw(st.integers(0, max(0, len(raw) - 1)))] + b"}{", kind, how, True)
    if how == "not an object":
        other = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=10), st.none()))
        return Case(_dump(other), kind, how, True)
    # too large: over the 64 KiB payload limit
    d["body" if kind == "send" else "padding"] = "p" * (64 * 1024)
    return Case(_dump(d), kind, how, True)


# -- MQTT first packets ----------------------------------------------------------------------
def connect_bytes(client_id: str, username: str, password: str, flags: int = 0xC2, keepalive: int = 60,
                  proto: bytes = b"MQTT", level: int = 4) -> bytes:
    var = struct.pack("!H", len(proto)) + proto + bytes([level, flags]) + struct.pack("!H", keepalive)
    body = var + mqtt_str(client_id) + mqtt_str(username) + mqtt_str(password)
    return bytes([0x10]) + varint(len(body)) + body


@st.composite
def first_packet(draw: st.DrawFn) -> bytes:
    """Bytes a broken (or, rarely, a sound) client sends first."""
    how = draw(st.sampled_from(["random", "mutated connect", "other packet", "bad length", "connect flags"]))
    good = connect_bytes("dev-fuzz", "dev-fuzz", "tok-dev-fuzz")
    if how == "random":
        return draw(st.binary(min_size=1, max_size=300))
    if how == "mutated connect":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(1, len(data)))
        return bytes(data[:cut]) + draw(st.binary(max_size=20))
    if how == "other packet":
        first = draw(st.integers(0, 255).filter(lambda b: b >> 4 != 1))
        return bytes([first]) + varint(draw(st.integers(0, 200))) + draw(st.binary(max_size=50))
    if how == "bad length":
        return bytes([0x10]) + draw(st.sampled_from([b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80\x80",
                                                      b"\xff\xff\xff\x7f"])) + draw(st.binary(max_size=40))
    return connect_bytes("dev-fuzz", "dev-fuzz", "tok-dev-fuzz", flags=draw(st.integers(0, 255)),
                         keepalive=draw(st.integers(0, 65535)), proto=draw(st.sampled_from([b"MQTT", b"MQIsdp", b""])),
                         level=draw(st.integers(0, 255)))


# -- packets after a sound CONNECT (tests/test_fuzz_packets.py) ------------------------------------
def sound_packets(up_topic: str, down_topic: str) -> list[bytes]:
    """Packets a connected device may send, each answered or taken without closing."""
    def pkt(first: int, body: bytes) -> bytes:
        return bytes([first]) + varint(len(body)) + body

    return [
        pkt(0x30, mqtt_str(up_topic) + b'{"type":"ping"}'),
        pkt(0x32, mqtt_str(up_topic) + b"\x00\x07" + b'{"type":"ping"}'),
        pkt(0x82, b"\x00\x05" + mqtt_str(down_topic) + b"\x01"),
        pkt(0xA2, b"\x00\x06" + mqtt_str(down_topic)),
        pkt(0x40, b"\x00\x09"),
        b"\xc0\x00",
    ]


# packet types only a server sends, and the reserved ones: always broken from a client
SERVER_ONLY_TYPES = (0, 2, 9, 11, 13, 15)


@st.composite
def session_packet(draw: st.DrawFn, up_topic: str, down_topic: str) -> tuple[bytes, str]:
    """Bytes a connected client sends, and what they are: 'sound' (one packet it may send),
    'broken' (certain to break MQTT 3.1.1) or 'mutated' (anything: most are broken)."""
    sound = sound_packets(up_topic, down_topic)
    how = draw(st.sampled_from(["sound", "mutated", "mutated", "server type", "qos 3", "bad topic", "other",
                                "bad length", "random"]))
    if how == "sound":
        return draw(st.sampled_from(sound)), "sound"
    if how == "mutated":
        data = bytearray(draw(st.sampled_from(sound)))
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(1, len(data)))
        return bytes(data[:cut]) + draw(st.binary(max_size=20)), "mutated"
    if how == "server type":
        first = draw(st.sampled_from(SERVER_ONLY_TYPES)) << 4 | draw(st.integers(0, 15))
        body = draw(st.binary(max_size=40))
        return bytes([first]) + varint(len(body)) + body, "broken"
    if how == "qos 3":
        body = mqtt_str(up_topic) + b"\x00\x01" + draw(st.binary(max_size=40))
        return bytes([0x36 | draw(st.sampled_from([0, 1, 8, 9]))]) + varint(len(body)) + body, "broken"
    if how == "bad topic":
        topic = draw(st.one_of(
            st.builds(lambda a, w, b: a + w + b, st.text(max_size=10), st.sampled_from(["+", "#", "\x00"]),
                      st.text(max_size=10)).map(lambda t: mqtt_str(t)),
            st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80"]).map(
                lambda bad: struct.pack("!H", len(bad) + 2) + b"up" + bad),
            st.just(b"\x00\x00"),
        ))
        body = topic + draw(st.binary(max_size=40))
        return bytes([0x30 | draw(st.sampled_from([0, 1]))]) + varint(len(body)) + body, "broken"
    if how == "other":
        first = draw(st.integers(0, 255))
        return bytes([first]) + varint(draw(st.integers(0, 200))) + draw(st.binary(max_size=50)), "mutated"
    if how == "bad length":
        return bytes([draw(st.integers(0, 255))]) + draw(st.sampled_from([
            b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80\x80", b"\xff\xff\xff\x7f"])) + draw(
            st.binary(max_size=40)), "broken"
    return draw(st.binary(min_size=1, max_size=300)), "mutated"
