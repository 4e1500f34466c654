"""The MQTT edge's half of the way out: where an addressed event is published and as what.

Handlers return :class:`bridge.outbox.Out` (an event and whom it is for); this module gives
the topic and the payload. Protocol v1 (compact JSON, the exact bytes the protocol documents)
goes to ``down/{user}`` for every device of a user and ``down/{user}/{device}`` for one.

Protocol v2 (``bridge.wire_v2``) is per device: a device speaks v2 by sending its requests in
v2, and :class:`DeviceKinds` remembers which devices did. An event for one device is encoded as
that device speaks; an event for a user goes as v1 to ``down/{user}`` (always: a v1 client may
listen without ever publishing) and, when the user has a v2 device, as v2 to ``down/{user}/v2``,
which only v2 devices subscribe to. Live events (not replies) go to v2 devices at QoS 0: their
inbox positions and ``sync`` recover a lost one. A message's copy for its sender is not sent
to the sending device when it speaks v2: its ``sent`` reply carries the inbox position instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cachetools import LRUCache

from . import wire_v2
from .outbox import Address, Out, ToDevice, ToUser
from .protocol import REPLY_TYPES, ChatMessage, Event, MsgEvent, PresenceEvent

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def topic_of(to: Address) -> str:
    if isinstance(to, ToDevice):
        return f"down/{to.user}/{to.device}"
    return f"down/{to.user}"


def encode_v1(event: Event) -> bytes:
    """The event's v1 payload: its JSON object, compact, UTF-8."""
    return _dumps(event.to_json()).encode()


def _msg_tail(message: ChatMessage) -> bytes:
    """A ``msg`` payload after its inbox position: the message's keys, the same for every recipient."""
    return _dumps(message.fields_json({})).encode()[1:]


class DeviceKinds:
    """The devices this process has seen speak v2, by user (bounded: the least recently seen
    users are forgotten, and their devices get v1 until they send a request again)."""

    def __init__(self, max_users: int = 200_000) -> None:
        self._v2: LRUCache[str, frozenset[str]] = LRUCache(max_users)

    def saw(self, user: str, device: str, v2: bool) -> None:
        """A request of this device came in v2 (or in v1)."""
        known = self._v2.get(user, frozenset())
        if v2 and device not in known:
            self._v2[user] = known | {device}
        elif not v2 and device in known:
            self._v2[user] = known - {device}

    def is_v2(self, user: str, device: str) -> bool:
        return device in self._v2.get(user, ())

    def v2_devices(self, user: str) -> frozenset[str]:
        return self._v2.get(user, frozenset())


def _live(event: Event) -> bool:
    """Not a reply to a request (a presence event with an id answers a watch)."""
    return event.type not in REPLY_TYPES and not (isinstance(event, PresenceEvent) and event.id is not None)


def publishes(outs: Sequence[Out], kinds: DeviceKinds | None = None) -> list[tuple[str, bytes, int]]:
    """Topic, payload and QoS of each, in order; with ``kinds``, v2 where a device speaks it.

    The hot path is a message's fan-out: one ``msg`` per recipient, all with the same
    :class:`ChatMessage` and each with its own inbox position. The message's part of the payload
    is encoded once per call and each recipient's position put in front of it, giving the same
    bytes as ``encode_v1``."""
    tails: dict[int, bytes] = {}  # id() of a ChatMessage held by one of ``outs`` -> its tail
    out: list[tuple[str, bytes, int]] = []
    for o in outs:
        ev = o.event
        if kinds is not None and _v2_copy(o, kinds, out):
            continue
        if type(ev) is MsgEvent:
            tail = tails.get(id(ev.message))
            if tail is None:
                tail = tails[id(ev.message)] = _msg_tail(ev.message)
            payload = b'{"type":"msg","inbox":%d,%s' % (ev.inbox, tail)
        else:
            payload = encode_v1(ev)
        out.append((topic_of(o.to), payload, o.qos))
    return out


def _v2_copy(o: Out, kinds: DeviceKinds, out: list[tuple[str, bytes, int]]) -> bool:
    """Add the v2 publish of ``o`` (if any device is to get one); True when that is all of it
    (an event for one v2 device), False when the v1 publish follows."""
    to, ev = o.to, o.event
    if isinstance(to, ToDevice):
        if not kinds.is_v2(to.user, to.device):
            return False
        out.append((topic_of(to), wire_v2.encode(ev, to.user), 0 if _live(ev) else o.qos))
        return True
    assert isinstance(to, ToUser)
    devices = kinds.v2_devices(to.user)
    if devices:
        if isinstance(ev, MsgEvent) and ev.message.sender == to.user and devices == {ev.message.device}:
            return False  # the sending device is the user's only v2 device: its ``sent`` says it all
        out.append((f"down/{to.user}/v2", wire_v2.encode(ev, to.user), 0 if _live(ev) else o.qos))
    return False
