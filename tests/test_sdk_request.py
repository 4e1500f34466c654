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


@dataclass
class ScriptedServer:
    """Answers sync at once, and each send as ``script`` says for its body: ``ok`` (``sent``),
    ``refuse`` (``rate_limited``, come back in 50 ms) or ``drop`` (nothing: the device's attempt
    times out); a body not in ``script`` gets ``ok``. ``seen`` is every send attempt, by body, in
    the order they arrived; :meth:`answer_late` answers one whose attempt was dropped."""

    broker: PigeonBroker
    port: int
    script: dict[str, list[str]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    inbox: int = 0

    async def ingest(self, topic: str, payload: bytes) -> None:
        msg = request_object(payload)
        if await synced(self.broker, msg) or msg.get("type") != "send":
            return
        req = parse_request_v2(payload, 1 << 16) if is_v2(payload) else None
        body = str(getattr(req, "body", None) or json.loads(payload).get("body"))
        self.seen.append(body)
        self.ids[body] = str(msg["id"])
        plan = self.script.get(body) or ["ok"]
        step = plan.pop(0) if len(plan) > 1 else plan[0]
        if step == "ok":
            await self.answer(body)
        elif step == "refuse":
            refusal = {"type": "error", "id": msg["id"], "code": "rate_limited", "message": "later",
                       "retry_after_ms": 50}
            await self.broker.publish(f"down/{USER}/{DEVICE}", json.dumps(refusal).encode(), 1)

    async def answer(self, body: str) -> None:
        self.inbox += 1
        sent = {"type": "sent", "id": self.ids[body], "chat": "c1", "seq": self.inbox, "ts": 1_700_000_000_000,
                "inbox": self.inbox}
        await self.broker.publish(f"down/{USER}/{DEVICE}", json.dumps(sent).encode(), 1)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    async with on_broker(lambda broker, port: ScriptedServer(broker=broker, port=port)) as fake:
        yield fake


async def test_a_send_going_again_waits_for_an_earlier_one_still_waiting_for_its_first_reply(
        scripted: ScriptedServer) -> None:
    """The first send's first attempt is lost (no reply), the second is refused and comes back
    at once: its second attempt waits until the first is through, so the server sees the first
    again before the second again, and numbers them in the order they were made."""
    scripted.script = {"one": ["drop", "ok"], "two": ["refuse", "ok"]}
    async with device_on(scripted.port, TIMEOUT) as dev:
        one = asyncio.create_task(dev.send("one", to="u2", retries=2))
        await asyncio.sleep(0.05)
        two = asyncio.create_task(dev.send("two", to="u2", retries=2))
        replies = await asyncio.wait_for(asyncio.gather(one, two), 10 * TIMEOUT)
    assert scripted.seen == ["one", "two", "one", "two"]
    assert [r["seq"] for r in replies] == [1, 2]


async def test_a_late_reply_to_a_request_given_up_on_is_not_an_event_and_a_late_sent_is_the_own_message(
        scripted: ScriptedServer) -> None:
    """A request that timed out has its reply come after all: it is not handed to the
    application as an event. A send given up on whose ``sent`` (v2: naming the inbox position
    of the device's own message) comes late puts that message in the stream, as the send would
    have; a request published by the application itself still has its reply in the events."""
    scripted.script = {"lost": ["drop"]}
    async with device_on(scripted.port, TIMEOUT) as dev:
        with pytest.raises(RequestTimeout):
            await dev.send("lost", chat="c1", retries=0)
        await scripted.answer("lost")
        own = await asyncio.wait_for(dev.next_event(), 5)
        assert (own["type"], own["body"], own["inbox"], own["from"]) == ("msg", "lost", 1, USER)
        scripted.script["dropped too"] = ["drop"]
        with pytest.raises(RequestTimeout):
            await dev.request({"type": "send", "id": "r9", "chat": "c1", "body": "dropped too"}, timeout=0.2)
        await scripted.broker.publish(f"down/{USER}/{DEVICE}", json.dumps(
            {"type": "error", "id": "r9", "code": "not_found", "message": "late"}).encode(), 1)
        await dev._publish({"type": "send", "id": "mine", "chat": "c1", "body": "by hand"})
        reply = await asyncio.wait_for(dev.next_event(), 5)
        assert (reply["type"], reply["id"]) == ("sent", "mine")  # (the late error was not an event)
