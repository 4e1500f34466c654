"""The MQTT 3.1.1 rules every packet a connected client sends must keep (fix 8 of ``broker.embedded``).

amqtt parses what a client sends after its CONNECT leniently: a PUBLISH with QoS 3, a topic of
invalid UTF-8 or holding a wildcard, a SUBSCRIBE with no topic filter, packets only a server may
send, all are taken or silently dropped, and the connection stays open. MQTT 3.1.1 says a
server closes the connection on each of these. ``check_packet`` says whether one whole packet
(its first byte and its body) keeps the rules; ``ProtocolViolation`` says which it broke.
"""

from __future__ import annotations

import struct


def varint(n: int) -> bytes:
    """An MQTT remaining-length field: seven bits a byte, lowest first [MQTT-2.2.3]."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# a packet's body: bytes, or a view of them in the reader's buffer
Bytes = bytes | memoryview

# packet types (the first byte's high nibble)
CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14
# only a server sends these (CONNACK, SUBACK, UNSUBACK, PINGRESP); 0 and 15 are reserved
NEVER_FROM_A_CLIENT = {0: "reserved type 0", 2: "CONNACK", 9: "SUBACK", 11: "UNSUBACK", 13: "PINGRESP",
                       15: "reserved type 15"}
# the fixed-header flags each type must carry [MQTT-2.2.2-1, -2]; PUBLISH's are checked on their own
FLAGS = {PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}


class ProtocolViolation(ValueError):
    """A packet breaks MQTT 3.1.1: the server closes the connection (section 4.8)."""


def check_packet(first: int, body: Bytes) -> None:
    """Raise ProtocolViolation if the packet (first byte ``first``, remaining bytes ``body``)
    is not one a connected client may send. ``body`` may be a view into a larger buffer."""
    kind, flags = first >> 4, first & 0x0F
    if kind in NEVER_FROM_A_CLIENT:
        raise ProtocolViolation(f"a client may not send {NEVER_FROM_A_CLIENT[kind]}")
    if kind == CONNECT:
        raise ProtocolViolation("a second CONNECT [MQTT-3.1.0-2]")
    if kind == PUBLISH:
        _check_publish(flags, body)
        return
    if flags != FLAGS[kind]:
        raise ProtocolViolation(f"packet type {kind} with fixed-header flags {flags:#x} [MQTT-2.2.2-2]")
    if kind in (PINGREQ, DISCONNECT):
        if body:
            raise ProtocolViolation(f"packet type {kind} with a body of {len(body)} bytes")
    elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if len(body) != 2:
            raise ProtocolViolation(f"packet type {kind} of {len(body)} bytes, not 2")
        _packet_id(body, 0)
    elif kind == SUBSCRIBE:
        _check_subscribe(body)
    else:
        _check_unsubscribe(body)


def _check_publish(flags: int, body: Bytes) -> None:
    qos, dup = (flags >> 1) & 3, flags & 8
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    if qos == 0 and dup:
        raise ProtocolViolation("PUBLISH with QoS 0 and the DUP flag [MQTT-3.3.1-2]")
    topic, pos = _string(body, 0, "topic name")
    if not topic:
        raise ProtocolViolation("PUBLISH with an empty topic name [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation("PUBLISH topic name holds a wildcard [MQTT-3.3.2-2]")
    if qos:
        _packet_id(body, pos)


def _check_subscribe(body: Bytes) -> None:
    pos = _packet_id(body, 0)
    if pos == len(body):
        raise ProtocolViolation("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        _check_filter(topic_filter)
        if pos >= len(body):
            raise ProtocolViolation("SUBSCRIBE topic filter without its requested QoS")
        if body[pos] > 2:
            raise ProtocolViolation(f"SUBSCRIBE requested QoS byte {body[pos]:#x} [MQTT-3-8.3-4]")
        pos += 1


def _check_unsubscribe(body: Bytes) -> None:
    pos = _packet_id(body, 0)
    if pos == len(body):
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        _check_filter(topic_filter)


def _check_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise ProtocolViolation("an empty topic filter [MQTT-4.7.3-1]")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ProtocolViolation(f"'#' not alone in the last level of {topic_filter!r} [MQTT-4.7.1-2]")
        if "+" in level and level != "+":
            raise ProtocolViolation(f"'+' not alone in a level of {topic_filter!r} [MQTT-4.7.1-3]")


def _packet_id(body: Bytes, pos: int) -> int:
    if len(body) < pos + 2:
        raise ProtocolViolation("packet cut short before its packet identifier")
    if struct.unpack_from("!H", body, pos)[0] == 0:
        raise ProtocolViolation("packet identifier 0 [MQTT-2.3.1-1]")
    return pos + 2


def _string(body: Bytes, pos: int, what: str) -> tuple[str, int]:
    if len(body) < pos + 2:
        raise ProtocolViolation(f"packet cut short before its {what}")
    (n,) = struct.unpack_from("!H", body, pos)
    end = pos + 2 + n
    if end > len(body):
        raise ProtocolViolation(f"{what} announces {n} bytes, more than the packet holds")
    try:
        text = str(body[pos + 2:end], "utf-8")  # strict: also refuses encoded surrogates
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"{what} is not well-formed UTF-8 [MQTT-1.5.3-1]") from exc
    if "\x00" in text:
        raise ProtocolViolation(f"{what} holds U+0000 [MQTT-1.5.3-2]")
    return text, end
