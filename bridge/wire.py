"""The MQTT edge's half of the way out: where an addressed event is published and as what.

Handlers return :class:`bridge.outbox.Out` (an event and whom it is for); this module gives
the topic (``down/{user}`` for every device of a user, ``down/{user}/{device}`` for one) and
the payload: protocol v1's compact JSON, the exact bytes the protocol documents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .outbox import Address, Out, ToDevice
from .protocol import ChatMessage, Event, MsgEvent

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


def publishes(outs: Sequence[Out]) -> list[tuple[str, bytes, int]]:
    """Topic, payload and QoS of each, in order.

    The hot path is a message's fan-out: one ``msg`` per recipient, all with the same
    :class:`ChatMessage` and each with its own inbox position. The message's part of the payload
    is encoded once per call and each recipient's position put in front of it, giving the same
    bytes as ``encode_v1``."""
    tails: dict[int, bytes] = {}  # id() of a ChatMessage held by one of ``outs`` -> its tail
    out: list[tuple[str, bytes, int]] = []
    for o in outs:
        ev = o.event
        if type(ev) is MsgEvent:
            tail = tails.get(id(ev.message))
            if tail is None:
                tail = tails[id(ev.message)] = _msg_tail(ev.message)
            payload = b'{"type":"msg","inbox":%d,%s' % (ev.inbox, tail)
        else:
            payload = encode_v1(ev)
        out.append((topic_of(o.to), payload, o.qos))
    return out
