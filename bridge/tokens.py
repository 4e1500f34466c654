"""Signed, expiring device tokens: ``pg1.USER.DEVICE.EXPIRES_MS.SIG``.

SIG is HMAC-SHA256 over the rest under the server's secret, so any bridge process holding the
secret can check a token without a database read.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .errors import Unauthorized

_PREFIX = "pg1"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    device_id: str
    expires_at: int


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("token secret must be at least 16 bytes")
        self._secret = secret

    def _sig(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()

    def issue(self, user_id: str, device_id: str, expires_at: int) -> str:
        body = f"{_PREFIX}.{user_id}.{device_id}.{expires_at}"
        return f"{body}.{self._sig(body)}"

    def verify(self, token: str, now: int) -> TokenClaims:
        """Raise Unauthorized for a malformed, forged or expired token."""
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != _PREFIX or not parts[3].isdigit():
            raise Unauthorized("malformed token")
        body = ".".join(parts[:4])
        if not hmac.compare_digest(self._sig(body), parts[4]):
            raise Unauthorized("invalid token")
        claims = TokenClaims(user_id=parts[1], device_id=parts[2], expires_at=int(parts[3]))
        if claims.expires_at <= now:
            raise Unauthorized("token expired")
        return claims
