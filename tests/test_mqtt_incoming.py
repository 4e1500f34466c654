"""bridge/mqtt_ingest.py's ``_incoming``: a client's received publishes in order, then the end
of its connection as aiomqtt's own iterator reports it, without a task per publish."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from bridge.mqtt_ingest import _incoming


def client_state() -> Any:
    """A client never connected: ``_incoming`` reads only its queue and the future of its end."""
    return aiomqtt.Client("127.0.0.1")


async def test_what_was_received_comes_in_order_then_the_end_with_its_cause() -> None:
    client = client_state()
    for i in range(3):
        client._queue.put_nowait(i)
    got: list[Any] = []
    lost = ConnectionResetError("the broker went away")

    async def read() -> None:
        async for message in _incoming(client):
            got.append(message)
            if message == 2:
                asyncio.get_running_loop().call_soon(client._queue.put_nowait, 3)
                asyncio.get_running_loop().call_soon(client._disconnected.set_exception, lost)

    with pytest.raises(aiomqtt.MqttError, match="Disconnected") as caught:
        await asyncio.wait_for(read(), 5)
    assert got == [0, 1, 2, 3]  # received before the end: still taken
    assert caught.value.__cause__ is lost
    assert client._disconnected.done() and not client._disconnected._callbacks  # no callback left behind


async def test_a_clean_end_while_waiting_ends_the_iteration_too() -> None:
    client = client_state()
    tasks_before = len(asyncio.all_tasks())

    async def read() -> list[Any]:
        got = []
        async for message in _incoming(client):
            got.append(message)
        return got

    reading = asyncio.create_task(read())
    for i in range(50):
        client._queue.put_nowait(i)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == tasks_before + 1  # the reader alone: no task per publish
    client._disconnected.set_result(None)
    with pytest.raises(aiomqtt.MqttError):
        await asyncio.wait_for(reading, 5)
