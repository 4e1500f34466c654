"""Delivering login codes: an HTTP webhook that receives ``{"phone", "text"}``.

Any SMS gateway (Twilio, Vonage, an in-house relay) can sit behind a small webhook; Pigeon
only needs the URL.
"""

from __future__ import annotations

import httpx

from .errors import Unavailable


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
