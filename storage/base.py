"""The storage contract: everything the bridge keeps, behind one Protocol.

A backend is chosen by URL (see :func:`storage.open_store`). Every backend passes the same
contract suite in ``tests/test_storage_contract.py``.

Errors (all raised by backends, never a driver's own exception)::

    StorageError                 base of everything below
    ├── StorageUnavailable       the backend could not be reached or did not confirm a write;
    │                            nothing the caller asked for may be assumed stored
    └── NotStored                a referenced row (chat, device, media key) does not exist

Design notes that every backend keeps:

* ``seq`` numbers a chat's messages 1, 2, 3, … with no gaps and no repeats; ``inbox`` numbers a
  user's inbox entries the same way. Both are allocated by the backend inside the same atomic
  step that stores the row they number, so a failed write never leaves a hole.
* ``append_message`` is idempotent on ``(device, client_id)``: a second call with the same pair
  stores nothing and returns the first result with ``duplicate=True``.
* Receipt positions only move forward: ``advance_receipt`` never lowers a stored value.
* Messages are addressed by ``(chat_id, seq)`` so a backend may partition them by chat.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from cachetools import LRUCache

if TYPE_CHECKING:
    from .state import SharedState

ChatKind = Literal["direct", "group"]
MessageKind = Literal["text", "media", "system"]
ReceiptKind = Literal["delivered", "read"]
Role = Literal["admin", "member"]
MediaState = Literal["pending", "ready"]


class StorageError(Exception):
    """Base of every error a storage backend raises."""


class StorageUnavailable(StorageError):
    """The backend could not be reached or did not confirm the write."""


class NotStored(StorageError):
    """A referenced row does not exist."""


@dataclass(slots=True)
class StoreOps:
    """What a backend has asked of its database since it opened: plain statements and
    conditional ones (a consensus round each, on Cassandra). Read by ``/metrics`` and
    ``pigeon bench`` to report the store's cost per message."""

    statements: int = 0
    conditional: int = 0
    by_name: dict[str, int] = field(default_factory=dict)  # statements by what they do, where the backend names them


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    phone: str
    name: str
    created_at: int
    last_seen: int


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    user_id: str
    name: str
    platform: str
    created_at: int
    push_provider: str | None = None
    push_token: str | None = None
    # the protocol the device reads user events in, as declared at login: 2 means only on
    # ``down/{user}/v2``, so a user all of whose devices say 2 needs no v1 copy on ``down/{user}``
    proto: int = 1


@dataclass(frozen=True, slots=True)
class LoginCode:
    phone: str
    code_hash: str
    expires_at: int
    attempts: int
    locked_until: int


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    role: Role
    joined_at: int


@dataclass(frozen=True, slots=True)
class Chat:
    chat_id: str
    kind: ChatKind
    title: str
    created_by: str
    created_at: int
    last_seq: int
    members: tuple[Member, ...] = ()

    def member(self, user_id: str) -> Member | None:
        for m in self.members:
            if m.user_id == user_id:
                return m
        return None

    @property
    def member_ids(self) -> list[str]:
        return [m.user_id for m in self.members]


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A ready upload named in a message."""

    key: str
    mime: str
    size: int
    sha256: str
    name: str | None = None


def media_to_json(media: MediaRef | None) -> str | None:
    """How a message's media reference is kept in a text column."""
    if media is None:
        return None
    return json.dumps({"key": media.key, "mime": media.mime, "size": media.size, "sha256": media.sha256,
                       "name": media.name})


def media_from_json(text: str | None) -> MediaRef | None:
    if not text:
        return None
    d = json.loads(text)
    return MediaRef(key=d["key"], mime=d["mime"], size=d["size"], sha256=d["sha256"], name=d.get("name"))


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message before the backend has numbered it."""

    chat_id: str
    sender: str
    device: str
    client_id: str | None
    ts: int
    kind: MessageKind
    body: str | None = None
    media: MediaRef | None = None
    event: str | None = None
    target: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    chat_id: str
    seq: int
    client_id: str | None
    sender: str
    device: str
    ts: int
    kind: MessageKind
    body: str | None = None
    media: MediaRef | None = None
    event: str | None = None
    target: str | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """What ``append_message`` stored: the numbered message and each recipient's inbox position."""

    message: Message
    inbox: Mapping[str, int] = field(default_factory=dict)
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ReceiptNote:
    """A receipt as it sits in a user's inbox."""

    chat_id: str
    user: str
    kind: ReceiptKind
    up_to: int


