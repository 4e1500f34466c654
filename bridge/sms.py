"""Delivering login codes.

``WebhookSms`` posts ``{"phone", "text", "code"}`` to a URL; any SMS gateway (Twilio, Vonage,
an in-house relay) can sit behind a small webhook. ``LogSms`` writes the code to the server
log: the fallback when no provider is configured, so a server started with no flags works for
whoever can read its log.
"""

from __future__ import annotations

import logging

import httpx

from .errors import Unavailable

log = logging.getLogger(__name__)


class LogSms:
    async def send_code(self, phone: str, code: str) -> None:
        log.warning("login code for %s: %s (no SMS provider configured)", phone, code)


class WebhookSms:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self._url = url
        self._timeout = timeout_s

    async def send_code(self, phone: str, code: str) -> None:
        text = f"Your Pigeon code is {code}"
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                resp = await client.post(self._url, json={"phone": phone, "text": text, "code": code})
        except httpx.HTTPError as exc:
            raise Unavailable("the SMS provider could not be reached; retry later") from exc
        if resp.status_code >= 300:
            raise Unavailable(f"the SMS provider refused the message ({resp.status_code}); retry later")
