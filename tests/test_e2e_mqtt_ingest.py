"""The same end-to-end flows with the bridge consuming ``up/+/+`` as an MQTT client.

The tests are the ones of the in-process mode, imported here so they run again against a
server started with ``--ingest mqtt`` (this module's ``server`` fixture wins over the shared one).
The last test is the external broker's own: a bridge on Mosquitto killed and restarted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from clients.sdk import Api, login
from tests.conftest import ServerProc, broker_flags, fresh_phone, production_flags, sends_handled
from tests.test_e2e_errors_permissions import (  # noqa: F401 - collected again here
    test_every_malformed_payload_gets_an_error_and_changes_nothing,
    test_publishing_outside_own_up_topic_changes_nothing,
    test_subscriptions_outside_own_topics_are_refused,
)
from tests.test_e2e_media import test_upload_send_and_download_by_members_only  # noqa: F401
from tests.test_e2e_messaging import (  # noqa: F401
    test_ack_gives_sender_a_delivered_receipt_and_read_a_read_receipt,
    test_direct_message_reaches_peer_and_senders_other_devices,
    test_group_system_messages_fan_out_and_aggregate_receipts,
    test_offline_device_catches_up_with_sync_in_batches,
    test_presence_watch_will_and_last_seen,
    test_publish_and_disconnect_device_is_stored,
    test_seq_is_gap_free_and_keeps_one_devices_order,
    test_typing_goes_only_to_online_members_and_is_not_stored,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-mqtt-ingest"), "--ingest", "mqtt")
    yield srv
    srv.stop()


# -- an external broker: what Mosquitto accepted survives the bridge ------------------------------

async def test_a_bridge_killed_under_load_answers_everything_after_its_restart(tmp_path: Path) -> None:
    """SIGKILL of a bridge on Mosquitto while one device's sends are being handled, more sends
    while it is down, then a restart: every send is answered, numbered in the device's order.
    The restarted bridge takes the partitions over once the dead one's leases run out, and with
    them the partitions' broker sessions and what the broker kept in them. What waited there past
    the delay bound (docs/protocol.md, section 4) may be answered ``rate_limited``, oldest first:
    the device sends those again, in its order, after ``retry_after_ms``, as devices should."""
    flags = [*production_flags(), *broker_flags()]  # a keyspace of its own: its partition sessions are this test's
    bridge = ServerProc.start(tmp_path / "bridge", *flags)
    restarted: ServerProc | None = None
    try:
        me = await login(bridge.http, fresh_phone())
        peer = await login(bridge.http, fresh_phone())
        async with Api(me) as api:
            chat = (await api.open_direct(peer.user_id))["chat"]
        replies: dict[str, list[dict[str, Any]]] = {}
        answered, handling, refused = asyncio.Event(), asyncio.Event(), asyncio.Event()
        retry_after_s = [1.0]
        want: list[str] = []
        device = aiomqtt.Client(me.mqtt_host, me.mqtt_port, identifier=me.device_id, username=me.device_id,
                                password=me.token, clean_session=True, max_inflight_messages=100)
        async with device:
            await device.subscribe(f"down/{me.user_id}/{me.device_id}", qos=1)

            async def collect() -> None:
                async for message in device.messages:
                    reply = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    if "id" in reply:
                        replies.setdefault(str(reply["id"]), []).append(reply)
                        if reply["id"] == "b000":
                            handling.set()
                        if reply.get("code") == "rate_limited":
                            retry_after_s[0] = reply["retry_after_ms"] / 1000
                            refused.set()
                        if all(any(r.get("type") == "sent" for r in replies.get(i, ())) for i in want):
                            answered.set()

            async def publish(ids: list[str]) -> None:
                for i in ids:  # QoS 1: Mosquitto has each one when this returns
                    body = {"type": "send", "id": i, "chat": chat, "body": i}
                    await device.publish(f"up/{me.user_id}/{me.device_id}", json.dumps(body), qos=1)

            async def send(ids: list[str]) -> None:
                want.extend(ids)
                answered.clear()
                await publish(ids)

            async def send_refused_again() -> None:
                while True:
                    await refused.wait()
                    await asyncio.sleep(retry_after_s[0] * 1.1)
                    refused.clear()
                    await publish([i for i in want if replies.get(i) and replies[i][-1].get("code") == "rate_limited"])

            collector = asyncio.create_task(collect())
            retrier = asyncio.create_task(send_refused_again())
            try:
                await send([f"a{k:03d}" for k in range(10)])
                await asyncio.wait_for(answered.wait(), 30)
                await send([f"b{k:03d}" for k in range(100)])
                await asyncio.wait_for(handling.wait(), 30)  # kill mid-burst, once the bridge is at it
                bridge.proc.kill()
                bridge.proc.wait()
                await send([f"c{k:03d}" for k in range(20)])  # while no bridge is there
                restarted = ServerProc.start(tmp_path / "bridge", *flags)
                try:
                    await asyncio.wait_for(answered.wait(), 60)
                except TimeoutError:
                    missing = [(i, replies.get(i)) for i in want
                               if not any(r.get("type") == "sent" for r in replies.get(i, ()))]
                    message = f"{len(missing)} of {len(want)} sends never answered: {missing[:10]}"
                    raise AssertionError(message) from None
            finally:
                collector.cancel()
                retrier.cancel()
        # each send stored once, numbered in the order the device sent them (a send handled but
        # not acknowledged before the kill is handled again, and answered with the same seq).
        # Only "sent" replies count: another bridge on this shared broker (another test run's)
        # may answer too, from its own store.
        seqs = []
        for i in want:
            got = {r["seq"] for r in replies[i] if r.get("type") == "sent"}
            assert len(got) == 1, (i, replies[i])
            seqs.append(got.pop())
        out_of_order = [(i, seq, [r.get("code", r["type"]) for r in replies[i]])
                        for i, seq in zip(want, seqs, strict=True) if seq != want.index(i) + 1]
        assert not out_of_order, out_of_order[:12]
        # the restarted bridge itself took what was left (not some other bridge on the broker)
        assert await sends_handled(restarted) >= 20
    finally:
        bridge.stop()
        if restarted is not None:
            restarted.stop()
