"""Push notifications end to end (protocol section 7), on the embedded profile and on Cassandra +
Redis: a real ``pigeon serve`` pushes to loopback stand-ins of Web Push, FCM, APNs and a webhook
(tests/push_services.py), which check every request as the real services would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.sdk import Api, Device, PigeonClientError, Profile, login
from tests.conftest import ServerProc, broker_flags, fresh_phone, metric, production_flags, two_bridges
from tests.mqtt_raw import publish_packet, raw_device
from tests.push_services import PushServices
from tests.test_e2e_failover import settled

WINDOW = 2.0  # the coalescing window the servers here run with (seconds)


@pytest.fixture(scope="module")
def services() -> Iterator[PushServices]:
    s = PushServices()
    yield s
    s.close()


def push_flags(services: PushServices, tmp: Path, profile: str, window: float = WINDOW) -> list[str]:
    flags = services.flags(tmp) + ["--push-window", str(window)]
    if profile == "production":
        flags += production_flags()
    return flags


@pytest.fixture(scope="module", params=["embedded", "production"])
def srv(request: pytest.FixtureRequest, services: PushServices,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp(f"push-{request.param}")
    server = ServerProc.start(tmp / "data", *push_flags(services, tmp, request.param))
    server.profile = request.param
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_service_errors(services: PushServices) -> Iterator[None]:
    """Every request a stand-in received passed its checks (signature, keys, headers)."""
    before = len(services.errors())
    yield
    assert services.errors()[before:] == []


async def pair(srv: ServerProc) -> tuple[Profile, Profile, str]:
    """A sender, a recipient and their direct chat."""
    a = await login(srv.http, fresh_phone())
    b = await login(srv.http, fresh_phone())
    async with Api(a) as api:
        chat = (await api.open_direct(b.user_id))["chat"]
    return a, b, chat


async def post(sender: Profile, chat: str, *bodies: str) -> None:
    """Sent over HTTP: the sender has no device connected (nothing of theirs is pushed: no target)."""
    async with Api(sender) as api:
        for body in bodies:
            await api.post_message(chat, body)


async def online_raw_device(device: Profile, *, keepalive: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The device on a raw MQTT connection (with a will), having said it is online."""
    reader, writer, up = await raw_device(device.mqtt_host, device.mqtt_port, device, keepalive=keepalive)
    writer.write(publish_packet(up, b'{"type":"presence","state":"online"}', 1))
    await writer.drain()
    return reader, writer


