"""Push rules that need no server: backoff, Retry-After, and which targets are accepted."""

from __future__ import annotations

import email.utils
import random
import time
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.errors import BadRequest, ConfigError
from bridge.push import RETRY_CAP_S, backoff_s
from bridge.push_providers import b64url_decode, build_providers, check_url, retry_after


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
