"""Keepalive on every profile: a device silent for 1.5 × its keepalive is offline in time.

On the embedded broker the broker itself closes the connection and publishes the will. On
Mosquitto 2.0 the broker's check runs only every 6 s on whole seconds, so the bridge holds a
device that stated its keepalive to it (bridge/presence.py): the watcher sees the device go
offline within 1.5 × keepalive plus a small margin on both profiles.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tests.conftest import NewUser, ServerProc
from tests.mqtt_raw import publish_packet, raw_device, read_packet
from tests.test_e2e_messaging import next_of

KEEPALIVE = 2
# the bridge's timer and the presence fan-out, on a machine other tests load too
MARGIN_S = 1.5
ONLINE = b'{"type":"presence","state":"online","keepalive":2}'


async def publish_and_wait_puback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: str,
                                  payload: bytes, packet_id: int) -> None:
    writer.write(publish_packet(up, payload, packet_id))
    await writer.drain()
    while True:  # replies and events may come first; the PUBACK is what counts
        first, _ = await read_packet(reader, timeout=10)
        if first == 0x40:
            return


async def test_a_silent_device_is_offline_within_one_and_a_half_keepalives(
    new_user: NewUser, connect: Any, server: ServerProc,
) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)  # a shares a chat with b: may watch b
    await da.watch([b.user_id], ttl=60)
    reader, writer, up = await raw_device(server.mqtt_host, server.mqtt_port, b, keepalive=KEEPALIVE)
    try:
        await publish_and_wait_puback(reader, writer, up, ONLINE, 1)
        last_publish_ms = int(time.time() * 1000)
        last_publish = time.monotonic()
        await next_of(da, "presence", timeout=10, user=b.user_id, online=True)
        # b never publishes or pings again
        offline = await next_of(da, "presence", timeout=20, user=b.user_id, online=False)
        elapsed = time.monotonic() - last_publish
        assert elapsed <= 1.5 * KEEPALIVE + MARGIN_S, f"offline after {elapsed:.2f} s ({server.profile})"
        assert last_publish_ms - 1000 <= offline["last_seen"] <= last_publish_ms + (1.5 * KEEPALIVE + MARGIN_S) * 1000
        seen = await da.api.presence(b.user_id)
        assert seen["online"] is False and seen["last_seen"] == offline["last_seen"]
    finally:
        writer.close()


async def test_a_device_that_keeps_publishing_stays_online(new_user: NewUser, connect: Any, server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)
    await da.watch([b.user_id], ttl=60)
    reader, writer, up = await raw_device(server.mqtt_host, server.mqtt_port, b, keepalive=KEEPALIVE)
    try:
        await publish_and_wait_puback(reader, writer, up, ONLINE, 1)
        await next_of(da, "presence", timeout=10, user=b.user_id, online=True)
        started = time.monotonic()
        for i in range(6):  # 6 s: twice the allowance, with a publish every second
            await asyncio.sleep(1)
            await publish_and_wait_puback(reader, writer, up, json.dumps({"type": "sync", "id": f"s{i}"}).encode(),
                                          2 + i)
        stopped = time.monotonic()
        # the first offline event must come after the publishes stopped, not during them
        await next_of(da, "presence", timeout=20, user=b.user_id, online=False)
        assert time.monotonic() - stopped >= 1.5 * KEEPALIVE - 0.5, time.monotonic() - started
    finally:
        writer.close()


async def test_an_idle_sdk_device_with_a_short_keepalive_stays_online(
    new_user: NewUser, connect: Any, server: ServerProc,
) -> None:
    """The SDK states its keepalive and keeps it with a publish when idle: silent for the
    application, never silent for the server."""
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)
    await da.watch([b.user_id], ttl=60)
    db = await connect(b, keepalive=KEEPALIVE)
    await next_of(da, "presence", timeout=10, user=b.user_id, online=True)
    await asyncio.sleep(3 * 1.5 * KEEPALIVE)  # idle for three allowances
    await db.send("still here", to=a.user_id)
    async with asyncio.timeout(10):
        while True:  # every presence change of b until its message arrives: none may be offline
            ev = await da.next_event()
            assert not (ev["type"] == "presence" and ev.get("user") == b.user_id and not ev["online"]), ev
            if ev["type"] == "msg" and ev.get("body") == "still here":
                break
