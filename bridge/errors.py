"""Errors the bridge shows to clients, each with a stable protocol code.

::

    PigeonError
    ├── ProtocolError            has .code (protocol section 3) and .http_status
    │   ├── BadRequest           bad_request        400
    │   ├── UnknownType          unknown_type       400
    │   ├── TooLarge             too_large          413
    │   ├── Unauthorized         unauthorized       401  (HTTP only)
    │   ├── Forbidden            forbidden          403
    │   ├── NotFound             not_found          404
    │   ├── Conflict             conflict           409  (HTTP only; bad_request over MQTT)
    │   ├── RateLimited          rate_limited       429  (+ retry_after_ms)
    │   └── Unavailable          unavailable        503  (nothing was accepted: retry later)
    └── ConfigError              a setting is missing or malformed (names the key)

Storage and driver exceptions are converted at the handler boundary into ``Unavailable``;
their text never reaches a client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .outbox import Out


class PigeonError(Exception):
    """Base of every error raised by the bridge."""


class ConfigError(PigeonError):
    """A setting is missing or malformed."""


class ProtocolError(PigeonError):
    code = "bad_request"
    http_status = 400
    # the code an MQTT error reply carries: one of protocol section 3's (HTTP may say more)
    mqtt_code = "bad_request"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        # what the request did before it failed tells (the receipts an ack moved in some chats
        # before the store failed it in another): published with the error reply
        self.outs: list[Out] = []


class BadRequest(ProtocolError):
    code = "bad_request"
    http_status = 400


class UnknownType(ProtocolError):
    code = mqtt_code = "unknown_type"
    http_status = 400


class TooLarge(ProtocolError):
    code = mqtt_code = "too_large"
    http_status = 413


class Unauthorized(ProtocolError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ProtocolError):
    code = mqtt_code = "forbidden"
    http_status = 403


class NotFound(ProtocolError):
    code = mqtt_code = "not_found"
    http_status = 404


class Conflict(ProtocolError):
    code = "conflict"
    http_status = 409


class RateLimited(ProtocolError):
    code = mqtt_code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after_ms: int, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after_ms = retry_after_ms


class Unavailable(ProtocolError):
    code = mqtt_code = "unavailable"
    http_status = 503