async def eventually(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_offline_user_is_woken_by_web_push_within_seconds(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    sub = services.webpush.subscription()
    async with Api(b) as api:
        assert (await api.set_push("webpush", sub))["provider"] == "webpush"
        vapid = await api.vapid_public_key()
        assert [d["push"] for d in await api.devices()] == ["webpush"]
    started = time.monotonic()
    await post(a, chat, "the secret text")
    [pushed] = await services.webpush.recorder.wait(services.webpush.target(sub), 1, timeout=5)
    assert pushed.at - started < 5
    # content-free: decrypted with the subscription's keys, the wake names nothing
    assert pushed.body == {"type": "wake", "events": 1}
    assert pushed.headers["urgency"] == "high" and int(pushed.headers["ttl"]) > 0 and pushed.headers["topic"]
    assert pushed.headers["vapid-key"] == vapid  # signed by the key the server hands to browsers
    assert await metric(srv, 'pigeon_push_sent_total{provider="webpush"}') >= 1
    assert await metric(srv, 'pigeon_push_delay_seconds_count{provider="webpush"}') >= 1


async def test_a_wake_for_receipts_alone_is_not_urgent(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    sub = services.webpush.subscription()
    target, recorder = services.webpush.target(sub), services.webpush.recorder
    async with Api(b) as api:
        await api.set_push("webpush", sub)
        sent = await api.post_message(chat, "from b")  # b's own message wakes none of b's devices
    async with Device(a) as dev:  # a gets it and reads it: receipts are b's only inbox events
        await dev.read(chat, int(sent["seq"]))
        await recorder.wait(target, 1)
    await post(a, chat, "a message")

    async def message_pushed() -> bool:
        return any(p.headers["urgency"] == "high" for p in recorder.pushed(target))

    await eventually(message_pushed, WINDOW + 10)
    *receipts, message = recorder.pushed(target)
    assert receipts and all(p.headers["urgency"] == "normal" for p in receipts)
    assert message.headers["urgency"] == "high"


async def test_online_user_is_not_pushed(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    dev = Device(b)
    await dev.__aenter__()
    try:
        await post(a, chat, "one", "two")
        seen = []
        async with asyncio.timeout(10):
            while len(seen) < 2:
                ev = await dev.next_event()
                if ev["type"] == "msg":
                    seen.append(ev["body"])
        assert seen == ["one", "two"]
    finally:
        await dev.close()  # offline from here on
    gone = time.monotonic()
    await post(a, chat, "three")
    [pushed] = await services.webhook.recorder.wait(b.device_id, 1)
    assert pushed.at > gone  # nothing was pushed while the device was connected
    # this wake covers the one message that came while no device was connected, nothing before
    assert pushed.body == {"type": "wake", "events": 1}
    assert pushed.headers["content-type"] == "application/json"


async def test_a_device_dropped_by_keepalive_counts_as_gone(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    # a device that says it is online, then falls silent: no ping, no DISCONNECT
    _, writer = await online_raw_device(b, keepalive=2)
    try:
        async with Api(a) as api:
            async def online() -> bool:
                return bool((await api.presence(b.user_id))["online"])

            async def offline() -> bool:
                return not await online()

            await eventually(online, 5)
            await api.post_message(chat, "while connected")  # never acknowledged
            await eventually(offline, 10)  # the broker closed it after 1.5 keepalives and sent its will
            # the message that came while it was silent is pushed when presence drops it
            [dropped] = await services.webhook.recorder.wait(b.device_id, 1)
            assert dropped.body == {"type": "wake", "events": 1}
            await api.post_message(chat, "after the drop")
        _, pushed = await services.webhook.recorder.wait(b.device_id, 2, timeout=WINDOW + 10)
        assert pushed.at - dropped.at >= WINDOW * 0.9  # the coalescing window holds
        assert pushed.body == {"type": "wake", "events": 1}
    finally:
        writer.close()


async def test_a_connection_lost_with_a_message_unacknowledged_wakes_the_user(
        srv: ServerProc, services: PushServices) -> None:
    """Presence counted the device online, so the message was not pushed when it came; it was
    published live, but the connection died before the device acknowledged it."""
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    _, writer = await online_raw_device(b, keepalive=60)
    async with Api(a) as api:
        async def online() -> bool:
            return bool((await api.presence(b.user_id))["online"])

        await eventually(online, 5)
        await api.post_message(chat, "delivered live, never acknowledged")
        writer.transport.abort()  # the connection is lost: the broker publishes the will
        [pushed] = await services.webhook.recorder.wait(b.device_id, 1)
    assert pushed.body == {"type": "wake", "events": 1}
    async with Device(b) as dev:  # it syncs what the push announced, and acknowledges it
        ev = await dev.next_event(timeout=10)
        assert ev["body"] == "delivered live, never acknowledged"


async def test_a_burst_is_coalesced(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    await post(a, chat, *[f"m{i}" for i in range(10)])

    async def all_covered() -> bool:
        return sum(int(p.body["events"]) for p in services.webhook.recorder.pushed(b.device_id)) >= 10

    await eventually(all_covered, WINDOW + 10)
    pushes = services.webhook.recorder.pushed(b.device_id)
    assert 1 <= len(pushes) <= 2, [p.body for p in pushes]
    assert sum(int(p.body["events"]) for p in pushes) == 10
    if len(pushes) == 2:  # the rest of the burst waited for the window
        assert pushes[1].at - pushes[0].at >= WINDOW * 0.9


@pytest.mark.parametrize("provider", ["webpush", "fcm", "apns", "webhook"])
async def test_a_dropped_subscription_deletes_the_target(srv: ServerProc, services: PushServices,
                                                         provider: str) -> None:
    a, b, chat = await pair(srv)
    token: str | dict[str, object]
    if provider == "webpush":
        token = services.webpush.subscription()
        target, recorder = services.webpush.target(token), services.webpush.recorder
        recorder.script(target, (410, {}, b""))
    elif provider == "fcm":
        token = target = "fcm-" + b.device_id.replace("-", "") + "x" * 20
        recorder = services.fcm.recorder
        recorder.script(target, (404, {}, json.dumps({"error": {"code": 404, "status": "NOT_FOUND", "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}).encode()))
    elif provider == "apns":
        token = target = (b.device_id.encode().hex() * 8)[:64]
        recorder = services.apns.recorder
        recorder.script(target, (410, {}, b'{"reason":"Unregistered","timestamp":1700000000000}'))
    else:  # protocol section 7: a 404 (or 410) from the hook
        token, target = services.webhook.url(b.device_id), b.device_id
        recorder = services.webhook.recorder
        recorder.script(target, (404, {}, b"no such hook"))
    async with Api(b) as api:
        await api.set_push(provider, token)
        await post(a, chat, "hello")
        await recorder.wait(target, 1)

        async def removed() -> bool:
            return [d["push"] for d in await api.devices()] == [None]

        await eventually(removed, 5)
    assert await metric(srv, f'pigeon_push_dropped_total{{provider="{provider}",reason="gone"}}') >= 1


@pytest.mark.parametrize("provider", ["fcm", "apns", "webhook"])
async def test_a_refusal_that_does_not_say_gone_keeps_the_target(srv: ServerProc, services: PushServices,
                                                                 provider: str) -> None:
    """FCM's 404 without UNREGISTERED (a wrong project), APNs's 400 BadDeviceToken (a sandbox
    token sent to production) and a webhook's 400 drop the wake, not the device's target."""
    a, b, chat = await pair(srv)
    if provider == "fcm":
        token = target = "fcm-" + b.device_id.replace("-", "") + "y" * 20
        recorder = services.fcm.recorder
        recorder.script(target, services.fcm.error(404, "NOT_FOUND"))
    elif provider == "apns":
        token = target = (b.device_id.encode().hex() * 8)[-64:]
        recorder = services.apns.recorder
        recorder.script(target, (400, {}, b'{"reason":"BadDeviceToken"}'))
    else:
        token, target = services.webhook.url(b.device_id), b.device_id
        recorder = services.webhook.recorder
        recorder.script(target, (400, {}, b"not a wake this hook takes"))
    rejected = f'pigeon_push_dropped_total{{provider="{provider}",reason="rejected"}}'
    before = await metric(srv, rejected)
    async with Api(b) as api:
        await api.set_push(provider, token)
        await post(a, chat, "hello")
        await recorder.wait(target, 1)

        async def dropped() -> bool:
            return await metric(srv, rejected) > before

        await eventually(dropped, 5)
        assert [d["push"] for d in await api.devices()] == [provider]


async def test_a_server_error_is_retried_and_delivered(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    services.webhook.recorder.script(b.device_id, (500, {}, b"busy"))
    await post(a, chat, "hello")
    first, second = await services.webhook.recorder.wait(b.device_id, 2)
    assert (first.status, second.status) == (500, 200)
    assert second.at - first.at >= 0.4  # backed off
    assert second.body == {"type": "wake", "events": 1}
    assert await metric(srv, 'pigeon_push_failed_total{provider="webhook",reason="server_error"}') >= 1


async def test_fcm_wakes_through_http_v1_and_honours_retry_after(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    token = "fcm:" + b.device_id.replace("-", "_") + "A" * 30
    services.fcm.recorder.script(token, (503, {"Retry-After": "2"}, b'{"error":{"code":503}}'))
    async with Api(b) as api:
        assert (await api.set_push("fcm", token))["provider"] == "fcm"
    await post(a, chat, "hello")
    first, second = await services.fcm.recorder.wait(token, 2, timeout=15)
    assert (first.status, second.status) == (503, 200)
    assert second.at - first.at >= 1.9  # not before the service asked
    assert second.body == {"type": "wake", "events": "1"}  # FCM data values are strings
    assert second.headers["priority"] == "HIGH"
    assert services.fcm.tokens_issued >= 1


async def test_apns_wakes_over_http2_with_a_provider_token(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    token = (b.device_id.encode().hex() * 8)[:64]
    async with Api(b) as api:
        assert (await api.set_push("apns", token.upper()))["provider"] == "apns"
    await post(a, chat, "hello")
    [pushed] = await services.apns.recorder.wait(token, 1)
    assert pushed.body["type"] == "wake" and pushed.body["events"] == 1
    assert pushed.body["aps"]["mutable-content"] == 1 and "hello" not in json.dumps(pushed.body)
    assert pushed.headers["apns-topic"] == "org.pigeon.app" and pushed.headers["apns-push-type"] == "alert"


async def test_targets_are_checked_and_only_the_device_itself_may_set_its_own(
        srv: ServerProc, services: PushServices) -> None:
    a, b, _chat = await pair(srv)
    hook = services.webhook.url(a.device_id)
    async with Api(a) as api:
        await api.set_push("webhook", hook)
        for device_id in (b.device_id, "d-forged0000000000"):  # another user's device, a made-up one
            with pytest.raises(PigeonClientError) as info:
                await api.set_push("webhook", hook, device_id=device_id)
            assert info.value.status == 403
            with pytest.raises(PigeonClientError) as info:
                await api.clear_push(device_id=device_id)
            assert info.value.status == 403
        bad = [
            ("webhook", "ftp://example.org/x"), ("webhook", "http://example.org/hook"),  # https only off loopback
            ("webpush", {"endpoint": "http://example.org/push", "keys": services.webpush.subscription()["keys"]}),
            ("webpush", {"endpoint": "https://push.example.org/x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}),
            ("webpush", "not a subscription"), ("fcm", "short"), ("apns", "not-hex"), ("smoke", "x"),
        ]
        for provider, token in bad:
            with pytest.raises(PigeonClientError) as info:
                await api.set_push(provider, token)
            assert info.value.code == "bad_request", (provider, token)
        # nothing changed by the refusals
        assert [d["push"] for d in await api.devices()] == ["webhook"]
    async with Api(b) as api:
        assert [d["push"] for d in await api.devices()] == [None]
    async with Api(a) as api:
        assert (await api.clear_push())["removed"] is True
        assert [d["push"] for d in await api.devices()] == [None]


@pytest.mark.parametrize("profile", ["embedded", "production"])
async def test_pushes_queued_at_a_restart_are_still_sent(profile: str, services: PushServices,
                                                        tmp_path: Path) -> None:
    flags = push_flags(services, tmp_path, profile)
    first = ServerProc.start(tmp_path / "data", *flags)
    try:
        a, b, chat = await pair(first)
        async with Api(b) as api:
            await api.set_push("webhook", services.webhook.url(b.device_id))
        services.webhook.recorder.script(b.device_id, (503, {"Retry-After": "3"}, b""))
        await post(a, chat, "hello")
        await services.webhook.recorder.wait(b.device_id, 1)
    finally:
        first.stop()  # with the wake waiting for its retry
    assert len(services.webhook.recorder.pushed(b.device_id)) == 1
    second = ServerProc.start(tmp_path / "data", *flags)
    try:
        _, again = await services.webhook.recorder.wait(b.device_id, 2, timeout=20)
        assert again.status == 200 and again.body == {"type": "wake", "events": 1}
    finally:
        second.stop()


async def test_two_bridges_on_one_redis_agree_on_who_is_connected(services: PushServices, tmp_path: Path) -> None:
    """The device is connected to Mosquitto and its presence kept in Redis; messages reach the
    user through either bridge, and neither pushes until the device has gone."""
    flags = push_flags(services, tmp_path, "production") + broker_flags()
    with two_bridges(tmp_path / "b0", tmp_path / "b1", *flags) as (first, second):
        # once the second holds its share of the partitions: while they move, a request may be
        # answered 'unavailable' (devices retry it; these HTTP posts do not)
        await settled(first, second)
        a, b, chat = await pair(first)
        async with Api(b) as api:
            await api.set_push("webhook", services.webhook.url(b.device_id))
        dev = Device(b)
        await dev.__aenter__()
        try:
            async with Api(a) as api:
                async def online() -> bool:
                    return bool((await api.presence(b.user_id))["online"])

                await eventually(online, 10)
            a_on_second = await login(second.http, a.phone)  # the same user, through the other bridge
            await post(a, chat, "one")
            await post(a_on_second, chat, "two")
            seen = []
            async with asyncio.timeout(15):
                while len(seen) < 2:
                    ev = await dev.next_event()
                    if ev["type"] == "msg":
                        seen.append(ev["body"])
            assert sorted(seen) == ["one", "two"]
        finally:
            await dev.close()
        async with Api(a) as api:
            async def offline() -> bool:
                return not (await api.presence(b.user_id))["online"]

            await eventually(offline, 10)
        gone = time.monotonic()
        await post(a_on_second, chat, "three")
        [pushed] = await services.webhook.recorder.wait(b.device_id, 1)
        assert pushed.at > gone
        assert pushed.body == {"type": "wake", "events": 1}


async def test_typing_and_presence_push_nobody(srv: ServerProc, services: PushServices) -> None:
    a, b, chat = await pair(srv)
    async with Api(b) as api:
        await api.set_push("webhook", services.webhook.url(b.device_id))
    recorder = services.webhook.recorder

    def covered() -> int:
        return sum(int(p.body["events"]) for p in recorder.pushed(b.device_id))

    async with Device(a) as dev:  # a coming online, typing, watching, and going offline again
        await dev.typing(chat)
        await dev.watch([b.user_id])
        await dev.send("the message", chat=chat)
        await dev.typing(chat)
    await recorder.wait(b.device_id, 1)
    await post(a, chat, "a marker")  # its wake comes after the window and covers all that is left

    async def marker_covered() -> bool:
        return covered() >= 2

    await eventually(marker_covered, WINDOW + 10)
    # wake counts are exact: the two messages, and nothing for typing or presence
    assert covered() == 2 and len(recorder.pushed(b.device_id)) == 2
