"""The wire protocol v1 as typed envelopes, both ways.

Requests are parsed with :func:`parse_request`, which validates every field and raises
:class:`bridge.errors.ProtocolError` with the protocol's error code; nothing untyped travels
past it. Everything the server sends (replies and events) is a frozen, slotted dataclass of
this module: handlers build them, the edges encode them (the MQTT edge in ``bridge.wire``, the
HTTP edge in ``bridge.http_api``). ``to_json`` gives the v1 JSON object of an event, in the
order of its keys on the wire; :func:`decode_event` reads one back (the Python SDK and the
tests decode with it), validating as strictly as ``parse_request`` does.

Each event is also a read-only ``Mapping`` of its v1 JSON keys (``ev["type"]``,
``ev.get("id")``, ``ev == {...}``): the SDK handed out plain dicts before it decoded into
these types, and applications keep reading them that way. Code in the bridge reads the fields.

This module knows no storage types: handlers convert what the store returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from .errors import BadRequest, ProtocolError, TooLarge, UnknownType

MAX_ID_LEN = 64
MAX_BODY_CHARS = 16_000
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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


@dataclass(frozen=True, slots=True)
class Attachment:
    """A media reference as it travels in ``send`` and ``msg``: a ready upload."""

    key: str
    mime: str
    size: int
    sha256: str
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "mime": self.mime, "size": self.size, "sha256": self.sha256}
        if self.name is not None:
            d["name"] = self.name
        return d


def read_media(v: Any) -> Attachment:
    if not isinstance(v, dict):
        raise BadRequest("'media' must be an object")
    sha = _req_str(v, "sha256", 64).lower()
    if not SHA256_RE.match(sha):
        raise BadRequest("'media.sha256' must be 64 hex characters")
    return Attachment(
        key=_req_str(v, "key", 128), mime=_req_str(v, "mime", 128), size=_int(v, "size", lo=1),
        sha256=sha, name=_opt_str(v, "name", 255),
    )


# -- requests -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    id: str
    chat: str | None
    to: str | None
    body: str | None
    media: Attachment | None
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
    except RecursionError as exc:  # arrays or objects within each other past the parser's depth
        raise BadRequest("payload is nested too deeply") from exc
    if not isinstance(d, dict):
        raise BadRequest("payload must be a JSON object")
    if b"\\u" in raw:  # an escape may spell a lone surrogate, which no reply could carry
        try:
            json.dumps(d, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise BadRequest("payload holds a lone UTF-16 surrogate (\\uD800-\\uDFFF)") from exc
        except RecursionError as exc:
            raise BadRequest("payload is nested too deeply") from exc
    return parse_fields(d)


def parse_fields(d: Mapping[str, Any]) -> Request:
    """A request object (v1's keys, whatever encoding it came in) as its typed request."""
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
class WireEvent(Mapping[str, Any]):
    """What every reply and event shares: its ``type`` on the wire, its v1 JSON object, and a
    read-only mapping view of that object (see the module docstring)."""

    __slots__ = ()
    type: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WireEvent):  # every field, also those v1 does not carry (but not the
            # encoder's hints, ``compare=False``: how it may write an event, not what it says)
            return type(self) is type(other) and all(
                getattr(self, f.name) == getattr(other, f.name)
                for f in fields(self) if f.compare)  # type: ignore[arg-type]
        if isinstance(other, Mapping):
            return self.to_json() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # (equal to dicts, which are not hashable)


def _opt_int(d: Mapping[str, Any], name: str) -> int | None:
    return None if d.get(name) is None else _int(d, name)


def _bool(d: Mapping[str, Any], name: str) -> bool:
    v = d.get(name)
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be true or false")
    return v


def _str_map(d: Mapping[str, Any], name: str) -> tuple[tuple[str, str], ...] | None:
    v = d.get(name)
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise BadRequest(f"'{name}' must be an object of strings")
    return tuple(v.items())


MessageKind = Literal["text", "media", "system"]
MESSAGE_KINDS: tuple[str, ...] = ("text", "media", "system")
RECEIPT_KINDS: tuple[str, ...] = ("delivered", "read")


