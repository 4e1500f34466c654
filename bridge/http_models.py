"""The HTTP API's request and response bodies as typed models, for the OpenAPI document.

Every ``/v1`` route answers through one of the response models here (FastAPI checks what a
route returns against it, so an answer off the document is a server error, not a silent
change); every error is ``ErrorReply``. Request bodies are described by the request models;
the routes read them themselves, with the same checks as the MQTT requests (``bridge.protocol``,
``bridge.accounts``), so a refused body gets the protocol's own message. The patterns and
bounds below are those checks; the HTTP fuzz tests send bodies that break them and expect a 4xx.
Nothing here changes the JSON on the wire (docs/protocol.md section 6).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from .accounts import PHONE_PATTERN
from .protocol import MAX_BODY_CHARS, MAX_ID_LEN
from .push import PROVIDERS

ErrorCode = Literal["bad_request", "unknown_type", "too_large", "unauthorized", "forbidden", "not_found",
                    "conflict", "rate_limited", "unavailable"]


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(BaseModel):
    # unknown fields are ignored by the routes, as they are over MQTT
    model_config = ConfigDict(extra="allow")


# -- errors -------------------------------------------------------------------------------------------
class ErrorDetail(_Reply):
    code: ErrorCode
    message: str
    retry_after_ms: int | None = Field(None, description="with rate_limited only: when to try again")


class ErrorReply(_Reply):
    error: ErrorDetail


ERROR_MEANING = {
    400: "malformed request, or a field the protocol refuses (code bad_request)",
    401: "no bearer token, or one that is unknown or expired (code unauthorized)",
    403: "not allowed for this caller (code forbidden)",
    404: "no such user, chat, device, object or route (code not_found)",
    405: "method not allowed on this path (code bad_request)",
    409: "the object exists already with other content (code conflict)",
    413: "the body is larger than the server allows (code too_large)",
    429: "too many requests; retry_after_ms says when to try again (code rate_limited)",
    503: "a store is unavailable; try again later (code unavailable)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that can answer these error statuses (and 503, which any
    route that reaches a store can)."""
    return {s: {"model": ErrorReply, "description": ERROR_MEANING[s]} for s in sorted({*statuses, 503})}


# -- auth ---------------------------------------------------------------------------------------------
Phone = Field(pattern=PHONE_PATTERN, description="E.164, e.g. +15550001111")


class CodeRequest(_Request):
    phone: str = Phone


class CodeReply(_Reply):
    status: Literal["sent"]
    dev_code: str | None = Field(None, description="the code itself, only when the server runs with --dev")


class VerifyRequest(_Request):
    phone: str = Phone
    code: str = Field(pattern=r"^[0-9]{6}$")
    device_name: str | None = Field(None, max_length=64, description="'device' when absent or empty")
    platform: str | None = Field(None, max_length=32, description="'unknown' when absent or empty")
    proto: Literal[1, 2] | None = Field(
        None, description="the protocol the device reads user events in: 2 only on down/{user}/v2 (1 when absent)")


class MqttEndpoint(_Reply):
    host: str
    port: int
    ws_url: str | None
    url: str = Field(description="mqtt://HOST:PORT, or mqtts://HOST:PORT when the server has TLS on")
    tls: bool = Field(description="whether host and port speak MQTT over TLS")


class LoginReply(_Reply):
    user_id: str
    device_id: str
    token: str
    expires_at: int
    proto: int = Field(description="the protocol the device reads user events in, as asked")
    http_url: str | None = Field(description="the HTTP base devices use (https:// when TLS is on)")
    mqtt: MqttEndpoint


class RefreshReply(_Reply):
    user_id: str
    device_id: str
    token: str
    expires_at: int


# -- me, users, devices ---------------------------------------------------------------------------------
class MeReply(_Reply):
    user_id: str
    phone: str
    name: str
    device_id: str


