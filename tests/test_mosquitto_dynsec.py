"""Devices on a real Mosquitto, provisioned through its dynamic-security plugin.

The broker is the one scripts/services started; the bridge credential comes from the file it
wrote. Every refusal of protocol section 2 is checked with raw MQTT packets.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import aiomqtt
import httpx
import pytest

from bridge.mqtt_ingest import PROBE_PREFIX
from broker.dynsec import DynSecAdmin
from clients.launch import ServerProc
from clients.sdk import Device, login
from tests.conftest import fresh_phone, production_flags, production_url
from tests.mqtt_raw import connack_code, connect_packet, read_packet, subscribe_packet


def broker() -> tuple[str, int, str, str]:
    url = urlparse(production_url("PIGEON_BROKER", "mqtt://"))
    creds = Path(production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/")).read_text().strip()
    user, _, password = creds.partition(":")
    return url.hostname or "127.0.0.1", url.port or 1883, user, password


@pytest.fixture
async def admin() -> AsyncIterator[DynSecAdmin]:
    host, port, user, password = broker()
    async with DynSecAdmin(host, port, user, password) as a:
        await a.check_bridge_role()
        yield a


async def only_its_own_topic_reaches_the_bridge(user: str, device: str, token: str,
                                                tries: list[tuple[str, bytes]]) -> None:
    """The device publishes on each of ``tries`` (refused silently), then on its own ``up``
    topic: the bridge's client, subscribed to ``up/+/+``, sees only the last."""
    host, port, bridge_user, bridge_password = broker()
    async with aiomqtt.Client(host, port, username=bridge_user, password=bridge_password,
                              identifier=f"bridge-test-{uuid.uuid4().hex[:6]}") as bridge:
        await bridge.subscribe("up/+/+", qos=1)
        async with aiomqtt.Client(host, port, username=device, password=token, identifier=device) as dev:
            for topic, payload in tries:
                await dev.publish(topic, payload, qos=1)
            await dev.publish(f"up/{user}/{device}", json.dumps({"type": "ping"}), qos=1)
        async with asyncio.timeout(5):
            async for message in bridge.messages:
                if message.topic.value.startswith(PROBE_PREFIX):
                    continue  # a running bridge's own probe of the broker's queue (bridge/mqtt_ingest.py)
                assert message.topic.value == f"up/{user}/{device}"  # the only one that got through
                break


FAR = 4_000_000_000_000  # an expiry far in the future


def ids() -> tuple[str, str, str]:
    return "u" + uuid.uuid4().hex[:12], "d" + uuid.uuid4().hex[:12], "tok-" + uuid.uuid4().hex


async def test_a_registered_device_connects_with_its_token_only(admin: DynSecAdmin) -> None:
    host, port, _, _ = broker()
    user, device, token = ids()
    assert await connack_code(host, port, connect_packet(device, device, token)) != 0  # not yet
    await admin.register_device(user, device, token, FAR)
    assert await connack_code(host, port, connect_packet(device, device, token)) == 0
    assert await connack_code(host, port, connect_packet(device, device, "wrong")) in (4, 5)
    assert await connack_code(host, port, connect_packet("someone-else", device, token)) in (4, 5)
    # logging in again replaces the token
    await admin.register_device(user, device, token + "-new", FAR)
    assert await connack_code(host, port, connect_packet(device, device, token)) in (4, 5)
    assert await connack_code(host, port, connect_packet(device, device, token + "-new")) == 0
    await admin.remove_device(device)
    assert await connack_code(host, port, connect_packet(device, device, token + "-new")) in (4, 5)


