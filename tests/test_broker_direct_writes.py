"""The embedded broker writes the server's QoS 0 publishes to a device's socket at once, and a
device whose socket is behind still gets every one of them, whole and in order.

Real broker on a free loopback port, raw sockets as devices (tests/mqtt_raw.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from broker.embedded import DIRECT_WRITE_LIMIT, PigeonBroker, _Handler, qos0_publish
from tests.conftest import embedded_broker, tok_tokens
from tests.mqtt_raw import connect_packet, publish_packet, read_packet, subscribe_packet

USER = "u1"


@pytest.fixture
async def broker() -> AsyncIterator[tuple[PigeonBroker, int]]:
    b, port = await embedded_broker(tok_tokens(USER))
    try:
        yield b, port
    finally:
        await b.shutdown()


async def subscriber(port: int, device: str, topic: str, qos: int, rcvbuf: int | None = None,
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:  # a phone on a slow radio: little room before the broker must wait
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    writer.write(connect_packet(device, device, f"tok-{device}") + subscribe_packet(topic, 1, qos))
    await writer.drain()
    assert (await read_packet(reader))[0] == 0x20
    suback = await read_packet(reader)
    assert suback[0] == 0x90 and suback[1][2] == qos, suback
    return reader, writer


def publish_fields(packet: tuple[int, bytes]) -> tuple[int, str, bytes]:
    first, body = packet
    n = int.from_bytes(body[:2], "big")
    return first, body[2:2 + n].decode(), body[2 + n:]


def test_the_packet_written_is_the_mqtt_publish_of_the_payload() -> None:
    assert qos0_publish("a/b", b"hi") == b"\x30\x07\x00\x03a/bhi"
    long = qos0_publish("t", b"x" * 200)  # remaining length 203: two bytes, low seven bits first
    assert long[:3] == b"\x30\xcb\x01" and long[3:6] == b"\x00\x01t" and len(long) == 206


async def test_every_subscriber_gets_each_publish_whole_in_order_at_qos0(broker: tuple[PigeonBroker, int]) -> None:
    b, port = broker
    exact = await subscriber(port, "d1", f"down/{USER}", 1)
    other = await subscriber(port, "d2", f"down/{USER}", 0)
    sizes = [0, 1, 100, 130, 20_000, 5]
    for i, size in enumerate(sizes):
        await b.publish(f"down/{USER}", bytes([i]) * size, 0)
    for reader, _writer in (exact, other):
        got = [publish_fields(await read_packet(reader)) for _ in sizes]
        assert got == [(0x30, f"down/{USER}", bytes([i]) * size) for i, size in enumerate(sizes)]
    for _reader, writer in (exact, other):
        writer.close()


async def test_a_device_whose_socket_is_behind_gets_the_rest_in_order_once_it_reads(
    broker: tuple[PigeonBroker, int],
) -> None:
    b, port = broker
    reader, writer = await subscriber(port, "slow", f"down/{USER}", 0, rcvbuf=4096)
    handler = next(h for h, _ in b._deliveries(f"down/{USER}"))  # noqa: SLF001
    assert isinstance(handler, _Handler)
    chunk = 16 * 1024
    n, went_the_slow_way = 0, 0
    # the device reads nothing: once the kernel's buffers are full, the broker's own fills past
    # the limit, and from there on publishes wait their turn behind it
    while n * chunk < 256 * DIRECT_WRITE_LIMIT and went_the_slow_way < 50:
        await b.publish(f"down/{USER}", n.to_bytes(4, "big") * (chunk // 4), 0)
        n += 1
        if handler._behind:  # noqa: SLF001
            went_the_slow_way += 1
    assert went_the_slow_way == 50

    async def keep_publishing(until: int) -> None:  # while the device catches up
        nonlocal n
        while n < until:
            await b.publish(f"down/{USER}", n.to_bytes(4, "big") * (chunk // 4), 0)
            n += 1
            await asyncio.sleep(0.001)

    total = n + 300
    more = asyncio.create_task(keep_publishing(total))
    seen = 0
    while seen < total:
        first, topic, payload = publish_fields(await read_packet(reader, timeout=10))
        assert (first, topic, len(payload)) == (0x30, f"down/{USER}", chunk)
        assert int.from_bytes(payload[:4], "big") == seen  # nothing lost, nothing overtaken
        seen += 1
    await more
    assert seen == n
    for _ in range(50):
        if not b._writing:  # noqa: SLF001
            break
        await asyncio.sleep(0.02)
    assert not b._writing and handler._behind == 0  # noqa: SLF001
    writer.close()


async def test_pubacks_keep_their_order_while_the_socket_is_behind(broker: tuple[PigeonBroker, int]) -> None:
    b, port = broker
    handled: list[int] = []

    async def ingest(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)  # the bridge awaits its store
        handled.append(int(payload))

    b.set_ingest(ingest)
    reader, writer = await subscriber(port, "slow", f"down/{USER}", 0, rcvbuf=4096)
    handler = next(h for h, _ in b._deliveries(f"down/{USER}"))  # noqa: SLF001
    assert isinstance(handler, _Handler)
    # one publish larger than the limit, written at once: from here on the device's PUBACKs
    # wait for the socket, in amqtt's writer, one behind the other
    await b.publish(f"down/{USER}", b"x" * (16 * DIRECT_WRITE_LIMIT), 0)
    n = 400

    async def device_sends() -> None:  # requests keep coming while the device catches up
        for i in range(1, n + 1):
            writer.write(publish_packet(f"up/{USER}/slow", str(i).encode(), i))
            await writer.drain()
            await asyncio.sleep(0.0005 if i % 4 == 0 else 0)

    sends = asyncio.create_task(device_sends())
    await asyncio.sleep(0.05)
    acks: list[int] = []
    while len(acks) < n:
        first, body = await read_packet(reader, timeout=10)
        if first == 0x40:
            acks.append(int.from_bytes(body[:2], "big"))
    await sends
    assert acks == list(range(1, n + 1))  # in the order the publishes came [MQTT-4.6.0-2]
    assert handled == list(range(1, n + 1))
    writer.close()
