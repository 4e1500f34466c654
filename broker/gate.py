"""Who may connect, publish and subscribe: a small typed decision interface.

The broker adapters (``broker.plugins``) translate amqtt's hooks into these calls, so no
amqtt detail leaks into the rules, and another broker integration can reuse them.
Permissions follow protocol section 2:

==============================  ======================  ==========================
topic                           device may publish      device may subscribe
==============================  ======================  ==========================
``up/{user}/{device}``          its own only            never
``down/{user}``                 never                   its own user's
``down/{user}/{device}``        never                   its own only
``down/{user}/v2``              never                   its own user's (protocol v2)
anything else                   never                   never
==============================  ======================  ==========================

The bridge's own identity (``privileged``) may subscribe to ``up/+/+`` and publish anywhere
under ``down/``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class Refusal(IntEnum):
    """CONNACK return codes used when a CONNECT is refused."""

    BAD_CREDENTIALS = 4
    NOT_AUTHORIZED = 5


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    device_id: str
    privileged: bool = False


@dataclass(frozen=True, slots=True)
class ConnectDecision:
    principal: Principal | None
    refusal: Refusal | None = None
    reason: str = ""

    @classmethod
    def accept(cls, principal: Principal) -> ConnectDecision:
        return cls(principal=principal)

    @classmethod
    def refuse(cls, refusal: Refusal, reason: str) -> ConnectDecision:
        return cls(principal=None, refusal=refusal, reason=reason)


class TokenCheck(Protocol):
    async def __call__(self, token: str) -> tuple[str, str] | None:
        """(user_id, device_id) the token was issued to, or None if it is not valid."""


class DeviceGate:
    """Device identity is the token's device; the bridge has its own secret credential."""

    def __init__(self, check_token: TokenCheck, bridge_username: str | None = None,
                 bridge_password: str | None = None) -> None:
        self._check_token = check_token
        self._bridge_user = bridge_username
        self._bridge_password = bridge_password

    async def connect(self, client_id: str, username: str | None, password: str | None,
                      will_topic: str | None) -> ConnectDecision:
        if not username or not password:
            return ConnectDecision.refuse(Refusal.BAD_CREDENTIALS, "username and password are required")
        if self._bridge_user and username == self._bridge_user:
            if self._bridge_password and hmac.compare_digest(password, self._bridge_password):
                return ConnectDecision.accept(Principal("", client_id, privileged=True))
            return ConnectDecision.refuse(Refusal.BAD_CREDENTIALS, "bad bridge credentials")
        ident = await self._check_token(password)
        if ident is None:
            return ConnectDecision.refuse(Refusal.BAD_CREDENTIALS, "invalid or expired token")
        user_id, device_id = ident
        if username != device_id or client_id != device_id:
            return ConnectDecision.refuse(Refusal.NOT_AUTHORIZED, "client id and username must be the device id")
        if will_topic is not None and will_topic != f"up/{user_id}/{device_id}":
            return ConnectDecision.refuse(Refusal.NOT_AUTHORIZED, "the will must go to the device's own up topic")
        return ConnectDecision.accept(Principal(user_id, device_id))

    @staticmethod
    def may_publish(p: Principal, topic: str) -> bool:
        if p.privileged:  # and its probes of how long device publishes wait (bridge/mqtt_ingest.py)
            return topic.startswith(("down/", "up/~probe/"))
        return topic == f"up/{p.user_id}/{p.device_id}"

    @staticmethod
    def may_subscribe(p: Principal, topic_filter: str) -> bool:
        if p.privileged:
            return topic_filter in ("up/+/+", "$share/pigeon/up/+/+") or topic_filter.startswith("$share/pigeon/up/")
        return topic_filter in (f"down/{p.user_id}", f"down/{p.user_id}/{p.device_id}", f"down/{p.user_id}/v2")

    @staticmethod
    def may_receive(p: Principal, topic: str) -> bool:
        if p.privileged:
            return topic.startswith("up/")
        return topic in (f"down/{p.user_id}", f"down/{p.user_id}/{p.device_id}", f"down/{p.user_id}/v2")
