"""A login's subscription of its user's device topics on the partition's broker session
(``MqttIngest.subscribe_user``): the SUBACK is waited for, but not past ``SUBACK_WAIT_S``."""

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt
import pytest

from bridge.mqtt_ingest import SUBACK_WAIT_S, MqttIngest


class Session:
    """A partition's broker session whose SUBACK comes after ``delay`` seconds (a broker whose
    queue toward the bridge is that long), or a refusal."""

    def __init__(self, delay: float, refuse: bool = False) -> None:
        self.delay, self.refuse = delay, refuse
        self.topics: list[str] = []

    async def subscribe(self, topic: str, qos: int = 0) -> tuple[int, ...]:
        self.topics.append(topic)
        await asyncio.sleep(self.delay)
        if self.refuse:
            raise aiomqtt.MqttError("SUBACK refused")
        return (qos,)


def ingest_with(part: int, session: Session) -> MqttIngest:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    ingest = MqttIngest("127.0.0.1", 1, username="bridge", password="secret", client_id="bridge-t", handle=ignore)
    ingest._sessions[part] = session  # type: ignore[assignment]
    ingest._session_ready[part] = asyncio.Event()
    ingest._session_ready[part].set()
    return ingest


async def test_a_prompt_suback_is_waited_for_and_a_prompt_refusal_fails_the_login() -> None:
    quick = Session(0.01)
    ingest = ingest_with(3, quick)
    await ingest.subscribe_user(3, "u1")
    assert quick.topics == ["up/u1/+"] and ingest.slow_subacks == 0
    ingest = ingest_with(3, Session(0.01, refuse=True))
    with pytest.raises(aiomqtt.MqttError):
        await ingest.subscribe_user(3, "u1")


async def test_a_suback_stuck_behind_a_flood_holds_the_login_only_so_long_and_a_late_refusal_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    slow = Session(SUBACK_WAIT_S + 0.7, refuse=True)
    ingest = ingest_with(5, slow)
    t0 = time.monotonic()
    await ingest.subscribe_user(5, "u2")
    waited = time.monotonic() - t0
    assert SUBACK_WAIT_S <= waited < SUBACK_WAIT_S + 0.5, waited
    assert slow.topics == ["up/u2/+"] and ingest.slow_subacks == 1
    with caplog.at_level(logging.ERROR, logger="bridge.mqtt_ingest"):
        await asyncio.sleep(1.0)
    assert "subscribing to u2's device topics failed late" in caplog.text
