"""The embedded broker keeps the protocol's promises where stock amqtt 0.12.1 does not.

Each test here failed against stock amqtt's behaviour before the fix in broker/embedded.py
(see docs/architecture.md, "The embedded broker"). They run the real broker on free loopback
ports with real MQTT clients; only the token check is a small table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiomqtt
import pytest

from broker.embedded import PigeonBroker
from tests.conftest import embedded_broker, tok_tokens
from tests.mqtt_raw import connack_code, connect_packet, publish_packet, read_packet, subscribe_packet

USER = "u1"


@dataclass
class Harness:
    broker: PigeonBroker
    port: int
    received: list[tuple[str, bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0

    def client(self, device: str, **kw: object) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.port, identifier=device, username=device,
                              password=f"tok-{device}", clean_session=True, **kw)  # type: ignore[arg-type]

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        self.want = n
        if len(self.received) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    broker, port = await embedded_broker(tok_tokens(USER))
    h = Harness(broker=broker, port=port)

    async def ingest(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)  # the bridge awaits storage; make the broker wait too
        h.received.append((topic, payload))
        if h.want and len(h.received) >= h.want:
            h.arrived.set()

    broker.set_ingest(ingest)
    try:
        yield h
    finally:
        await broker.shutdown()


async def test_acknowledged_publishes_survive_an_immediate_disconnect(harness: Harness) -> None:
    n = 200
    async with harness.client("d1", max_inflight_messages=n) as c:
        await asyncio.gather(*(c.publish(f"up/{USER}/d1", json.dumps({"n": i}), qos=1) for i in range(n)))
    # every publish above was PUBACKed before the client disconnected
    await harness.wait_for(n)
    got = [json.loads(p)["n"] for t, p in harness.received if t == f"up/{USER}/d1"]
    assert got == list(range(n))


async def test_publish_then_socket_drop_is_still_delivered_before_the_will(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(connect_packet("d2", "d2", "tok-d2", will=(f"up/{USER}/d2", b'{"type":"presence","state":"offline"}')))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    for i in range(1, 51):
        writer.write(publish_packet(f"up/{USER}/d2", json.dumps({"n": i}).encode(), i))
    await writer.drain()
    acks = 0
    while acks < 50:
        kind, _ = await read_packet(reader)
        acks += kind == 0x40
    writer.close()  # no DISCONNECT: the will must follow the 50 publishes
    await harness.wait_for(51)
    payloads = [p for _t, p in harness.received]
    assert [json.loads(p).get("n") for p in payloads[:50]] == list(range(1, 51))
    assert json.loads(payloads[50]) == {"type": "presence", "state": "offline"}


async def test_refused_connect_does_not_disturb_the_real_device(harness: Harness) -> None:
    async with harness.client("d3") as victim:
        await victim.subscribe(f"down/{USER}/d3", qos=1)
        for password in ("wrong", "tok-someone-else"):
            code = await connack_code("127.0.0.1", harness.port, connect_packet("d3", "d3", password))
            assert code in (4, 5)
        # the victim is still connected, subscribed and receiving
        await harness.broker.publish(f"down/{USER}/d3", b'{"type":"ping"}', 1)
        async with asyncio.timeout(5):
            async for message in victim.messages:
                assert message.payload == b'{"type":"ping"}'
                break


async def test_silent_connection_is_closed_after_one_and_a_half_keepalives(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    will = b'{"type":"presence","state":"offline"}'
    writer.write(connect_packet("d4", "d4", "tok-d4", keepalive=1, will=(f"up/{USER}/d4", will)))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    started = asyncio.get_running_loop().time()
    # say nothing: the broker must give up on us and publish the will
    await harness.wait_for(1, timeout=10)
    assert harness.received == [(f"up/{USER}/d4", will)]
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the socket is closed
    assert asyncio.get_running_loop().time() - started >= 1.4
    writer.close()


async def test_takeover_by_the_same_device_keeps_it_subscribed_and_sends_no_will(harness: Harness) -> None:
    will = aiomqtt.Will(f"up/{USER}/d5", b'{"type":"presence","state":"offline"}', qos=1)
    first = harness.client("d5", will=will)
    await first.__aenter__()
    try:
        async with harness.client("d5") as second:
            await second.subscribe(f"down/{USER}/d5", qos=1)
            await harness.broker.publish(f"down/{USER}/d5", b"x", 1)
            async with asyncio.timeout(5):
                async for message in second.messages:
                    assert message.payload == b"x"
                    break
        assert harness.received == []
    finally:
        try:
            await first.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass


async def test_deliveries_are_not_skipped_while_other_subscribers_come_and_go(harness: Harness) -> None:
    # Subscribers that joined *before* the stable ones leave while messages are being fanned
    # out: in amqtt that shifts the live list under the walk and skips a stable subscriber.
    # amqtt drops disconnected sessions' subscriptions in a once-a-second sweep, so the
    # departures span several sweeps while the walk is busy.
    n, stable_count, early_count = 1500, 3, 60
    early: list[asyncio.StreamWriter] = []
    for k in range(early_count):
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(connect_packet(f"e{k}", f"e{k}", f"tok-e{k}"))
        writer.write(subscribe_packet(f"down/{USER}", 1))
        await writer.drain()
        await read_packet(reader)  # CONNACK
        await read_packet(reader)  # SUBACK
        early.append(writer)
    stable = [harness.client(f"s{i}") for i in range(stable_count)]
    for c in stable:
        await c.__aenter__()
        await c.subscribe(f"down/{USER}", qos=1)
    counts = [0] * stable_count
    done = asyncio.Event()

    async def count(i: int, c: aiomqtt.Client) -> None:
        async for _m in c.messages:
            counts[i] += 1
            if all(x >= n for x in counts):
                done.set()

    async def leave() -> None:
        for writer in early:
            await asyncio.sleep(0.05)
            writer.close()

    readers = [asyncio.create_task(count(i, c)) for i, c in enumerate(stable)]
    leaver = asyncio.create_task(leave())
    for i in range(n):
        await harness.broker.publish(f"down/{USER}", str(i).encode(), 1)
        if i % 5 == 0:
            await asyncio.sleep(0.01)
    await leaver
    try:
        await asyncio.wait_for(done.wait(), 30)
    except TimeoutError:
        pass
    finally:
        for t in readers:
            t.cancel()
        for c in stable:
            try:
                await c.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass
    assert counts == [n] * stable_count


async def test_a_departure_visits_only_the_leaving_clients_own_subscriptions(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stayers = [harness.client(f"st{i}") for i in range(30)]
    for c in stayers:
        await c.__aenter__()
        await c.subscribe([(f"down/{USER}", 1), (f"down/{USER}/{c.identifier}", 1)])
    visited: list[str] = []
    walk = harness.broker._del_subscription  # noqa: SLF001

    def counting(a_filter: str, session: object) -> int:
        visited.append(a_filter)
        return walk(a_filter, session)  # type: ignore[arg-type]

    async with harness.client("leaver") as leaver:
        await leaver.subscribe([(f"down/{USER}", 1), (f"down/{USER}/leaver", 1)])
        monkeypatch.setattr(harness.broker, "_del_subscription", counting)
    for _ in range(50):  # the departure is cleaned up by the broker's own loop
        if visited:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert sorted(set(visited)) == [f"down/{USER}", f"down/{USER}/leaver"] and len(visited) <= 4
    subs = harness.broker._subscriptions  # noqa: SLF001
    assert f"down/{USER}/leaver" not in subs  # its own filter is gone with it
    assert len(subs[f"down/{USER}"]) == 30 and all(f"down/{USER}/st{i}" in subs for i in range(30))
    for c in stayers:
        await c.__aexit__(None, None, None)


async def raw_device(harness: Harness, device: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(connect_packet(device, device, f"tok-{device}"))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    return reader, writer


def puback_id(packet: tuple[int, bytes]) -> int:
    kind, body = packet
    assert kind == 0x40, packet
    return int.from_bytes(body[:2], "big")


async def no_packet_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        await read_packet(reader, timeout=seconds)
    except TimeoutError:
        return True
    return False


async def test_puback_waits_until_the_bridge_has_handled_the_publish(harness: Harness) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def ingest(topic: str, payload: bytes) -> None:
        entered.set()
        await release.wait()  # the bridge is still storing the request
        handled.append(payload)

    harness.broker.set_ingest(ingest)
    reader, writer = await raw_device(harness, "h1")
    writer.write(publish_packet(f"up/{USER}/h1", b'{"n":1}', 7))
    await writer.drain()
    await asyncio.wait_for(entered.wait(), 5)
    # a PUBACK now would promise what a server killed this instant could not keep
    assert await no_packet_within(reader, 0.5)
    release.set()
    assert puback_id(await read_packet(reader)) == 7
    assert handled == [b'{"n":1}']
    writer.close()


async def test_pubacks_follow_handling_in_order_with_many_publishes_in_flight(harness: Harness) -> None:
    n = 100
    handled: list[int] = []

    async def ingest(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0.002 * (json.loads(payload)["n"] % 3))  # uneven store round trips
        handled.append(json.loads(payload)["n"])

    harness.broker.set_ingest(ingest)
    reader, writer = await raw_device(harness, "h2")
    for i in range(1, n + 1):  # a device with its whole in-flight window used
        writer.write(publish_packet(f"up/{USER}/h2", json.dumps({"n": i}).encode(), i))
    await writer.drain()
    acked: list[int] = []
    for _ in range(n):
        acked.append(puback_id(await read_packet(reader)))
        # each PUBACK only once that publish, and every one before it, was handled
        assert handled[: len(acked)] == acked, (handled, acked)
    assert acked == list(range(1, n + 1)) and handled == acked
    writer.close()


async def test_a_device_waiting_on_the_bridge_holds_up_no_other_device(harness: Harness) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def ingest(topic: str, payload: bytes) -> None:
        if topic.endswith("/slow"):
            await release.wait()
        handled.append(topic.rsplit("/", 1)[-1])

    harness.broker.set_ingest(ingest)
    slow_reader, slow_writer = await raw_device(harness, "slow")
    slow_writer.write(publish_packet(f"up/{USER}/slow", b"{}", 1))
    await slow_writer.drain()
    async with harness.client("quick") as quick:
        for _ in range(5):  # each publish returns on its PUBACK
            await asyncio.wait_for(quick.publish(f"up/{USER}/quick", b"{}", qos=1), 5)
    assert handled == ["quick"] * 5
    assert await no_packet_within(slow_reader, 0.2)  # the slow device is still unanswered
    release.set()
    assert puback_id(await read_packet(slow_reader)) == 1
    assert handled == ["quick"] * 5 + ["slow"]
    slow_writer.close()
