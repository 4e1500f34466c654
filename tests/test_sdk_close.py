"""Closing a device never hangs, even when its background task does not honour cancellation
(on Python 3.11, asyncio.wait_for can swallow a cancellation that races with its result)."""

from __future__ import annotations

import asyncio

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