class GroupNotices:
    """The last group notice (``user`` ``"*"``) a process appended to each inbox, by chat and
    kind, so that one overtaken by a higher one is not appended after it (``append_receipts``).
    Asked where the inbox's appends are numbered, in their order; a process opening an inbox
    for appends (its next holder, too) notes those among its newest entries first. The oldest are
    forgotten past ``kept``; after that the next notice is appended whatever it says."""

    def __init__(self, kept: int = 100_000) -> None:
        self._last: LRUCache[tuple[str, str, str], int] = LRUCache(kept)

    def moves(self, user_id: str, chat_id: str, who: str, kind: str, up_to: int) -> bool:
        """Whether a receipt note is to be appended (and, for a group notice, note it)."""
        if who != "*":
            return True
        key = (user_id, chat_id, kind)
        if up_to < self._last.get(key, up_to):
            return False
        self._last[key] = up_to
        return True

    def seen(self, user_id: str, chat_id: str, kind: str, up_to: int) -> None:
        """A group notice found in the inbox (read back where it is opened for appends)."""
        key = (user_id, chat_id, kind)
        self._last[key] = max(up_to, self._last.get(key, up_to))


class MovingAcks:
    """Where each ack whose receipts are still moving moved its user's acknowledged position
    from, by user (``Store.advance_device_ack`` until ``Store.device_ack_done``): a store keeps
    the position (writes it where a restart reads it back) no further than the lowest of them."""

    def __init__(self) -> None:
        self._from: dict[str, list[int]] = {}

    def claim(self, user_id: str, prev: int) -> None:
        self._from.setdefault(user_id, []).append(prev)

    def done(self, user_id: str, prev: int) -> bool:
        """One ack from ``prev`` is done with; False if none was moving."""
        moving = self._from.get(user_id)
        if moving is None or prev not in moving:
            return False
        moving.remove(prev)
        if not moving:
            del self._from[user_id]
        return True

    def lowest(self, user_id: str) -> int | None:
        """Where the position may be kept up to at most; None when no ack of the user is moving."""
        moving = self._from.get(user_id)
        return min(moving) if moving else None


@dataclass(frozen=True, slots=True)
class InboxEntry:
    user_id: str
    pos: int
    item: Message | ReceiptNote


@dataclass(frozen=True, slots=True)
class Receipt:
    chat_id: str
    user_id: str
    delivered: int
    read: int


@dataclass(frozen=True, slots=True)
class MediaObject:
    key: str
    sha256: str
    size: int
    mime: str
    owner: str
    state: MediaState
    created_at: int


