"""What handlers return: publications for the edge to send, in order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import dumps


@dataclass(frozen=True, slots=True)
class Out:
    topic: str
    payload: bytes
    qos: int = 1

    @classmethod
    def event(cls, topic: str, body: Mapping[str, Any], qos: int = 1) -> Out:
        return cls(topic, dumps(body), qos)


def user_topic(user_id: str) -> str:
    return f"down/{user_id}"


def device_topic(user_id: str, device_id: str) -> str:
    return f"down/{user_id}/{device_id}"
