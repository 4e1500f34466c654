"""``Device.request()`` never loses a reply that beats the PUBACK of its publish.

The embedded broker and the bridge PUBACK a device's publish only once the server has handled
it, so the reply (``sent``, ``error``...) can reach the device before the PUBACK, and the PUBACK
can take as long as the handling. These tests run the real embedded broker on a free loopback
port with a fake server as its ingest: it answers on the device's down topic and then holds the
PUBACK. ``request()`` must return the reply as soon as it arrives, and wait at most its timeout
in all (the PUBACK wait does not get a timeout of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from bridge.wire_v2 import is_v2, parse_request_v2
from broker.embedded import PigeonBroker
from clients.sdk import Device, PigeonClientError, Profile, RequestTimeout
from tests.conftest import embedded_broker, tok_tokens

USER = "u1"
DEVICE = "d1"
TIMEOUT = 1.0  # the device's reply timeout in these tests
F = TypeVar("F", bound="Fake")


def request_object(payload: bytes) -> dict[str, object]:
    """What the fake needs of a request, in either protocol version (the SDK speaks v2)."""
    if not is_v2(payload):
        return dict(json.loads(payload))
    req = parse_request_v2(payload, 1 << 16)
    return {"type": req.type, "id": getattr(req, "id", None), "after": getattr(req, "after", 0)}


async def synced(broker: PigeonBroker, msg: dict[str, object]) -> bool:
    """Answer a ``sync`` with nothing waiting (the device syncs as it connects); False for
    anything else."""
    if msg.get("type") != "sync":
        return False
    batch = {"type": "batch", "id": msg["id"], "items": [], "last": msg.get("after", 0), "more": False}
    await broker.publish(f"down/{USER}/{DEVICE}", json.dumps(batch).encode(), 1)
    return True


@dataclass
class FakeServer:
    """Answers sync at once; answers a ``send`` with ``reply`` (if any), then holds its PUBACK."""

    broker: PigeonBroker
    port: int
    # what to answer a send with (its id is filled in); the SDK checks replies, so a complete one
    reply: dict[str, object] | None = None
    hold: float = 0.0  # how long the send's handling (and so its PUBACK) takes
    release: asyncio.Event = field(default_factory=asyncio.Event)
    sends: int = 0

    async def ingest(self, topic: str, payload: bytes) -> None:
        msg = request_object(payload)
        down = f"down/{USER}/{DEVICE}"
        if await synced(self.broker, msg):
            return
        if msg.get("type") == "send":
            self.sends += 1
            if self.reply is not None:
                await self.broker.publish(down, json.dumps({**self.reply, "id": msg["id"]}).encode(), 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.hold)

    def device(self) -> Device:
        return device_on(self.port, TIMEOUT)


def device_on(port: int, reply_timeout: float) -> Device:
    """The test device, on the embedded broker at ``port``."""
    profile = Profile(http_url="http://127.0.0.1:9", user_id=USER, device_id=DEVICE, token=f"tok-{DEVICE}",
                      expires_at=0, mqtt_host="127.0.0.1", mqtt_port=port, ws_url="ws://127.0.0.1:9/mqtt")
    return Device(profile, reply_timeout=reply_timeout)


class Fake(Protocol):
    async def ingest(self, topic: str, payload: bytes) -> None: ...


@contextlib.asynccontextmanager
async def on_broker(make: Callable[[PigeonBroker, int], F]) -> AsyncIterator[F]:
    """A fake server (``make(broker, port)``) as the ingest of a real embedded broker."""
    broker, port = await embedded_broker(tok_tokens(USER))
    fake = make(broker, port)
    broker.set_ingest(fake.ingest)
    try:
        yield fake
    finally:
        await broker.shutdown()


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with on_broker(lambda broker, port: FakeServer(broker=broker, port=port)) as fake:
        try:
            yield fake
        finally:
            fake.release.set()


async def test_a_reply_that_beats_a_held_puback_is_returned(server: FakeServer) -> None:
    async with server.device() as dev:
        server.reply = {"type": "sent", "chat": "c1", "seq": 7, "ts": 1}
        server.hold = 3 * TIMEOUT  # the PUBACK comes long after the request's timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = await dev.request({"type": "send", "to": "u2", "body": "hi"})
        finally:
            server.release.set()
        assert reply["type"] == "sent" and reply["seq"] == 7
        assert loop.time() - started < TIMEOUT  # returned when the reply came, not at the PUBACK
        assert server.sends == 1


async def test_an_error_that_beats_a_held_puback_is_raised_as_itself(server: FakeServer) -> None:
    async with server.device() as dev:
        server.reply = {"type": "error", "code": "unavailable", "message": "store down", "retry_after_ms": 100}
        server.hold = 3 * TIMEOUT
        try:
            with pytest.raises(PigeonClientError) as caught:
                await dev.request({"type": "send", "to": "u2", "body": "hi"})
        finally:
            server.release.set()
        assert caught.value.code == "unavailable"
        assert caught.value.retry_after_ms == 100


async def test_send_returns_the_reply_that_beats_a_held_puback_without_a_retry(server: FakeServer) -> None:
    async with server.device() as dev:
        server.reply = {"type": "sent", "chat": "c1", "seq": 1, "ts": 1}
        server.hold = 3 * TIMEOUT
        try:
            reply = await dev.send("hi", to="u2", retries=1)
        finally:
            server.release.set()
        assert reply["type"] == "sent"
        assert server.sends == 1  # no second attempt: the first reply was not lost


async def test_the_puback_wait_and_the_reply_wait_share_one_timeout(server: FakeServer) -> None:
    async with server.device() as dev:
        server.reply = None  # never answers
        server.hold = 0.9 * TIMEOUT  # the PUBACK comes late, but within the timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout):
            await dev.request({"type": "send", "to": "u2", "body": "hi"})
        # one timeout in all (was the PUBACK's wait plus a whole reply timeout after it: 1.9 of them)
        assert loop.time() - started < 1.5 * TIMEOUT


async def test_only_a_fresh_sent_tells_the_device_its_direct_chat_with_a_user(server: FakeServer) -> None:
    """A v2 live ``msg`` from the peer of a direct chat leaves the chat out, and the device fills
    it in from what it learnt. A ``sent`` answered from an earlier attempt under the same id (no
    ``inbox``) is about that attempt, in whatever chat it was (here a group): learning from it
    would file the peer's later messages under that chat."""
    async with server.device() as dev:
        server.reply = {"type": "sent", "chat": "g1", "seq": 4, "ts": 1}  # an earlier attempt's, in a group
        reply = await dev.send("hi", to="u2", id="42")
        assert reply["chat"] == "g1"
        assert "u2" not in dev._peers
        server.reply = {"type": "sent", "chat": "c9", "seq": 1, "ts": 1, "inbox": 1}  # fresh: found by ``to``
        await dev.send("hi", to="u3")
        assert dev._peers["u3"] == "c9"


async def test_the_direct_chats_a_device_learnt_outlive_it_in_its_profile(server: FakeServer, tmp_path: Path) -> None:
    """Saved with the profile, so after a restart a live msg from a known peer needs no sync."""
    from clients.sdk import PEERS_SAVED, Device, Profile

    async with server.device() as dev:
        for n in range(PEERS_SAVED + 2):
            server.reply = {"type": "sent", "chat": f"c{n}", "seq": 1, "ts": 1, "inbox": n + 1}
            await dev.send("hi", to=f"u{n}")
        server.reply = {"type": "sent", "chat": "c0", "seq": 2, "ts": 1, "inbox": PEERS_SAVED + 3}
        await dev.send("again", to="u0")  # u0 is the newest again
        saved = dev.profile.peers
        assert len(saved) == PEERS_SAVED and list(saved)[-1] == "u0" and "u2" not in saved and "u3" in saved
        dev.profile.save(tmp_path / "p.json")
        again = Device(Profile.load(tmp_path / "p.json"))
        assert again._peers["u0"] == "c0" and again._peers[f"u{PEERS_SAVED + 1}"] == f"c{PEERS_SAVED + 1}"
        assert "u1" not in again._peers and "u2" not in again._peers