async def test_device_permissions_are_those_of_the_protocol(admin: DynSecAdmin) -> None:
    host, port, _, _ = broker()
    user, device, token = ids()
    _other_user, other_device, other_token = ids()
    await admin.register_device(user, device, token, FAR)
    await admin.register_device(user, other_device, other_token, FAR)
    await only_its_own_topic_reaches_the_bridge(user, device, token, [
        (f"up/{user}/{other_device}", b"as a sibling"),
        (f"down/{user}", b"spoof"),
    ])
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(connect_packet(device, device, token))
        for i, topic in enumerate(["#", "up/+/+", f"down/{user}/{other_device}", "down/uSomeoneElse", "$SYS/#"]):
            writer.write(subscribe_packet(topic, 10 + i))
        writer.write(subscribe_packet(f"down/{user}", 20))
        writer.write(subscribe_packet(f"down/{user}/{device}", 21))
        await writer.drain()
        assert (await read_packet(reader))[1][1] == 0
        codes = [(await read_packet(reader))[1][2] for _ in range(7)]
        assert codes[:5] == [0x80] * 5 and codes[5:] == [1, 1]
    finally:
        writer.close()
    await admin.remove_device(device)
    await admin.remove_device(other_device)


async def test_devices_whose_tokens_expired_are_removed(admin: DynSecAdmin) -> None:
    host, port, _, _ = broker()
    user, old, old_token = ids()
    _, live, live_token = ids()
    await admin.register_device(user, old, old_token, expires_at=1_000)
    await admin.register_device(user, live, live_token, expires_at=FAR)
    assert await admin.remove_expired(now_ms=2_000) >= 1
    assert await connack_code(host, port, connect_packet(old, old, old_token)) in (4, 5)
    assert await connack_code(host, port, connect_packet(live, live, live_token)) == 0
    await admin.remove_device(live)


async def test_a_server_without_the_plugin_registers_its_devices_at_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--broker-auth dynsec``, with a secret the broker's plugin does not hold (so the plugin
    leaves its tokens to dynamic security): devices log in, talk, and an unlinked one is closed
    and refused from then on."""
    monkeypatch.setenv("PIGEON_SECRET", secrets.token_hex(32))
    srv = ServerProc.start(tmp_path / "srv", *production_flags(), "--broker", production_url("PIGEON_BROKER", "mqtt://"),
                           "--broker-credentials-file", production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/"),
                           "--broker-auth", "dynsec")
    try:
        a = await login(srv.http, fresh_phone(), device_name="a")
        b = await login(srv.http, fresh_phone(), device_name="b")
        host, port, _, _ = broker()
        async with Device(a) as dev_a, Device(b) as dev_b:
            sent = await dev_a.send("over dynamic security", to=b.user_id)
            async with asyncio.timeout(10):
                while (event := await dev_b.next_event(timeout=10)).get("body") != "over dynamic security":
                    pass
            assert event["seq"] == sent["seq"]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(connect_packet(b.device_id, b.device_id, b.token))
            await writer.drain()
            assert (await read_packet(reader))[1][1] == 0
            async with httpx.AsyncClient(base_url=srv.http) as http:
                gone = await http.delete(f"/v1/devices/{b.device_id}", headers={"Authorization": f"Bearer {b.token}"})
                assert gone.status_code == 200, gone.text
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # dynamic security closed it
        finally:
            writer.close()
        assert await connack_code(host, port, connect_packet(b.device_id, b.device_id, b.token)) in (4, 5)
    finally:
        srv.stop()


async def test_the_control_connection_is_opened_again_after_the_broker_dropped_it(admin: DynSecAdmin) -> None:
    """A client taking the admin connection's client id makes Mosquitto close it (as a restart
    of Mosquitto would): the next command opens a new connection and goes through."""
    host, port, user, password = broker()
    taken = admin._client.identifier  # noqa: SLF001 - the id to take over
    async with aiomqtt.Client(host, port, username=user, password=password, identifier=taken):
        await asyncio.sleep(0.5)
    _, device, token = ids()
    await admin.register_device("uSomeone", device, token, FAR)
    assert await connack_code(host, port, connect_packet(device, device, token)) == 0
    await admin.remove_device(device)
