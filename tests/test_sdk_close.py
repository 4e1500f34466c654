"""Closing a device never hangs, even when its background task does not honour cancellation
(on Python 3.11, asyncio.wait_for can swallow a cancellation that races with its result)."""

from __future__ import annotations

import asyncio
import threading
import time

import aiomqtt
import pytest

import clients.sdk as sdk
from clients.sdk import Device, Profile


async def test_close_returns_when_the_background_task_ignores_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk, "CLOSE_STEP_S", 0.2)
    device = Device(Profile(http_url="http://127.0.0.1:9", user_id="u1", device_id="d1", token="t",
                            expires_at=0, mqtt_host="127.0.0.1", mqtt_port=9, ws_url="ws://127.0.0.1:9/mqtt"))
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed, as a racing wait_for can

    device._runner = asyncio.create_task(stubborn())  # noqa: SLF001
    try:
        async with asyncio.timeout(10):  # a hang guard, not a speed check
            await device.close()
        assert device._closing  # noqa: SLF001 - the SDK's own loops stop on this
    finally:
        release.set()
        await asyncio.sleep(0)


async def test_the_sdk_loops_stop_on_close_without_being_cancelled() -> None:
    device = Device(Profile(http_url="http://127.0.0.1:9", user_id="u1", device_id="d1", token="t",
                            expires_at=0, mqtt_host="127.0.0.1", mqtt_port=9, ws_url="ws://127.0.0.1:9/mqtt"))
    loops = [asyncio.create_task(device._ack_loop()), asyncio.create_task(device._sync_loop())]  # noqa: SLF001
    await asyncio.sleep(0)
    device._closing = True  # noqa: SLF001 - what close() sets before it cancels anything
    device._ack_wanted.set()  # noqa: SLF001
    device._sync_wanted.set()  # noqa: SLF001
    async with asyncio.timeout(5):
        await asyncio.gather(*loops)
    await device.api.close()


@pytest.mark.parametrize("attempt_of", ["reconnecting", "first"])
async def test_a_connection_still_being_made_when_the_device_closes_is_dropped_once_it_is_up(
        attempt_of: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiomqtt connects the socket (and says CONNECT) in a thread that a cancellation does not
    stop: a device closed meanwhile (or whose first connect was given up) left that connection
    up behind it, online to the broker. Here the thread is held until the attempt was
    cancelled; once the connection is up it is dropped. (A loopback listener that answers
    CONNECT with a CONNACK stands in for the broker.)"""
    accepted_then_closed = asyncio.Event()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = False
        try:
            while data := await reader.read(4096):
                if data[0] == 0x10:  # CONNECT: accepted
                    accepted = True
                    writer.write(b"\x20\x02\x00\x00")
                elif data[0] == 0xE0:  # DISCONNECT
                    break
        finally:
            if accepted:
                accepted_then_closed.set()
            writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    device = Device(Profile(http_url="http://127.0.0.1:9", user_id="u1", device_id="d1", token="t",
                            expires_at=int(time.time() * 1000) + 10**9, mqtt_host="127.0.0.1", mqtt_port=port,
                            ws_url="ws://127.0.0.1:9/mqtt"))
    monkeypatch.setattr(sdk, "RECONNECT_FIRST_S", 0.0)
    in_thread, go_on = threading.Event(), threading.Event()
    connect = aiomqtt.Client._client_connect

    def held_connect(client: aiomqtt.Client) -> None:
        in_thread.set()
        go_on.wait(10)
        connect(client)

    monkeypatch.setattr(aiomqtt.Client, "_client_connect", held_connect)
    try:
        attempt = asyncio.create_task(device._connect_again() if attempt_of == "reconnecting"  # noqa: SLF001
                                      else device.__aenter__())
        assert await asyncio.to_thread(in_thread.wait, 5)
        attempt.cancel()  # (what close() does to the reconnecting loop; a timeout around the first)
        with pytest.raises(asyncio.CancelledError):
            await attempt
        go_on.set()
        await asyncio.wait_for(accepted_then_closed.wait(), 5)  # a hang guard, not a speed check
    finally:
        go_on.set()
        server.close()
        await device.api.close()
