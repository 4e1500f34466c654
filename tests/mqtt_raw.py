"""Hand-built MQTT 3.1.1 packets, for tests that need a client no library would be:
one that never pings, or that checks the exact CONNACK code."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from clients.bench.mqtt import mqtt_str, varint


def connect_packet(client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 60, will: tuple[str, bytes] | None = None, clean: bool = True) -> bytes:
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3)  # will, QoS 1
        payload += mqtt_str(will[0]) + mqtt_str(will[1])
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_str(password)
    var = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = var + payload
    return bytes([0x10]) + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = mqtt_str(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32]) + varint(len(body)) + body


def subscribe_packet(topic: str, packet_id: int, qos: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + mqtt_str(topic) + bytes([qos])
    return bytes([0x82]) + varint(len(body)) + body


async def connack_code(host: str, port: int, packet: bytes, timeout: float = 5.0) -> int:
    """Send a CONNECT and return the CONNACK return code (closing afterwards)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(packet)
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(4), timeout)
        assert data[0] == 0x20, data
        return data[3]
    finally:
        writer.close()


async def read_packet(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes]:
    first = (await asyncio.wait_for(reader.readexactly(1), timeout))[0]
    mult, length = 1, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return first, await reader.readexactly(length)


OFFLINE_WILL = b'{"type":"presence","state":"offline"}'


async def raw_device(host: str, port: int, profile: Any, *, keepalive: int,
                     will: bytes = OFFLINE_WILL) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A device's own MQTT connection on a raw socket (no client library to ping for it), with
    a will on its ``up`` topic; returns once the broker has accepted it."""
    up = f"up/{profile.user_id}/{profile.device_id}"
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet(profile.device_id, profile.device_id, profile.token, keepalive=keepalive,
                                will=(up, will)))
    await writer.drain()
    first, body = await read_packet(reader)
    assert first == 0x20 and body[1] == 0, (first, body)
    return reader, writer, up