@dataclass(frozen=True, slots=True, eq=False)
class ChatMessage(WireEvent):
    """A stored message as devices see it: in a ``msg`` event (with an inbox position, see
    :class:`MsgEvent`) and in history (without one)."""

    chat: str
    seq: int
    id: str  # the sender's id for it, or ``{chat}:{seq}`` for a system message
    sender: str  # ``from`` on the wire
    device: str
    ts: int
    kind: str
    body: str | None = None
    media: Attachment | None = None
    event: str | None = None  # system messages: created, member_added, member_removed, member_left
    user: str | None = None  # system messages: whom the event is about
    type: ClassVar[str] = "msg"

    def fields_json(self, d: dict[str, Any]) -> dict[str, Any]:
        """Add the message's keys to ``d`` in their wire order."""
        d["chat"] = self.chat
        d["seq"] = self.seq
        d["id"] = self.id
        d["from"] = self.sender
        d["device"] = self.device
        d["ts"] = self.ts
        d["kind"] = self.kind
        if self.body is not None:
            d["body"] = self.body
        if self.media is not None:
            d["media"] = self.media.to_json()
        if self.event is not None:
            d["event"] = self.event
        if self.user is not None:
            d["user"] = self.user
        return d

    def to_json(self) -> dict[str, Any]:
        return self.fields_json({"type": "msg"})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChatMessage:
        kind = d.get("kind")
        if kind not in MESSAGE_KINDS:
            raise BadRequest(f"'kind' must be one of {', '.join(MESSAGE_KINDS)}")
        body = d.get("body")
        if body is not None and not isinstance(body, str):
            raise BadRequest("'body' must be a string")
        return cls(
            chat=_req_str(d, "chat", 64), seq=_int(d, "seq", lo=1), id=_req_str(d, "id", 2 * MAX_ID_LEN),
            sender=_req_str(d, "from", 64), device=_req_str(d, "device", 64), ts=_int(d, "ts"), kind=kind,
            body=body, media=read_media(d["media"]) if d.get("media") is not None else None,
            event=_opt_str(d, "event", 64), user=_opt_str(d, "user", 64),
        )


@dataclass(frozen=True, slots=True, eq=False)
class MsgEvent(WireEvent):
    """A message at a position of the recipient's inbox. ``direct``: the message is in a direct
    chat, so that v2 may leave the chat out of the peer's live copy (the peer's device knows its
    direct chat with the sender; docs/protocol.md section 5b). Not part of what the event says."""

    inbox: int
    message: ChatMessage
    direct: bool = field(default=False, compare=False)
    type: ClassVar[str] = "msg"

    def to_json(self) -> dict[str, Any]:
        return self.message.fields_json({"type": "msg", "inbox": self.inbox})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MsgEvent:
        return cls(inbox=_int(d, "inbox", lo=1), message=ChatMessage.from_json(d))


@dataclass(frozen=True, slots=True, eq=False)
class ReceiptEvent(WireEvent):
    """A member (``user``; ``*`` for a group's aggregate) reached ``up_to`` in ``chat``."""

    inbox: int
    chat: str
    user: str
    kind: str  # delivered | read
    up_to: int
    type: ClassVar[str] = "receipt"

    def to_json(self) -> dict[str, Any]:
        return {"type": "receipt", "inbox": self.inbox, "chat": self.chat, "user": self.user,
                "kind": self.kind, "up_to": self.up_to}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReceiptEvent:
        kind = d.get("kind")
        if kind not in RECEIPT_KINDS:
            raise BadRequest("'kind' must be 'delivered' or 'read'")
        return cls(inbox=_int(d, "inbox", lo=1), chat=_req_str(d, "chat", 64), user=_req_str(d, "user", 64),
                   kind=kind, up_to=_int(d, "up_to"))


InboxEvent = MsgEvent | ReceiptEvent


