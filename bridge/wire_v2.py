"""Protocol v2's compact encoding: every event and request as a MessagePack array.

The first element of an array is its type's number, the others are the fields by position,
and trailing fields that are absent are left off. Where v1 repeats what the receiver already
knows, v2 leaves it out: a ``msg`` names its sender only when it is someone else, and its id
only when it is not ``{chat}:{seq}`` (system messages). Decoding takes the receiving user for
that reason.

A ``sent`` leaves out the chat when the ``send`` named it (rather than ``to``): the device
restores it from its own request (``decode``'s ``chats``).

A live ``msg`` (one published as it happens, not an item of a sync ``batch``) in a direct chat
leaves out the chat for the peer, the member who did not send it: it is the direct chat with
the sender, which never changes. A device that does not know that chat yet (``decode``'s
``peers``) gets :class:`Unresolved` and fetches the event by ``sync``, whose items always
carry everything; that item tells it the chat for next time.

A live ``msg`` or a ``sent`` with an inbox position (a send just stored, not one answered from
an earlier attempt, whose time may be old) carries only the low 32 bits of its ``ts`` (a
uint 32, 5 bytes instead of 9): the time is the server's clock a moment before it is published,
and the device places it within 2**31 ms (24.8 days) of its estimate of that clock, which it
takes from the ``now`` every v2 ``batch`` carries (devices sync on connect) and its own
monotonic clock since (``decode``'s ``now_ms``). A device with no estimate yet gets
:class:`Unresolved` and syncs. Batch items carry whole times.

Ids in the shape the store makes them (one letter, then 64 random bits as 11 base-62 digits,
least significant first: ``storage.ids``) go as those 64 bits: a uint 64 (9 bytes
instead of a 13-byte str) where the letter is the one the field implies (``u`` for users,
``d`` for devices, ``c`` for chats), else an ext of type ``ord(letter)`` with the 8 bytes
big-endian (10 bytes; a group chat, ``g``). Any other id goes as its str. Both ways.

Requests: a payload whose first byte is a MessagePack array marker (0x90-0x9f, 0xdc, 0xdd) is
v2; anything else is read as v1 JSON. A v2 request is turned into the v1 object and validated
by the same ``from_json`` as a JSON one, so both mean exactly the same.

docs/protocol.md (section "Protocol v2") lists the positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import msgpack

from storage.ids import bits_of, id_of

from .errors import BadRequest, TooLarge, UnknownType
from .protocol import (
    Attachment,
    Batch,
    ErrorReply,
    Event,
    InboxEvent,
    MediaReady,
    MediaUploadReply,
    MsgEvent,
    PresenceEvent,
    ReceiptEvent,
    Request,
    Sent,
    TypingEvent,
    decode_event,
    parse_fields,
    parse_request,
)

# event type numbers
MSG, RECEIPT, SENT, BATCH, ERROR, PRESENCE, TYPING, MEDIA_UPLOAD, MEDIA_READY, MEDIA_URL = range(1, 11)
KINDS = ("text", "media", "system")
RECEIPT_KINDS = ("delivered", "read")
# request type numbers, and the v1 keys of each request's positions after the type
REQUESTS: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("send", ("id", "chat", "to", "body", "media")),
    2: ("sync", ("id", "after", "limit")),
    3: ("ack", ("up_to", "id")),
    4: ("read", ("chat", "up_to", "id")),
    5: ("typing", ("chat", "id")),
    6: ("presence", ("state", "keepalive", "id")),
    7: ("watch", ("id", "users", "ttl")),
    8: ("media_upload", ("id", "sha256", "size", "mime")),
    9: ("media_done", ("id", "key")),
    10: ("media_url", ("id", "key", "chat")),
}
REQUEST_NUMBERS = {name: (n, keys) for n, (name, keys) in REQUESTS.items()}
_packb = msgpack.Packer(use_bin_type=True).pack
_TS_BITS = 32  # what a live msg or a sent carries of its ts
_TS_MASK = (1 << _TS_BITS) - 1
# the fields that hold ids, by the letter their ids start with when sent as a bare number
USER, DEVICE, CHAT = "u", "d", "c"
# request fields that hold ids, and the letter each implies
_REQUEST_IDS = {"chat": CHAT, "to": USER}


def is_v2(raw: bytes | bytearray) -> bool:
    """Whether a device payload is v2 (a MessagePack array) rather than v1 JSON."""
    return bool(raw) and (0x90 <= raw[0] <= 0x9F or raw[0] in (0xDC, 0xDD))


def id_out(s: str | None, letter: str) -> Any:
    """An id as v2 carries it in a field whose ids start with ``letter`` (module docstring)."""
    n = None if s is None else bits_of(s)
    if n is None:
        return s
    return n if s[0] == letter else msgpack.ExtType(ord(s[0]), n.to_bytes(8, "big"))  # type: ignore[index]


def id_in(v: Any, letter: str) -> Any:
    """The id a v2 field holds (``letter``: what a bare number in it starts with); anything
    that is not an id in either form is returned as it is, for ``from_json`` to judge."""
    if type(v) is int and 0 <= v < 1 << 64:
        return id_of(letter, v)
    if isinstance(v, msgpack.ExtType) and len(v.data) == 8 and 0 < v.code < 128 and chr(v.code).isalpha():
        return id_of(chr(v.code), int.from_bytes(v.data, "big"))
    return v


def place_ts(low: int, now_ms: int) -> int:
    """The time whose low 32 bits are ``low`` nearest to ``now_ms`` (within 2**31 ms)."""
    half = 1 << (_TS_BITS - 1)
    return now_ms + ((low - now_ms + half) & _TS_MASK) - half


def _trim(a: list[Any]) -> list[Any]:
    while a and a[-1] is None:
        a.pop()
    return a


def _media(m: Attachment) -> list[Any]:
    return _trim([m.key, m.mime, m.size, m.sha256, m.name])


class Unresolved(BadRequest):
    """A live v2 event leaves out something this device does not know yet: it fetches the event
    at ``inbox`` by ``sync`` (a batch's items leave nothing out). ``peer``: the event is a
    message in the direct chat with that user (the batch's item names the chat)."""

    def __init__(self, message: str, *, inbox: Any, peer: str | None = None) -> None:
        super().__init__(message)
        self.inbox: int | None = inbox if type(inbox) is int else None
        self.peer = peer


class Unawaited(BadRequest):
    """A ``sent`` that names no chat, for a request id no send of this device awaits: a repeat
    answered again, after its first answer (a bridge that died before it acknowledged the publish,
    whose successor handled it once more: the same seq). Nothing for the device to do."""


def _msg(ev: MsgEvent, for_user: str, live: bool = False) -> list[Any]:
    m = ev.message
    own = m.sender == for_user
    derived = m.id == f"{m.chat}:{m.seq}"
    chat = None if live and ev.direct and not own else id_out(m.chat, CHAT)  # (the direct chat with the sender)
    return _trim([
        MSG, ev.inbox, chat, m.seq, m.ts & _TS_MASK if live else m.ts, KINDS.index(m.kind),
        None if own else id_out(m.sender, USER),
        m.body, None if derived else m.id, id_out(m.device, DEVICE), None if m.media is None else _media(m.media),
        m.event, id_out(m.user, USER),
    ])


def _receipt(ev: ReceiptEvent) -> list[Any]:
    return [RECEIPT, ev.inbox, id_out(ev.chat, CHAT), id_out(ev.user, USER), RECEIPT_KINDS.index(ev.kind), ev.up_to]


def _inbox_item(ev: InboxEvent, for_user: str) -> list[Any]:
    return _msg(ev, for_user) if isinstance(ev, MsgEvent) else _receipt(ev)


def to_array(event: Event, for_user: str) -> list[Any]:
    """The event's v2 array for a device of ``for_user``."""
    if isinstance(event, MsgEvent):
        return _msg(event, for_user, live=True)
    if isinstance(event, ReceiptEvent):
        return _receipt(event)
    if isinstance(event, Sent):
        fresh = event.inbox is not None  # (just stored; a send answered from an earlier attempt has none)
        return _trim([SENT, event.id, None if event.chat_known else id_out(event.chat, CHAT), event.seq,
                      event.ts & _TS_MASK if fresh else event.ts, event.inbox])
    if isinstance(event, Batch):
        return _trim([BATCH, event.id, event.last, event.more, [_inbox_item(e, for_user) for e in event.events],
                      event.now])
    if isinstance(event, ErrorReply):
        return _trim([ERROR, event.id, event.code, event.message, event.retry_after_ms])
    if isinstance(event, PresenceEvent):
        return _trim([PRESENCE, id_out(event.user, USER), event.online, event.last_seen, event.id])
    if isinstance(event, TypingEvent):
        return [TYPING, id_out(event.chat, CHAT), id_out(event.user, USER)]
    if isinstance(event, MediaUploadReply):
        up = event.upload
        ticket = None if up is None else _trim([
            up.method, up.url, up.expires, dict(up.fields) if up.fields else None,
            dict(up.headers) if up.headers else None])
        return _trim([MEDIA_UPLOAD, event.id, event.key, event.exists, ticket])
    if isinstance(event, MediaReady):
        return [MEDIA_READY, event.id, event.key]
    return [MEDIA_URL, event.id, event.key, event.url, event.expires]


def encode(event: Event, for_user: str) -> bytes:
    """The event's v2 payload for a device of ``for_user``."""
    payload: bytes = _packb(to_array(event, for_user))
    return payload


# -- decoding (the SDK and the tests) ----------------------------------------------------------------
def _at(a: list[Any], i: int) -> Any:
    return a[i] if i < len(a) else None


def _live_ts(a: list[Any], now_ms: int | None, what: str, inbox: Any) -> int:
    low = _at(a, 4)
    if type(low) is not int or low < 0:
        raise BadRequest(f"{what}: a live ts is the time's low {_TS_BITS} bits, or the whole time")
    if low > _TS_MASK:  # the whole time (a server before 2026-12-01 sent them whole): nothing to place
        return low
    if now_ms is None:
        raise Unresolved(f"{what}: no estimate of the server's clock here to place its ts", inbox=inbox)
    return place_ts(low, now_ms)


def _v1_msg(a: list[Any], for_user: str, live: bool, peers: Mapping[str, str] | None,
            now_ms: int | None) -> dict[str, Any]:
    kind = _at(a, 5)
    if not isinstance(kind, int) or not 0 <= kind < len(KINDS):
        raise BadRequest("msg: kind must be 0, 1 or 2")
    chat, seq, sender = id_in(_at(a, 2), CHAT), _at(a, 3), id_in(_at(a, 6), USER)
    if chat is None and live and isinstance(sender, str):  # the direct chat with the sender
        chat = None if peers is None else peers.get(sender)
        if chat is None:
            raise Unresolved(f"msg: the direct chat with {sender} is not known here", inbox=_at(a, 1), peer=sender)
    d: dict[str, Any] = {
        "type": "msg", "inbox": _at(a, 1), "chat": chat, "seq": seq,
        "id": _at(a, 8) if _at(a, 8) is not None else f"{chat}:{seq}",
        "from": sender if sender is not None else for_user,
        "device": id_in(_at(a, 9), DEVICE),
        "ts": _live_ts(a, now_ms, "msg", _at(a, 1)) if live else _at(a, 4),
        "kind": KINDS[kind], "body": _at(a, 7), "event": _at(a, 11), "user": id_in(_at(a, 12), USER),
    }
    media = _at(a, 10)
    if media is not None:
        if not isinstance(media, list):
            raise BadRequest("msg: media must be an array")
        d["media"] = {"key": _at(media, 0), "mime": _at(media, 1), "size": _at(media, 2), "sha256": _at(media, 3),
                      "name": _at(media, 4)}
    return d


def _v1_event(a: Any, for_user: str, chats: Mapping[str, str] | None = None,
              peers: Mapping[str, str] | None = None, now_ms: int | None = None, live: bool = True) -> dict[str, Any]:
    if not isinstance(a, list) or not a or not isinstance(a[0], int):
        raise BadRequest("a v2 event is an array that starts with its type number")
    t = a[0]
    if t == MSG:
        return _v1_msg(a, for_user, live, peers, now_ms)
    if t == RECEIPT:
        kind = _at(a, 4)
        if kind not in (0, 1):
            raise BadRequest("receipt: kind must be 0 or 1")
        return {"type": "receipt", "inbox": _at(a, 1), "chat": id_in(_at(a, 2), CHAT), "user": id_in(_at(a, 3), USER),
                "kind": RECEIPT_KINDS[kind], "up_to": _at(a, 5)}
    if t == SENT:
        rid, chat = _at(a, 1), id_in(_at(a, 2), CHAT)
        if chat is None and chats is not None and isinstance(rid, str):
            chat = chats.get(rid)  # the chat the send named: the device knows it
            if chat is None:
                raise Unawaited(f"sent {rid!r}: no send of this device awaits it (answered before)")
        inbox = _at(a, 5)
        return {"type": "sent", "id": rid, "chat": chat, "seq": _at(a, 3),
                "ts": _at(a, 4) if inbox is None else _live_ts(a, now_ms, "sent", inbox), "inbox": inbox}
    if t == BATCH:
        items = _at(a, 4)
        if not isinstance(items, list):
            raise BadRequest("batch: items must be an array")
        return {"type": "batch", "id": _at(a, 1), "last": _at(a, 2), "more": _at(a, 3),
                "items": [_v1_event(i, for_user, live=False) for i in items], "now": _at(a, 5)}
    if t == ERROR:
        return {"type": "error", "id": _at(a, 1), "code": _at(a, 2), "message": _at(a, 3),
                "retry_after_ms": _at(a, 4)}
    if t == PRESENCE:
        return {"type": "presence", "user": id_in(_at(a, 1), USER), "online": _at(a, 2), "last_seen": _at(a, 3),
                "id": _at(a, 4)}
    if t == TYPING:
        return {"type": "typing", "chat": id_in(_at(a, 1), CHAT), "user": id_in(_at(a, 2), USER)}
    if t == MEDIA_UPLOAD:
        ticket = _at(a, 4)
        if ticket is not None and not isinstance(ticket, list):
            raise BadRequest("media_upload: upload must be an array")
        upload = None if ticket is None else {
            "method": _at(ticket, 0), "url": _at(ticket, 1), "expires": _at(ticket, 2),
            "fields": _at(ticket, 3), "headers": _at(ticket, 4)}
        return {"type": "media_upload", "id": _at(a, 1), "key": _at(a, 2), "exists": _at(a, 3), "upload": upload}
    if t == MEDIA_READY:
        return {"type": "media_ready", "id": _at(a, 1), "key": _at(a, 2)}
    if t == MEDIA_URL:
        return {"type": "media_url", "id": _at(a, 1), "key": _at(a, 2), "url": _at(a, 3), "expires": _at(a, 4)}
    raise UnknownType(f"unknown v2 event type {t}")


def _unpack(raw: bytes | bytearray) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BadRequest("payload is not MessagePack") from exc


def decode(raw: bytes | bytearray, for_user: str, chats: Mapping[str, str] | None = None, *,
           peers: Mapping[str, str] | None = None, now_ms: int | None = None) -> Event:
    """A v2 payload received by a device of ``for_user``, as its typed envelope, validated by
    the same ``from_json`` as v1. ``chats``: the chat each ``send`` of this device that awaits
    its ``sent`` named, by request id (a ``sent`` leaves out a chat the send named; without it
    such a ``sent`` has no chat and is refused). ``peers``: the direct chat with each user this
    device knows it for (a live ``msg`` from the peer leaves it out; see :class:`Unresolved`).
    ``now_ms``: the device's estimate of the server's clock (from the ``now`` of its latest
    ``batch``), to place the ts of a live ``msg`` or a ``sent``.
    Raises ProtocolError: :class:`Unresolved` when what the event leaves out is not known."""
    return _typed(_v1_event(_unpack(raw), for_user, chats, peers, now_ms))


def _typed(d: dict[str, Any]) -> Event:
    if d["type"] == "batch":
        items = tuple(_typed(i) for i in d["items"])
        head = decode_event({**d, "items": []})  # (its id, last and more checked as v1's)
        assert isinstance(head, Batch)
        events: list[InboxEvent] = []
        for item in items:
            if not isinstance(item, (MsgEvent, ReceiptEvent)):
                raise BadRequest("'items' holds only msg and receipt events")
            events.append(item)
        now = d.get("now")
        if now is not None and type(now) is not int:
            raise BadRequest("batch: now is the server's clock in ms")
        return replace(head, events=tuple(events), now=now)
    return decode_event({k: v for k, v in d.items() if v is not None or (k == "id" and d["type"] == "error")})


def parse_any(raw: bytes | bytearray, max_bytes: int) -> Request:
    """A device payload in either version (told apart by its first byte). Raises ProtocolError."""
    return parse_request_v2(raw, max_bytes) if is_v2(raw) else parse_request(bytes(raw), max_bytes)


def parse_request_v2(raw: bytes | bytearray, max_bytes: int) -> Request:
    """Validate one v2 device payload (see the module docstring). Raises ProtocolError."""
    if len(raw) > max_bytes:
        raise TooLarge(f"payload is {len(raw)} bytes; the limit is {max_bytes}")
    a = _unpack(raw)
    if not isinstance(a, list) or not a or not isinstance(a[0], int) or isinstance(a[0], bool):
        raise BadRequest("a v2 request is an array that starts with its type number")
    spec = REQUESTS.get(a[0])
    if spec is None:
        raise UnknownType(f"unknown v2 request type {a[0]}")
    name, keys = spec
    if len(a) - 1 > len(keys):
        raise BadRequest(f"'{name}' has at most {len(keys)} fields after its type")
    d: dict[str, Any] = {"type": name}
    for key, value in zip(keys, a[1:], strict=False):
        if value is not None:
            letter = _REQUEST_IDS.get(key)
            d[key] = value if letter is None else id_in(value, letter)
    if name == "watch" and isinstance(d.get("users"), list):
        d["users"] = [id_in(u, USER) for u in d["users"]]
    if name == "presence" and "state" in d:
        if not isinstance(d["state"], bool):
            raise BadRequest("presence: the state is true (online) or false (offline)")
        d["state"] = "online" if d["state"] else "offline"
    if isinstance(d.get("id"), int) and not isinstance(d.get("id"), bool):
        d["id"] = str(d["id"])  # short numeric request ids: replies carry them as strings
    return parse_fields(d)


def request_array(d: Mapping[str, Any]) -> list[Any]:
    """A v1 request object as its v2 array (the SDK builds requests this way)."""
    n, keys = REQUEST_NUMBERS[str(d["type"])]
    a: list[Any] = [n]
    for key in keys:
        v = d.get(key)
        if key == "state" and v is not None:
            v = v == "online"
        elif key in _REQUEST_IDS and isinstance(v, str):
            v = id_out(v, _REQUEST_IDS[key])
        elif key == "users" and isinstance(v, list):
            v = [id_out(u, USER) if isinstance(u, str) else u for u in v]
        a.append(v)
    return _trim(a)


def encode_request(d: Mapping[str, Any]) -> bytes:
    payload: bytes = _packb(request_array(d))
    return payload


__all__ = ["Unresolved", "decode", "encode", "encode_request", "id_in", "id_out", "is_v2", "parse_any", "place_ts",
           "parse_request_v2", "request_array", "to_array"]
