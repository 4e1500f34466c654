"""The bridge's outgoing publishes (``MqttIngest.publish_all``) on a real broker (the embedded
one): handed over in order without waiting for each acknowledgement, held while there is no
connection, never reordered."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from bridge.mqtt_ingest import MqttIngest, _Probe
from tests.conftest import embedded_broker, tok_tokens

USER, DEVICE, BRIDGE, SECRET = "u1", "d1", "pigeon-bridge", "bridge-secret"


async def test_publish_all_keeps_order_and_waits_for_a_connection() -> None:
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))

    async def ignore(topic: str, payload: bytes) -> None:
        return None

    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-t",
                        handle=ignore)
    topic = f"down/{USER}/{DEVICE}"
    items = [(topic, str(i).encode(), 1) for i in range(600)]
    runner: asyncio.Task[None] | None = None
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier=DEVICE, username=DEVICE,
                                  password=f"tok-{DEVICE}") as device:
            await device.subscribe(topic, qos=1)
            early = asyncio.create_task(ingest.publish_all(items[:100]))  # no connection yet: held
            await asyncio.sleep(0.3)
            assert not early.done()
            runner = asyncio.create_task(ingest.run())
            await asyncio.wait_for(early, 5)
            await ingest.publish_all(items[100:])  # returns once handed over, not once acknowledged
            got: list[int] = []
            async with asyncio.timeout(20):
                async for message in device.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(int(message.payload))
                    if len(got) == len(items):
                        break
            assert got == list(range(len(items)))
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()


def test_a_probe_measures_the_wait_before_reading_and_trusts_nothing_until_one_came_back() -> None:
    probe = _Probe("pigeon-bridge-ks-p3")
    assert probe.topic == "up/~probe/pigeon-bridge-ks-p3"
    probe.sent_at = 100.0
    assert probe.lag(160.0) == 0.0  # none came back yet: a broker that drops probes means 0
    probe.came_back(probe.payload(100.0), 100.5)
    assert probe.seen and probe.sent_at is None and probe.lag(200.0) == pytest.approx(0.5)
    probe.sent_at = 200.0
    assert probe.lag(202.0) == pytest.approx(2.0)  # on its way for 2 s: at least that
    probe.came_back(b"1:199.0", 203.0)  # another process's: ignored
    probe.came_back(probe.payload(150.0), 203.0)  # an older one of ours: its wait, still waiting
    assert probe.lag(203.0) == pytest.approx(53.0) and probe.sent_at == 200.0
    probe.came_back(probe.payload(200.0), 203.5)
    assert probe.lag(300.0) == pytest.approx(3.5)


async def test_probes_come_back_through_the_broker_and_are_never_handled_as_requests() -> None:
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))
    handled: list[str] = []
    got = asyncio.Event()

    async def handle(topic: str, payload: bytes) -> None:
        handled.append(topic)
        got.set()

    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-p",
                        handle=handle, persistent=True)
    runner = asyncio.create_task(ingest.run())
    try:
        await ingest.wait_connected(10)
        for _ in range(200):  # 10 s
            if any(p.seen for p in ingest._probes.values()):
                break
            await asyncio.sleep(0.05)
        probe = next(iter(ingest._probes.values()))
        assert probe.seen, "no probe came back within 10 s"
        assert 0.0 <= probe.lag(time.monotonic()) < 5.0
        async with aiomqtt.Client("127.0.0.1", port, identifier=DEVICE, username=DEVICE,
                                  password=f"tok-{DEVICE}") as device:
            await device.publish(f"up/{USER}/{DEVICE}", b"{}", qos=1)
            await asyncio.wait_for(got.wait(), 10)
            await asyncio.sleep(0.6)  # time for more probes to go round
        assert handled == [f"up/{USER}/{DEVICE}"]  # the device's; no probe among them
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()
