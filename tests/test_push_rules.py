"""Push rules that need no server: backoff, Retry-After, and which targets are accepted."""

from __future__ import annotations

import email.utils
import random
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import Settings
from bridge.errors import BadRequest, ConfigError
from bridge.push import RETRY_CAP_S, backoff_s
from bridge.push_providers import (
    Wake,
    Webhook,
    b64url,
    b64url_decode,
    build_providers,
    check_resolved,
    check_url,
    origin,
    retry_after,
)


def test_backoff_grows_is_jittered_and_capped() -> None:
    rng = random.Random(7)
    first = [backoff_s(0, rng) for _ in range(50)]
    assert all(0.5 <= d <= 1.0 for d in first) and len(set(first)) > 1
    assert all(4.0 <= backoff_s(3, rng) <= 8.0 for _ in range(50))
    assert all(RETRY_CAP_S / 2 <= backoff_s(n, rng) <= RETRY_CAP_S for n in (9, 20, 1000))


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 <= later <= 31


def test_a_retry_after_date_without_a_zone_is_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # nine hours from GMT: read as local time, it is far off
    time.tzset()
    try:
        for when in (email.utils.formatdate(time.time() + 30), time.strftime("%a, %d %b %Y %H:%M:%S",
                                                                            time.gmtime(time.time() + 30))):
            later = retry_after(when)  # '-0000', then no zone at all
            assert later is not None and 25 <= later <= 31, when
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(("url", "dev", "ok"), [
    ("https://push.example.org/x", False, True),
    ("http://push.example.org/x", True, False),  # http only on loopback
    ("http://127.0.0.1:8080/x", True, True),
    ("http://[::1]:8080/x", True, True),
    ("http://127.0.0.1:8080/x", False, False),  # and only with --dev
    ("ftp://push.example.org/x", True, False),
    ("https:///nohost", False, False),
    ("https://10.1.2.3/hook", False, False),  # no internal addresses off --dev
    ("https://[fe80::1]/hook", False, False),
    ("http://127.0.0.1:99999/x", True, False),  # a port out of range
    # IPv4 written otherwise than a.b.c.d: resolvers take these as 127.0.0.1
    ("https://127.1/hook", False, False), ("https://2130706433/hook", False, False),
    ("https://0x7f000001/hook", False, False), ("https://0177.0.0.1/hook", False, False),
    ("http://127.1:8080/x", True, False), ("https://8.8.8.8.8/x", False, False),
    # not globally routable, or not unicast
    ("https://100.64.0.1/hook", False, False), ("https://224.0.0.1/hook", False, False),
    ("https://[ff02::1]/hook", False, False), ("https://[::ffff:127.0.0.1]/hook", False, False),
    ("https://[2001:db8::1]/hook", False, False), ("https://0.0.0.0/hook", False, False),
    ("https://8.8.8.8/hook", False, True), ("https://[2606:4700::1111]/hook", False, True),
    ("https://push.example.org./x", False, True),
    ("https://10.1.2.3/hook", True, True),
    (42, False, False),
])
def test_target_urls(url: object, dev: bool, ok: bool) -> None:
    if ok:
        assert check_url(url, "url", dev) == url
    else:
        with pytest.raises(BadRequest):
            check_url(url, "url", dev)


def test_provider_settings_are_checked_when_the_server_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apns_key_id"):
        Settings(data_dir=tmp_path, apns_key_file=tmp_path / "k.p8").validated()
    with pytest.raises(ConfigError, match="fcm_url"):
        Settings(data_dir=tmp_path, fcm_url="fcm.googleapis.com").validated()
    bad = tmp_path / "creds.json"
    bad.write_text('{"project_id": "p"}')
    with pytest.raises(ConfigError, match="fcm_credentials_file"):
        build_providers(Settings(data_dir=tmp_path, fcm_credentials_file=bad).validated())


async def test_without_credentials_only_web_push_and_webhooks_are_offered(tmp_path: Path) -> None:
    providers, webpush, client = build_providers(Settings(data_dir=tmp_path).validated())
    try:
        assert sorted(providers) == ["webhook", "webpush"]
        assert (tmp_path / "vapid.pem").exists()  # made on first start, kept for the next
        _, webpush2, client2 = build_providers(Settings(data_dir=tmp_path).validated())
        await client2.aclose()
        assert webpush2.public_key == webpush.public_key and len(b64url_decode(webpush.public_key)) == 65
    finally:
        await client.aclose()


@pytest.mark.parametrize(("subject", "ok"), [
    ("mailto:admin@example.org", True), ("mailto:admin@localhost", True), ("https://example.org", True),
    ("https://example.org/", False),  # a path (even '/') is refused by VAPID: every push would fail
    ("mailto:nobody", False), ("admin@example.org", False), ("http://example.org", False),
])
async def test_the_vapid_subject_is_checked_when_the_server_starts(tmp_path: Path, subject: str, ok: bool) -> None:
    settings = Settings(data_dir=tmp_path, vapid_subject=subject)
    if ok:  # and py_vapid signs with it
        _, _, client = build_providers(settings.validated())
        await client.aclose()
    else:
        with pytest.raises(ConfigError, match="vapid_subject"):
            settings.validated()


@pytest.mark.parametrize(("url", "want"), [
    ("https://push.example.org/x", "https://push.example.org"),
    ("https://push.example.org:443/x", "https://push.example.org"),  # the default port is not written
    ("https://user:pw@push.example.org:8443/x", "https://push.example.org:8443"),  # no user info
    ("http://127.0.0.1:8080/push/1", "http://127.0.0.1:8080"),
    ("https://[2001:db8::1]/x", "https://[2001:db8::1]"),
])
def test_vapid_aud_is_the_serialized_origin(url: str, want: str) -> None:
    assert origin(url) == want


async def test_endpoints_vapid_cannot_sign_for_are_refused_at_registration(tmp_path: Path) -> None:
    _, webpush, client = build_providers(Settings(data_dir=tmp_path).validated())
    try:
        keys = {"p256dh": b64url(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)), "auth": b64url(b"a" * 16)}
        assert "push.example.org" in webpush.check({"endpoint": "https://push.example.org:443/x", "keys": keys}, False)
        for endpoint, dev in (("http://[::1]:8080/push/x", True), ("https://127.0.0.1:99999/x", True)):
            with pytest.raises(BadRequest):
                webpush.check({"endpoint": endpoint, "keys": keys}, dev)
    finally:
        await client.aclose()


async def test_off_dev_a_host_that_resolves_inside_is_not_pushed_to() -> None:
    """A DNS name is checked when the push is sent: ``localhost`` stands for any name pointing
    at a loopback or private address (nothing listens on port 9: no request could succeed)."""
    why = await check_resolved("https://localhost:9/hook")
    assert why is not None and why.startswith("localhost resolves to ")
    assert await check_resolved("https://127.0.0.1:9/hook") is not None
    async with httpx.AsyncClient() as client:
        out = await Webhook(client, dev=False).send("https://localhost:9/hook", Wake(1, 60, urgent=True))
        assert (out.kind, out.status) == ("rejected", None) and "not a public address" in out.detail
        out = await Webhook(client, dev=True).send("http://127.0.0.1:9/hook", Wake(1, 60, urgent=True))
        assert out.kind == "retry"  # with --dev it is tried (and the connection is refused)
