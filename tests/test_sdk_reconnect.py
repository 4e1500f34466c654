"""A device whose connection is lost connects again by itself and misses nothing.

The device reaches the real server's MQTT listener through a relay on a loopback port of its
own, the network under it: the test cuts every connection through the relay, and has it refuse
(accept, then close at once) or swallow (accept, never answer) the attempts that follow, until
it lets them through again on the same port. Everything else is the real server. One test runs
a fake server on the real embedded broker instead (as tests/test_sdk_request.py does), which
drops the device's connection with a send unanswered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.embedded import PigeonBroker
from clients.sdk import Device, Event, Profile
from tests.conftest import NewUser, ServerProc, relay_pipe
from tests.fakes import until
from tests.test_e2e_messaging import next_of
from tests.test_sdk_request import DEVICE, USER, ScriptedServer, device_on, on_broker, request_object, synced


class Link:
    """A TCP relay on a fixed loopback port to ``target``. ``mode``: ``relay`` forwards,
    ``refuse`` closes each new connection at once, ``hole`` holds it and never answers.
    ``attempts`` counts the connections accepted; :meth:`cut` closes every open one."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "relay"
        self.attempts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self, mode: str) -> None:
        """Every connection through the relay closed; new ones treated as ``mode`` says."""
        self.mode = mode
        for writer in list(self._open):
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut("refuse")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        self._open.add(writer)
        if self.mode == "refuse":
            writer.close()
            return
        if self.mode == "hole":
            return  # (kept open, and closed by cut or stop)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._open.add(up_writer)
        for task in (asyncio.create_task(relay_pipe(reader, up_writer)),
                     asyncio.create_task(relay_pipe(up_reader, writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@pytest.fixture
async def link(server: ServerProc) -> AsyncIterator[Link]:
    relay = Link(server.mqtt_host, server.mqtt_port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


def through(profile: Profile, link: Link) -> Profile:
    """The profile, its MQTT connection made through ``link`` (which relays bytes: a TLS
    connection passes through it as it is, to the same host)."""
    return dataclasses.replace(profile, mqtt_port=link.port)


async def bodies_until(dev: Device, last: str, timeout: float = 15.0) -> list[Event]:
    """The device's msg events up to the one whose body is ``last``."""
    out: list[Event] = []
    while not out or out[-1]["body"] != last:
        out.append(await next_of(dev, "msg", timeout))
    return out


async def test_a_message_sent_while_the_device_was_cut_off_arrives_once_and_in_order(
        new_user: NewUser, connect: Any, link: Link) -> None:
    alice, bob = await new_user(), await new_user()
    da, db = await connect(alice), await connect(through(bob, link))
    await da.send("m0", to=bob.user_id)
    assert [e["body"] for e in await bodies_until(db, "m0")] == ["m0"]
    link.cut("refuse")  # the device's connection goes, and its first attempts to come back fail
    await until(lambda: link.attempts >= 2, timeout=10)  # (the device tries again by itself)
    for body in ("m1", "m2"):
        await da.send(body, to=bob.user_id)
    link.mode = "relay"
    got = await bodies_until(db, "m2")
    await da.send("m3", to=bob.user_id)  # live again
    got += await bodies_until(db, "m3")
    assert [e["body"] for e in got] == ["m1", "m2", "m3"]
    inbox = [e["inbox"] for e in got]
    assert inbox == sorted(set(inbox))
    await asyncio.sleep(0.5)
    assert not [e for e in db.pending_events() if e["type"] == "msg"]  # nothing came twice
    history = await da.api.history(got[0]["chat"])
    assert sorted(m["body"] for m in history["messages"]) == ["m0", "m1", "m2", "m3"]


async def test_a_send_made_while_disconnected_goes_out_once_the_device_is_back(
        new_user: NewUser, connect: Any, link: Link) -> None:
    alice, bob = await new_user(), await new_user()
    da, db = await connect(through(alice, link)), await connect(bob)
    chat = (await da.api.open_direct(bob.user_id))["chat"]
    link.cut("refuse")
    await until(lambda: link.attempts >= 2, timeout=10)  # lost, and trying to come back
    sending = asyncio.create_task(da.send("while away", chat=chat))
    await asyncio.sleep(1.0)
    assert not sending.done()  # waiting for the connection, not failed at once
    link.mode = "relay"
    async with asyncio.timeout(15):
        sent = await sending
    assert sent["type"] == "sent" and sent["chat"] == chat
    ev = await next_of(db, "msg")
    assert ev["body"] == "while away" and ev["seq"] == sent["seq"]
    history = await db.api.history(chat)
    assert [m["body"] for m in history["messages"]] == ["while away"]


@pytest.mark.parametrize("mode", ["refuse", "hole"])
async def test_close_while_connecting_again_returns_promptly_and_ends_events(
        new_user: NewUser, link: Link, mode: str) -> None:
    """``refuse``: closed while waiting before the next attempt; ``hole``: during an attempt
    the broker never answers."""
    dev = Device(through(await new_user(), link))
    await dev.__aenter__()
    taken: list[Event] = []

    async def take() -> None:
        async for event in dev.events():
            taken.append(event)

    taking = asyncio.create_task(take())
    try:
        link.cut(mode)
        await until(lambda: link.attempts >= (3 if mode == "refuse" else 2), timeout=10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):  # a hang guard; the bound is checked below
            await dev.close()
            await taking  # events() ended
        assert loop.time() - started < 3.0
        assert dev.state == "closed" and not dev.connected
    finally:
        taking.cancel()
        await dev.close()


async def test_the_application_sees_the_connection_state(new_user: NewUser, link: Link) -> None:
    states: list[str] = []
    dev = Device(through(await new_user(), link), on_state=states.append)
    assert dev.state == "connecting"
    await dev.__aenter__()
    try:
        assert dev.connected and states == ["online"]
        link.cut("refuse")
        await until(lambda: link.attempts >= 2, timeout=10)
        assert not dev.connected and dev.state in ("offline", "connecting")
        link.mode = "relay"
        await until(lambda: dev.connected, timeout=15)
        assert states[:3] == ["online", "offline", "connecting"] and states[-1] == "online"
    finally:
        await dev.close()
    assert states[-1] == "closed"


@dataclass
class DroppingServer:
    """Answers sync at once; drops the device's connection instead of answering its first send
    (the broker publishes its will, as for a lost one), and answers every later one."""

    broker: PigeonBroker
    port: int
    sends: list[str] = field(default_factory=list)  # the ids of the sends that came, in order
    drops: set[asyncio.Task[None]] = field(default_factory=set)

    async def ingest(self, topic: str, payload: bytes) -> None:
        msg = request_object(payload)
        if await synced(self.broker, msg) or msg.get("type") != "send":
            return
        self.sends.append(str(msg["id"]))
        if len(self.sends) == 1:
            drop = asyncio.create_task(self.broker.disconnect_device(DEVICE))
            self.drops.add(drop)
            drop.add_done_callback(self.drops.discard)
            return
        reply = {"type": "sent", "id": msg["id"], "chat": "c1", "seq": 1, "ts": 1}
        await self.broker.publish(f"down/{USER}/{DEVICE}", json.dumps(reply).encode(), 1)


async def test_a_send_cut_off_by_a_lost_connection_goes_again_on_the_next_one() -> None:
    async with on_broker(lambda broker, port: DroppingServer(broker=broker, port=port)) as server:
        reply_timeout = 5.0
        async with device_on(server.port, reply_timeout) as dev:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(3 * reply_timeout):
                sent = await dev.send("hi", to="u2")
            assert sent["type"] == "sent" and sent["seq"] == 1
            assert len(server.sends) == 2 and server.sends[0] == server.sends[1]  # once again, under its id
            # not after a reply timeout: the lost connection failed the wait at once
            assert loop.time() - started < reply_timeout


async def test_a_token_near_its_expiry_is_refreshed_before_connecting_and_again_on_a_reconnect(
        new_user: NewUser, connect: Any, link: Link, tmp_path: Any) -> None:
    """A device whose token expires within ``refresh_before_s`` asks for a new one before it
    connects, keeps it in its profile file, and connects with it; once it is no longer near
    its expiry it is kept, and a reconnect within the window refreshes again."""
    alice, bob = await new_user(), await new_user()
    soon = int(time.time() * 1000) + 3_600_000
    near = dataclasses.replace(through(alice, link), expires_at=soon)
    near.save(tmp_path / "alice.json")
    states: list[str] = []
    da = await connect(near, refresh_before_s=7 * 86_400, on_state=states.append)

    async def connection_cut_and_back() -> None:
        mark = len(states)
        link.cut("relay")
        await until(lambda: "offline" in states[mark:], timeout=10)
        await until(lambda: da.connected, timeout=15)

    first = da.profile.token
    assert first != alice.token and da.profile.expires_at > soon + 86_400_000
    assert Profile.load(tmp_path / "alice.json").token == first
    da._refresh_before_ms = 1_000  # (the new token is far from its expiry)
    await connection_cut_and_back()
    assert da.profile.token == first  # kept: not near its expiry
    da._refresh_before_ms = 10 * 365 * 86_400_000  # everything is near its expiry now
    await connection_cut_and_back()
    assert da.profile.token not in (first, alice.token)
    sent = await da.send("after refreshing", to=bob.user_id)
    assert sent["type"] == "sent"


async def test_a_token_refresh_that_breaks_or_a_connection_that_cannot_be_made_ends_no_reconnecting() -> None:
    """The refresh before connecting gets an answer the SDK cannot read, and the first attempt
    to make the next connection fails before any packet (its TLS context could not be made):
    the device connects all the same, and after a lost connection tries again until it is back."""
    async with on_broker(lambda broker, port: ScriptedServer(broker=broker, port=port)) as server:
        dev = device_on(server.port, 2.0)  # (its token "expires" at 0: refreshed before each connection)

        async def unreadable() -> dict[str, Any]:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")  # a page that is not JSON

        dev.api.refresh = unreadable  # type: ignore[method-assign]
        states: list[str] = []
        dev._on_state = states.append
        async with dev:
            made, broken = dev._mqtt_client, [True]

            def mqtt_client() -> Any:
                if broken:
                    broken.clear()
                    raise OSError("the CA file is gone")
                return made()

            dev._mqtt_client = mqtt_client  # type: ignore[method-assign]
            await server.broker.disconnect_device(DEVICE)
            await until(lambda: "offline" in states, timeout=10)
            await until(lambda: dev.connected, timeout=15)
            assert not broken and (await dev.send("back", chat="c1"))["type"] == "sent"
