"""What handlers return: events and replies for the edge to send, in order, each addressed to
a user (every device of theirs) or to one device. Topics and encodings are the MQTT edge's
(``bridge.wire``); a handler names whom an event is for, never how it travels."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import Event


@dataclass(frozen=True, slots=True)
class ToUser:
    """Every device of the user."""

    user: str


@dataclass(frozen=True, slots=True)
class ToDevice:
    """One device of the user."""

    user: str
    device: str


Address = ToUser | ToDevice


@dataclass(frozen=True, slots=True)
class Out:
    to: Address
    event: Event
    # 1: at least once; 0: at most once (typing, which is worth nothing late)
    qos: int = 1