@dataclass(frozen=True, slots=True, eq=False)
class Sent(WireEvent):
    """The reply to ``send``: the message's place in its chat. ``inbox``: its position in the
    sender's own inbox, carried by v2 only (a v2 sending device gets no copy of its message).
    ``chat_known``: the request named the chat (rather than ``to``), so v2 leaves it out: the
    device restores it from its own request."""

    id: str
    chat: str
    seq: int
    ts: int
    inbox: int | None = None
    chat_known: bool = False
    type: ClassVar[str] = "sent"

    def to_json(self) -> dict[str, Any]:
        return {"type": "sent", "id": self.id, "chat": self.chat, "seq": self.seq, "ts": self.ts}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Sent:
        return cls(id=_req_str(d, "id", MAX_ID_LEN), chat=_req_str(d, "chat", 64), seq=_int(d, "seq", lo=1),
                   ts=_int(d, "ts"), inbox=_opt_int(d, "inbox"))


@dataclass(frozen=True, slots=True, eq=False)
class Batch(WireEvent):
    """The reply to ``sync``: inbox events after the asked position, in order. ``now``: the
    server's clock (ms) when it answered, carried by v2 only: a v2 device places the shortened
    times of live events by it (docs/protocol.md section 5b)."""

    id: str
    events: tuple[InboxEvent, ...]  # ``items`` on the wire
    last: int
    more: bool
    now: int | None = field(default=None, compare=False)
    type: ClassVar[str] = "batch"

    def to_json(self) -> dict[str, Any]:
        return {"type": "batch", "id": self.id, "items": [e.to_json() for e in self.events], "last": self.last,
                "more": self.more}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Batch:
        raw = d.get("items")
        if not isinstance(raw, list):
            raise BadRequest("'items' must be a list")
        items: list[InboxEvent] = []
        for item in raw:
            ev = decode_event(item)
            if not isinstance(ev, (MsgEvent, ReceiptEvent)):
                raise BadRequest("'items' holds only msg and receipt events")
            items.append(ev)
        return cls(id=_req_str(d, "id", MAX_ID_LEN), events=tuple(items), last=_int(d, "last"), more=_bool(d, "more"))


@dataclass(frozen=True, slots=True, eq=False)
class ErrorReply(WireEvent):
    """A request failed: the protocol's error code, for the request's ``id`` when it had one."""

    id: str | None
    code: str
    message: str
    retry_after_ms: int | None = None
    type: ClassVar[str] = "error"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "error", "id": self.id, "code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            d["retry_after_ms"] = self.retry_after_ms
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ErrorReply:
        message = d.get("message", "")
        if not isinstance(message, str):
            raise BadRequest("'message' must be a string")
        return cls(id=_opt_str(d, "id", MAX_ID_LEN), code=_req_str(d, "code", 64), message=message,
                   retry_after_ms=_opt_int(d, "retry_after_ms"))


@dataclass(frozen=True, slots=True, eq=False)
class PresenceEvent(WireEvent):
    """A watched user's presence; with ``id``, part of the reply to that ``watch``."""

    user: str
    online: bool
    last_seen: int
    id: str | None = None
    type: ClassVar[str] = "presence"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "presence", "user": self.user, "online": self.online,
                             "last_seen": self.last_seen}
        if self.id is not None:
            d["id"] = self.id
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PresenceEvent:
        return cls(user=_req_str(d, "user", 64), online=_bool(d, "online"), last_seen=_int(d, "last_seen"),
                   id=_opt_str(d, "id", MAX_ID_LEN))


@dataclass(frozen=True, slots=True, eq=False)
class TypingEvent(WireEvent):
    user: str
    chat: str
    type: ClassVar[str] = "typing"

    def to_json(self) -> dict[str, Any]:
        return {"type": "typing", "chat": self.chat, "user": self.user}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TypingEvent:
        return cls(user=_req_str(d, "user", 64), chat=_req_str(d, "chat", 64))


MAX_URL_CHARS = 8192


