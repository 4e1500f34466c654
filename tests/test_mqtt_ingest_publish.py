"""The bridge's outgoing publishes (``MqttIngest.publish_all``) on a real broker (the embedded
one): handed over in order without waiting for each acknowledgement, held while there is no
connection, never reordered."""

from __future__ import annotations

import asyncio

import aiomqtt

from bridge.mqtt_ingest import MqttIngest
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