class RenameRequest(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"\S", description="1 to 64 characters, not all spaces")


class UserIdReply(_Reply):
    user_id: str


class UserCard(_Reply):
    user_id: str
    phone: str
    name: str


class PresenceReply(_Reply):
    user: str
    online: bool
    last_seen: int


class UnlinkedReply(_Reply):
    device_id: str
    unlinked: bool


class DeviceView(_Reply):
    device_id: str
    name: str
    platform: str
    push: str | None
    proto: int = Field(description="the protocol it reads user events in, as asked at login")
    last_seen: int | None


class DevicesReply(_Reply):
    devices: list[DeviceView]


Provider = Literal["webpush", "fcm", "apns", "webhook"]
assert set(get_args(Provider)) == set(PROVIDERS), "bridge.push.PROVIDERS changed: change Provider too"


class PushRequest(_Request):
    provider: Provider
    token: Any = Field(description="what the provider wakes the device with (protocol section 7)")


class PushReply(_Reply):
    device_id: str
    provider: str | None


class PushClearedReply(_Reply):
    device_id: str
    provider: None
    removed: bool


class VapidReply(_Reply):
    public_key: str


# -- chats ----------------------------------------------------------------------------------------------
class ChatView(_Reply):
    chat: str
    kind: Literal["direct", "group"]
    title: str
    members: list[str]
    admins: list[str]
    last_seq: int


class ChatsReply(_Reply):
    chats: list[ChatView]


class DirectChatRequest(_Request):
    kind: Literal["direct"]
    peer: str = Field(min_length=1)


class GroupChatRequest(_Request):
    kind: Literal["group"]
    title: str = Field(min_length=1, max_length=128, pattern=r"\S")
    members: list[str] = Field(default_factory=list, description="user ids besides the creator")


class MediaRefIn(_Request):
    key: str = Field(min_length=1, max_length=128)
    mime: str = Field(min_length=1, max_length=128)
    size: int = Field(ge=1, le=1 << 62)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    name: str | None = Field(None, min_length=1, max_length=255)


class SendRequest(_Request):
    id: str = Field(min_length=1, max_length=MAX_ID_LEN, description="the client's id: a retry gets the same seq")
    body: str | None = Field(None, max_length=MAX_BODY_CHARS)
    media: MediaRefIn | None = None


class MediaRefOut(_Reply):
    key: str
    mime: str
    size: int
    sha256: str
    name: str | None = None


class MessageView(_Reply):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["msg"]
    chat: str
    seq: int
    id: str
    from_: str = Field(alias="from")
    device: str
    ts: int
    kind: str
    body: str | None = None
    media: MediaRefOut | None = None
    event: str | None = None
    user: str | None = None


class HistoryReply(_Reply):
    messages: list[MessageView]
    next_before: int | None


class SentReply(_Reply):
    type: Literal["sent"]
    id: str
    chat: str
    seq: int
    ts: int


class AddMemberRequest(_Request):
    user_id: str = Field(min_length=1)


class MemberRemovedReply(_Reply):
    chat: str
    removed: str


class ReceiptView(_Reply):
    user: str
    delivered: int
    read: int


class ReceiptsReply(_Reply):
    receipts: list[ReceiptView]


# -- media ----------------------------------------------------------------------------------------------
class UploadRequest(_Request):
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    size: int = Field(ge=1, le=1 << 62)
    mime: str = Field(min_length=1, max_length=128)


class UploadTicket(_Reply):
    method: str
    url: str
    expires: int
    fields: dict[str, str] | None = None
    headers: dict[str, str] | None = None


class UploadReply(_Reply):
    key: str
    exists: bool
    upload: UploadTicket | None = Field(None, description="absent when the object exists already")


class ReadyReply(_Reply):
    key: str
    ready: bool


class MediaUrlReply(_Reply):
    key: str
    url: str
    expires: int


class HealthReply(_Reply):
    status: Literal["ok", "starting"]
