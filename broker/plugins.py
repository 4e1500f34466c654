"""amqtt plugin adapters over :class:`broker.gate.DeviceGate`.

amqtt asks plugins for True/False; these adapters ask the gate for an explicit decision and
keep the principal (or the refusal code) on the session for the other hooks and the broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from .gate import DeviceGate, Principal, Refusal

log = logging.getLogger(__name__)
PRINCIPAL_ATTR = "pigeon_principal"
REFUSAL_ATTR = "pigeon_refusal"


def principal_of(session: Session | None) -> Principal | None:
    return getattr(session, PRINCIPAL_ATTR, None) if session is not None else None


def _gate(context: BaseContext) -> DeviceGate:
    gate = getattr(context.config, "gate", None)
    if not isinstance(gate, DeviceGate):
        raise TypeError("plugin config needs 'gate': a DeviceGate")
    return gate


class DeviceAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        gate: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        decision = await _gate(self.context).connect(
            session.client_id or "", session.username, session.password,
            session.will_topic if session.will_flag else None,
        )
        if decision.principal is None:
            setattr(session, REFUSAL_ATTR, decision.refusal or Refusal.NOT_AUTHORIZED)
            log.info("refused CONNECT from client %r: %s", session.client_id, decision.reason)
            return False
        setattr(session, PRINCIPAL_ATTR, decision.principal)
        return True


class TopicPermissionPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        gate: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        p = principal_of(session)
        if p is None or topic is None:
            return False
        gate = _gate(self.context)
        if action == Action.PUBLISH:
            return gate.may_publish(p, topic)
        if action == Action.SUBSCRIBE:
            return gate.may_subscribe(p, topic)
        if action == Action.RECEIVE:
            return gate.may_receive(p, topic)
        return False