@dataclass(frozen=True, slots=True)
class UploadTicket:
    """Where and how to upload: the request the device makes, signed and expiring."""

    method: str
    url: str
    expires: int
    fields: tuple[tuple[str, str], ...] | None = None  # form fields (an S3 POST policy)
    headers: tuple[tuple[str, str], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "url": self.url, "expires": self.expires}
        if self.fields:
            d["fields"] = dict(self.fields)
        if self.headers:
            d["headers"] = dict(self.headers)
        return d

    @classmethod
    def from_json(cls, v: Any) -> UploadTicket:
        if not isinstance(v, dict):
            raise BadRequest("'upload' must be an object")
        return cls(method=_req_str(v, "method", 16), url=_req_str(v, "url", MAX_URL_CHARS), expires=_int(v, "expires"),
                   fields=_str_map(v, "fields"), headers=_str_map(v, "headers"))


@dataclass(frozen=True, slots=True, eq=False)
class MediaUploadReply(WireEvent):
    """The reply to ``media_upload``: the key, and where to upload unless it exists already."""

    id: str
    key: str
    exists: bool
    upload: UploadTicket | None = None
    type: ClassVar[str] = "media_upload"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "media_upload", "id": self.id, "key": self.key, "exists": self.exists}
        if self.upload is not None:
            d["upload"] = self.upload.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MediaUploadReply:
        return cls(id=_req_str(d, "id", MAX_ID_LEN), key=_req_str(d, "key", 128), exists=_bool(d, "exists"),
                   upload=UploadTicket.from_json(d["upload"]) if d.get("upload") is not None else None)


@dataclass(frozen=True, slots=True, eq=False)
class MediaReady(WireEvent):
    """The reply to ``media_done``: the upload was checked and may be sent."""

    id: str
    key: str
    type: ClassVar[str] = "media_ready"

    def to_json(self) -> dict[str, Any]:
        return {"type": "media_ready", "id": self.id, "key": self.key}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MediaReady:
        return cls(id=_req_str(d, "id", MAX_ID_LEN), key=_req_str(d, "key", 128))


@dataclass(frozen=True, slots=True, eq=False)
class MediaUrlReply(WireEvent):
    """The reply to ``media_url``: a signed download URL, valid until ``expires``."""

    id: str
    key: str
    url: str
    expires: int
    type: ClassVar[str] = "media_url"

    def to_json(self) -> dict[str, Any]:
        return {"type": "media_url", "id": self.id, "key": self.key, "url": self.url, "expires": self.expires}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MediaUrlReply:
        return cls(id=_req_str(d, "id", MAX_ID_LEN), key=_req_str(d, "key", 128),
                   url=_req_str(d, "url", MAX_URL_CHARS), expires=_int(d, "expires"))


Event = (MsgEvent | ReceiptEvent | Sent | Batch | ErrorReply | PresenceEvent | TypingEvent | MediaUploadReply
         | MediaReady | MediaUrlReply)
# replies that answer one request by its id (presence with an id answers a watch)
REPLY_TYPES: frozenset[str] = frozenset({"sent", "batch", "error", "media_upload", "media_ready", "media_url"})
_EVENTS: dict[str, Any] = {
    c.type: c for c in (MsgEvent, ReceiptEvent, Sent, Batch, ErrorReply, PresenceEvent, TypingEvent,
                        MediaUploadReply, MediaReady, MediaUrlReply)
}


def decode_event(d: Any) -> Event:
    """One v1 event or reply, as parsed JSON, as its typed envelope. Raises ProtocolError
    (BadRequest, or UnknownType for a type this version does not know)."""
    if not isinstance(d, dict):
        raise BadRequest("an event must be a JSON object")
    kind = d.get("type")
    if not isinstance(kind, str):
        raise BadRequest("'type' must be a string")
    cls = _EVENTS.get(kind)
    if cls is None:
        raise UnknownType(f"unknown event type {kind!r}")
    ev: Event = cls.from_json(d)
    return ev


def decode_payload(raw: bytes | bytearray | str) -> Event:
    """One v1 payload as published on ``down/…``, decoded and validated."""
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("payload is not UTF-8 JSON") from exc
    return decode_event(d)
