"""The wire protocol v1 as typed envelopes.

Requests are parsed with :func:`parse_request`, which validates every field and raises
:class:`bridge.errors.ProtocolError` with the protocol's error code; nothing untyped travels
past it. Events are frozen dataclasses whose ``to_json`` gives the exact bytes published.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from storage.base import MediaRef, Message, ReceiptNote

from .errors import BadRequest, ProtocolError, TooLarge, UnknownType

MAX_ID_LEN = 64
MAX_BODY_CHARS = 16_000
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# -- field readers --------------------------------------------------------------------------
def _req_str(d: Mapping[str, Any], name: str, max_len: int = 256) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v:
        raise BadRequest(f"'{name}' must be a non-empty string")
    if len(v) > max_len:
        raise BadRequest(f"'{name}' is longer than {max_len} characters")
    return v


def _opt_str(d: Mapping[str, Any], name: str, max_len: int = 256) -> str | None:
    if d.get(name) is None:
        return None
    return _req_str(d, name, max_len)


def _int(d: Mapping[str, Any], name: str, *, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(name)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"'{name}' must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}")
    return v


def read_media(v: Any) -> MediaRef:
    if not isinstance(v, dict):
        raise BadRequest("'media' must be an object")
    sha = _req_str(v, "sha256", 64).lower()
    if not SHA256_RE.match(sha):
        raise BadRequest("'media.sha256' must be 64 hex characters")
    return MediaRef(
        key=_req_str(v, "key", 128), mime=_req_str(v, "mime", 128), size=_int(v, "size", lo=1),
        sha256=sha, name=_opt_str(v, "name", 255),
    )


def media_dict(m: MediaRef) -> dict[str, Any]:
    d: dict[str, Any] = {"key": m.key, "mime": m.mime, "size": m.size, "sha256": m.sha256}
    if m.name is not None:
        d["name"] = m.name
    return d


# -- requests -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    id: str
    chat: str | None
    to: str | None
    body: str | None
    media: MediaRef | None
    type: ClassVar[str] = "send"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Send:
        if rid is None:
            raise BadRequest("'send' needs an 'id'")
        chat, to = _opt_str(d, "chat", 64), _opt_str(d, "to", 64)
        if (chat is None) == (to is None):
            raise BadRequest("'send' needs exactly one of 'chat' or 'to'")
        body = d.get("body")
        if body is not None and not isinstance(body, str):
            raise BadRequest("'body' must be a string")
        if body is not None and len(body) > MAX_BODY_CHARS:
            raise BadRequest(f"'body' is longer than {MAX_BODY_CHARS} characters")
        media = read_media(d["media"]) if d.get("media") is not None else None
        if not body and media is None:
            raise BadRequest("'send' needs a non-empty 'body' or 'media'")
        return cls(id=rid, chat=chat, to=to, body=body or None, media=media)


@dataclass(frozen=True, slots=True)
class Sync:
    id: str
    after: int
    limit: int
    type: ClassVar[str] = "sync"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Sync:
        if rid is None:
            raise BadRequest("'sync' needs an 'id'")
        return cls(id=rid, after=_int(d, "after", default=0), limit=_int(d, "limit", default=500, lo=1, hi=1000))


@dataclass(frozen=True, slots=True)
class Ack:
    up_to: int
    id: str | None = None
    type: ClassVar[str] = "ack"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Ack:
        return cls(up_to=_int(d, "up_to"), id=rid)


@dataclass(frozen=True, slots=True)
class Read:
    chat: str
    up_to: int
    id: str | None = None
    type: ClassVar[str] = "read"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Read:
        return cls(chat=_req_str(d, "chat", 64), up_to=_int(d, "up_to"), id=rid)


@dataclass(frozen=True, slots=True)
class Typing:
    chat: str
    id: str | None = None
    type: ClassVar[str] = "typing"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Typing:
        return cls(chat=_req_str(d, "chat", 64), id=rid)


@dataclass(frozen=True, slots=True)
class PresenceReq:
    online: bool
    id: str | None = None
    # seconds: with ``online``, the device's MQTT keepalive, which it promises to keep with
    # publishes the server sees (see PresenceTracker.device_online)
    keepalive: int | None = None
    type: ClassVar[str] = "presence"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> PresenceReq:
        state = d.get("state")
        if state not in ("online", "offline"):
            raise BadRequest("'state' must be 'online' or 'offline'")
        keepalive = _int(d, "keepalive", lo=1, hi=65_535) if d.get("keepalive") is not None else None
        return cls(online=state == "online", id=rid, keepalive=keepalive)


@dataclass(frozen=True, slots=True)
class Watch:
    id: str
    users: tuple[str, ...]
    ttl: int
    type: ClassVar[str] = "watch"
    MAX_USERS: ClassVar[int] = 256

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> Watch:
        if rid is None:
            raise BadRequest("'watch' needs an 'id'")
        users = d.get("users")
        if not isinstance(users, list) or not all(isinstance(u, str) and 0 < len(u) <= 64 for u in users):
            raise BadRequest("'users' must be a list of user ids")
        if len(users) > cls.MAX_USERS:
            raise BadRequest(f"'users' may name at most {cls.MAX_USERS} users")
        return cls(id=rid, users=tuple(dict.fromkeys(users)), ttl=_int(d, "ttl", default=300, lo=1, hi=86_400))


@dataclass(frozen=True, slots=True)
class MediaUpload:
    id: str
    sha256: str
    size: int
    mime: str
    type: ClassVar[str] = "media_upload"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> MediaUpload:
        if rid is None:
            raise BadRequest("'media_upload' needs an 'id'")
        sha = _req_str(d, "sha256", 64).lower()
        if not SHA256_RE.match(sha):
            raise BadRequest("'sha256' must be 64 hex characters")
        return cls(id=rid, sha256=sha, size=_int(d, "size", lo=1), mime=_req_str(d, "mime", 128))


@dataclass(frozen=True, slots=True)
class MediaDone:
    id: str
    key: str
    type: ClassVar[str] = "media_done"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> MediaDone:
        if rid is None:
            raise BadRequest("'media_done' needs an 'id'")
        return cls(id=rid, key=_req_str(d, "key", 128))


@dataclass(frozen=True, slots=True)
class MediaUrl:
    id: str
    key: str
    chat: str
    type: ClassVar[str] = "media_url"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], rid: str | None) -> MediaUrl:
        if rid is None:
            raise BadRequest("'media_url' needs an 'id'")
        return cls(id=rid, key=_req_str(d, "key", 128), chat=_req_str(d, "chat", 64))


Request = Send | Sync | Ack | Read | Typing | PresenceReq | Watch | MediaUpload | MediaDone | MediaUrl
_REQUESTS: dict[str, Any] = {
    c.type: c for c in (Send, Sync, Ack, Read, Typing, PresenceReq, Watch, MediaUpload, MediaDone, MediaUrl)
}


def request_id(d: Mapping[str, Any]) -> str | None:
    rid = d.get("id")
    if rid is None:
        return None
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LEN:
        raise BadRequest(f"'id' must be a string of 1 to {MAX_ID_LEN} characters")
    return rid


def parse_request(raw: bytes, max_bytes: int) -> Request:
    """Validate one device payload. Raises ProtocolError (with the id when one could be read)."""
    if len(raw) > max_bytes:
        raise TooLarge(f"payload is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        # strict UTF-8: json.loads(bytes) would let encoded surrogates through ('surrogatepass')
        d = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("payload is not UTF-8 JSON") from exc
    if not isinstance(d, dict):
        raise BadRequest("payload must be a JSON object")
    if b"\\u" in raw:  # an escape may spell a lone surrogate, which no reply could carry
        try:
            json.dumps(d, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise BadRequest("payload holds a lone UTF-16 surrogate (\\uD800-\\uDFFF)") from exc
    rid: str | None = None
    try:
        rid = request_id(d)
        kind = d.get("type")
        if not isinstance(kind, str):
            raise BadRequest("'type' must be a string")
        cls = _REQUESTS.get(kind)
        if cls is None:
            raise UnknownType(f"unknown type {kind!r}")
        req: Request = cls.from_json(d, rid)
        return req
    except ProtocolError as exc:
        exc.request_id = rid
        raise


# -- events and replies ---------------------------------------------------------------------
def msg_event(m: Message, inbox: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "msg", "inbox": inbox, "chat": m.chat_id, "seq": m.seq,
        "id": m.client_id if m.client_id is not None else f"{m.chat_id}:{m.seq}",
        "from": m.sender, "device": m.device, "ts": m.ts, "kind": m.kind,
    }
    if m.body is not None:
        d["body"] = m.body
    if m.media is not None:
        d["media"] = media_dict(m.media)
    if m.event is not None:
        d["event"] = m.event
    if m.target is not None:
        d["user"] = m.target
    return d


def receipt_event(note: ReceiptNote, inbox: int) -> dict[str, Any]:
    return {"type": "receipt", "inbox": inbox, "chat": note.chat_id, "user": note.user,
            "kind": note.kind, "up_to": note.up_to}


def message_dict(m: Message) -> dict[str, Any]:
    """A message as history returns it: the msg event without an inbox position."""
    d = msg_event(m, 0)
    del d["inbox"]
    return d


def error_reply(code: str, message: str, rid: str | None, retry_after_ms: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "error", "id": rid, "code": code, "message": message}
    if retry_after_ms is not None:
        d["retry_after_ms"] = retry_after_ms
    return d


def presence_event(user: str, online: bool, last_seen: int) -> dict[str, Any]:
    return {"type": "presence", "user": user, "online": online, "last_seen": last_seen}

