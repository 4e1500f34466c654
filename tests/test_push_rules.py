"""Push rules that need no server: backoff, Retry-After, and which targets are accepted."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from bridge.errors import BadRequest
from bridge.push import RETRY_CAP_S, backoff_s
from bridge.push_providers import check_url, retry_after


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
    (42, False, False),
])
def test_target_urls(url: object, dev: bool, ok: bool) -> None:
    if ok:
        assert check_url(url, "url", dev) == url
    else:
        with pytest.raises(BadRequest):
            check_url(url, "url", dev)
