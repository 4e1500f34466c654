"""Each provider against its loopback stand-in (tests/push_services.py, the real wire protocols):
what each service's answers mean for the device's target, and how a wake is sent."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from bridge.push_providers import Apns, Fcm, Wake, Webhook, WebPush, load_vapid_key
from tests.push_services import ApnsService, FcmService, PushServices, Reply

WAKE = Wake(events=1, ttl_s=60, urgent=True)


@pytest.fixture(scope="module")
def services() -> Iterator[PushServices]:
    s = PushServices()
    yield s
    s.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(http2=True) as c:
        yield c


@pytest.fixture(autouse=True)
def no_service_errors(services: PushServices) -> Iterator[None]:
    """Every request a stand-in received passed its checks (signature, keys, headers)."""
    before = len(services.errors())
    yield
    assert services.errors()[before:] == []


def fcm_token() -> str:
    return "fcm:" + uuid.uuid4().hex + "A" * 20


def apns_token() -> str:
    return (uuid.uuid4().hex * 2)[:64]


def make_fcm(services: PushServices, client: httpx.AsyncClient, tmp_path: Path) -> Fcm:
    creds = tmp_path / "fcm.json"
    creds.write_text(json.dumps(services.fcm.credentials()))
    return Fcm(client, creds, services.fcm.base)


def make_apns(services: PushServices, tmp_path: Path) -> Apns:
    p8 = tmp_path / "apns.p8"
    p8.write_bytes(services.apns.p8())
    return Apns(p8, ApnsService.KEY_ID, ApnsService.TEAM_ID, ApnsService.TOPIC, services.apns.base)


@pytest.mark.parametrize(("reply", "kind"), [
    (FcmService.error(404, "NOT_FOUND", "UNREGISTERED"), "gone"),  # the app's token is dead
    (FcmService.error(404, "NOT_FOUND"), "rejected"),  # e.g. a wrong project: the token is not to blame
    (FcmService.error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"), "rejected"),
    (FcmService.error(503, "UNAVAILABLE"), "retry"),
], ids=["unregistered", "not-found", "invalid", "unavailable"])
async def test_fcm_says_a_token_is_gone_only_with_unregistered(
        services: PushServices, client: httpx.AsyncClient, tmp_path: Path, reply: Reply, kind: str) -> None:
    provider, token = make_fcm(services, client, tmp_path), fcm_token()
    services.fcm.recorder.script(token, reply)
    assert (await provider.send(token, WAKE)).kind == kind
    assert len(services.fcm.recorder.pushed(token)) == 1


@pytest.mark.parametrize(("reply", "kind"), [
    ((410, {}, b'{"reason":"Unregistered","timestamp":1700000000000}'), "gone"),
    ((400, {}, b'{"reason":"BadDeviceToken"}'), "rejected"),  # also a sandbox token sent to production
    ((404, {}, b'{"reason":"BadPath"}'), "rejected"),
    ((429, {}, b'{"reason":"TooManyRequests"}'), "retry"),
], ids=["unregistered", "bad-device-token", "bad-path", "too-many"])
async def test_apns_says_a_token_is_gone_only_with_410(
        services: PushServices, tmp_path: Path, reply: Reply, kind: str) -> None:
    provider, token = make_apns(services, tmp_path), apns_token()
    try:
        services.apns.recorder.script(token, reply)
        out = await provider.send(token, WAKE)
        assert out.kind == kind and out.detail == json.loads(reply[2])["reason"]
    finally:
        await provider.aclose()


@pytest.mark.parametrize(("status", "kind"), [(404, "gone"), (410, "gone"), (400, "rejected")])
async def test_web_push_404_and_410_mean_gone(services: PushServices, client: httpx.AsyncClient, tmp_path: Path,
                                              status: int, kind: str) -> None:
    provider = WebPush(client, load_vapid_key(None, tmp_path), "mailto:admin@example.org", dev=True)
    sub = services.webpush.subscription()
    services.webpush.recorder.script(services.webpush.target(sub), (status, {}, b""))
    assert (await provider.send(provider.check(sub, True), WAKE)).kind == kind


@pytest.mark.parametrize(("status", "kind"), [(410, "gone"), (404, "gone"), (400, "rejected")])
async def test_a_webhook_is_gone_with_404_or_410(services: PushServices, client: httpx.AsyncClient,
                                               status: int, kind: str) -> None:
    name = uuid.uuid4().hex
    services.webhook.recorder.script(name, (status, {}, b""))
    assert (await Webhook(client, dev=True).send(services.webhook.url(name), WAKE)).kind == kind


@pytest.mark.parametrize(("urgent", "urgency"), [(True, "high"), (False, "normal")])
async def test_web_push_urgency_follows_whether_the_wake_covers_a_message(
        services: PushServices, client: httpx.AsyncClient, tmp_path: Path, urgent: bool, urgency: str) -> None:
    provider = WebPush(client, load_vapid_key(None, tmp_path), "mailto:admin@example.org", dev=True)
    sub = services.webpush.subscription()
    wake = Wake(events=2, ttl_s=60, urgent=urgent)
    assert (await provider.send(provider.check(sub, True), wake)).kind == "accepted"
    [pushed] = services.webpush.recorder.pushed(services.webpush.target(sub))
    assert pushed.headers["urgency"] == urgency and pushed.body == {"type": "wake", "events": 2}


@pytest.mark.parametrize(("urgent", "priority"), [(True, "HIGH"), (False, "NORMAL")])
async def test_fcm_priority_follows_whether_the_wake_covers_a_message(
        services: PushServices, client: httpx.AsyncClient, tmp_path: Path, urgent: bool, priority: str) -> None:
    provider, token = make_fcm(services, client, tmp_path), fcm_token()
    assert (await provider.send(token, Wake(events=1, ttl_s=60, urgent=urgent))).kind == "accepted"
    [pushed] = services.fcm.recorder.pushed(token)
    assert pushed.headers["priority"] == priority


async def test_apns_sends_a_message_as_an_alert_and_receipts_as_a_background_push(
        services: PushServices, tmp_path: Path) -> None:
    provider, message, receipts = make_apns(services, tmp_path), apns_token(), apns_token()
    try:
        assert (await provider.send(message, Wake(events=1, ttl_s=60, urgent=True))).kind == "accepted"
        assert (await provider.send(receipts, Wake(events=3, ttl_s=60, urgent=False))).kind == "accepted"
    finally:
        await provider.aclose()
    [alert] = services.apns.recorder.pushed(message)
    assert (alert.headers["apns-push-type"], alert.headers["apns-priority"]) == ("alert", "10")
    assert alert.body["aps"]["sound"] == "default" and "alert" in alert.body["aps"]
    [silent] = services.apns.recorder.pushed(receipts)  # the stand-in checks Apple's rules for it
    assert (silent.headers["apns-push-type"], silent.headers["apns-priority"]) == ("background", "5")
    assert silent.body == {"aps": {"content-available": 1}, "type": "wake", "events": 3}


async def test_concurrent_fcm_sends_share_one_access_token_request(
        services: PushServices, client: httpx.AsyncClient, tmp_path: Path) -> None:
    provider, tokens = make_fcm(services, client, tmp_path), [fcm_token() for _ in range(20)]
    before = services.fcm.tokens_issued
    outcomes = await asyncio.gather(*(provider.send(t, WAKE) for t in tokens))
    assert [o.kind for o in outcomes] == ["accepted"] * 20
    assert services.fcm.tokens_issued - before == 1