class Store(Protocol):
    """Everything the bridge stores. All methods may raise :class:`StorageUnavailable`."""

    ops: StoreOps

    async def open(self) -> None:
        """Connect and check the schema. Called once before any other method. Raises
        :class:`StorageError` with a message naming ``pigeon db migrate`` if the schema is old."""

    async def migrate(self) -> None:
        """Create or update the schema (idempotent). Safe on a live store."""

    async def close(self) -> None:
        """Release every connection. Safe to call twice."""

    def use_state(self, state: SharedState) -> None:
        """Offer the shared hot state (see :mod:`storage.state`) as an accelerator: hints of
        counter heads and a window of recent sends. A backend may ignore it; none may depend on
        it for correctness."""

    # -- accounts ---------------------------------------------------------------------------
    async def user_by_phone(self, phone: str) -> User | None: ...

    async def create_user(self, phone: str, now: int) -> User:
        """Return the user with that phone, creating it if absent (idempotent)."""

    async def get_user(self, user_id: str) -> User | None: ...

    async def set_user_name(self, user_id: str, name: str) -> User:
        """Raises :class:`NotStored` for an unknown user."""

    async def set_last_seen(self, user_id: str, when: int) -> None:
        """Record when the user was last online; never moves backwards."""

    async def add_device(self, user_id: str, name: str, platform: str, now: int, proto: int = 1) -> Device: ...

    async def get_device(self, device_id: str) -> Device | None: ...

    async def set_push_target(self, device_id: str, provider: str, token: str) -> Device:
        """Raises :class:`NotStored` for an unknown device."""

    async def clear_push_target(self, device_id: str, token: str | None = None) -> bool:
        """Forget the device's push target; with ``token``, only while the stored token is still
        that one (a push service refused it; a newer registration must stay). True when one
        was removed."""

    async def user_devices(self, user_id: str) -> list[Device]:
        """Every device linked to the user, oldest first."""

    async def reads_v1(self, user_id: str) -> bool:
        """Whether any device of the user may read user events in protocol v1 (did not declare
        ``proto`` 2 at login). One read of the user's own rows."""

    async def remove_device(self, device_id: str) -> bool:
        """Unlink a device: its tokens stop working. False if there was no such device."""

    async def put_login_code(self, code: LoginCode) -> None:
        """Store (replace) the pending login code for ``code.phone``."""

    async def get_login_code(self, phone: str) -> LoginCode | None: ...

    async def delete_login_code(self, phone: str) -> None: ...

    # -- chats --------------------------------------------------------------------------------
    async def direct_chat(self, a: str, b: str, now: int, *, current_seq: bool = True) -> Chat:
        """The direct chat between users a and b, created on first use (idempotent, a != b).

        With ``current_seq=False`` the chat's ``last_seq`` may be behind: for callers that need
        only who is in the chat, so a store need not look up its newest message."""

    async def create_group(self, creator: str, title: str, members: Sequence[str], now: int) -> Chat:
        """A new group; ``creator`` is its admin and a member; duplicates in ``members`` are merged."""

    async def get_chat(self, chat_id: str, *, current_seq: bool = True) -> Chat | None:
        """The chat with its current members, or None. ``current_seq=False``: as for
        :meth:`direct_chat`, ``last_seq`` may be behind."""

    async def user_chats(self, user_id: str) -> list[Chat]:
        """Every chat the user is a member of, most recently active first."""

    async def add_member(self, chat_id: str, user_id: str, role: Role, now: int) -> bool:
        """Add a member; False if already a member. Raises :class:`NotStored` for an unknown chat."""

    async def remove_member(self, chat_id: str, user_id: str) -> bool:
        """Remove a member; False if not a member."""

    async def share_chat(self, a: str, b: str) -> bool:
        """Whether users a and b are members of at least one common chat."""

    # -- messages and inboxes -----------------------------------------------------------------
    async def append_message(self, msg: NewMessage, recipients: Sequence[str]) -> Appended:
        """Number ``msg`` with the chat's next seq, store it, and put one inbox entry for it in
        the inbox of every recipient, all durably before returning.

        Idempotent on ``(msg.device, msg.client_id)`` when client_id is set (request ids are
        unique per device, so two devices of one user may use the same id): a repeat stores
        nothing and returns the first message with ``duplicate=True`` and an empty inbox map.
        Raises :class:`NotStored` if the chat does not exist.
        """

    async def find_sent(self, device: str, client_id: str) -> Message | None:
        """The message a device already sent under that client id, if its send is known to be
        complete (every member's inbox entry written); else None, and ``append_message`` with the
        same id finds the message and completes its fan-out, or numbers it."""

    async def history(self, chat_id: str, before: int | None, limit: int) -> list[Message]:
        """Up to ``limit`` messages with seq < before (or the newest), newest first."""

    async def message_carries_media(self, chat_id: str, key: str) -> bool:
        """Whether any message of the chat names that media key."""

    async def append_receipts(self, notes: Sequence[tuple[str, ReceiptNote]]) -> list[int]:
        """Append one receipt entry per (user, note) to that user's inbox; return the positions.
        A group notice (``user`` ``"*"``) below the last one this process appended to that inbox
        for its chat and kind is not appended, and its position is 0: notices worked out by
        two bridges at once reach the inbox's numbering in either order, and the inbox keeps
        them moving forward only."""

    async def read_inbox(self, user_id: str, after: int, limit: int) -> list[InboxEntry]:
        """Inbox entries with pos > after, in order, at most ``limit``."""

    async def inbox_head(self, user_id: str) -> int:
        """The user's highest inbox position (0 when empty)."""

    async def inbox_positions(self, user_id: str) -> tuple[int, int]:
        """The user's (acknowledged position, inbox head): the events after the first, up to the
        second, no device of the user has acknowledged. ``(0, 0)`` for an unknown user. A backend
        that writes acknowledged positions behind may answer one a little lower than the latest."""

    async def advance_device_ack(self, device_id: str, user_id: str, up_to: int) -> tuple[int, int]:
        """Raise the user's acknowledged inbox position to at least ``up_to`` (never past the
        inbox head), and the device's where the backend keeps one; return the user's
        (previous, new) acknowledged position. Another ack of the user goes on from ``new`` at
        once, but when it moved, the position is kept (what a restart reads back) no further
        than ``previous`` until ``device_ack_done``: the receipts it leads to are still to move,
        and an ack a crash caught in between is done again by the device's next one."""

    async def device_ack_done(self, user_id: str, prev: int) -> None:
        """The receipts of an ack that moved the user's position from ``prev`` have moved, by
        it or by the retry that finished what it left: the position may be kept past ``prev``.
        Called once for each ack that moved it (one whose receipts are never finished in this
        process keeps it no further than ``prev`` until the store is opened again)."""

    async def get_receipts(self, chat_id: str) -> list[Receipt]:
        """Delivered and read positions of every current member (0 where nothing yet)."""

    async def advance_receipt(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        """Move the user's position forward to ``up_to``; reading implies delivery.
        Return False when the stored value was already at or past it."""

    async def advance_group_notice(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        """Remember the highest aggregate receipt told to ``user_id`` for that group; False when
        ``up_to`` is not higher than what was told before."""

    # -- media --------------------------------------------------------------------------------
    async def put_media(self, obj: MediaObject) -> MediaObject:
        """Store a media record unless one with that key exists; return the stored one."""

    async def get_media(self, key: str) -> MediaObject | None: ...

    async def mark_media_ready(self, key: str) -> None: ...

    async def stale_uploads(self, before: int, limit: int) -> list[MediaObject]:
        """Media still pending that was declared before ``before`` (ms), at most ``limit``."""

    async def drop_media(self, key: str) -> bool:
        """Forget a *pending* media record; a ready one is kept. True if one was dropped."""
