"""The messaging rules: send, sync, ack, read, typing, chats, groups, history, receipts.

Handlers take typed requests and a :class:`Caller`, talk to the store, and return the reply
and the publications that follow from it. They never touch MQTT, HTTP or a driver.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from cachetools import LRUCache

from storage.base import (
    Chat,
    InboxEntry,
    MediaRef,
    Message,
    NewMessage,
    Receipt,
    ReceiptKind,
    ReceiptNote,
    StorageError,
    Store,
)

from .clock import Clock
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .handling import Caller, DoneInPart, Result, storage_errors
from .outbox import Out, ToUser
from .presence import PresenceTracker
from .protocol import (
    Ack,
    Attachment,
    Batch,
    ChatMessage,
    InboxEvent,
    MsgEvent,
    Read,
    ReceiptEvent,
    Send,
    Sent,
    Sync,
    Typing,
    TypingEvent,
)

log = logging.getLogger(__name__)

# how many chats one ack may advance at the same time
ACK_PARALLEL_CHATS = 16
# A group notice goes to the members with a message among those it covers; finding them reads
# at most this many messages, and beyond that every member is told.
GROUP_NOTICE_SCAN = 256
ACK_CHAT_TTL_S = 2.0
# receipt notices not told, and acks not finished, because the store failed on the way, kept for
# the request's retry (the oldest forgotten past this many)
UNTOLD_KEPT = 10_000
# An entry kept for a failed request remembers the records that hold what it holds (``Keeper``),
# which its retry forgets (a write that failed may have landed all the same): of each field (a
# process's own, or one written before processes had their own) the latest values, these many
COVERED_KEPT = 4
Record = tuple[str, str]  # (its field among the partition's records, its value as stored)
Covered = tuple[Record, ...]


def _covering(*groups: Covered | None, new: Record | None = None) -> Covered:
    """The records of ``groups`` and ``new``, each once, the latest last, at most COVERED_KEPT
    values of a field (a store failing retry after retry writes one field again and again)."""
    out: list[Record] = []
    for one in [r for g in groups if g for r in g] + ([new] if new is not None else []):
        if one not in out:
            out.append(one)
    per_field: dict[str, int] = {}
    latest: list[Record] = []
    for record in reversed(out):
        per_field[record[0]] = seen = per_field.get(record[0], 0) + 1
        if seen <= COVERED_KEPT:
            latest.append(record)
    return tuple(reversed(latest))


def _under_way(by_key: dict[Any, list[Any]], key: Any, took: Any) -> None:
    """Note what a retry under way took on (``_telling``, ``_acking``)."""
    by_key.setdefault(key, []).append(took)


def _done(by_key: dict[Any, list[Any]], key: Any, took: Any) -> None:
    """The retry that took ``took`` (this very object) has ended."""
    taken = by_key[key]
    del taken[next(i for i, t in enumerate(taken) if t is took)]
    if not taken:
        del by_key[key]


def _latest_notes(notes: list[tuple[str, ReceiptNote]]) -> list[tuple[str, ReceiptNote]]:
    """Of notes kept to be told, the furthest of each (recipient, chat, whose, kind), in the
    order they came: a store that keeps failing the retries does not make the list grow, nor
    tell what a later move covers."""
    furthest: dict[tuple[str, str, str, str], tuple[str, ReceiptNote]] = {}
    for to, note in notes:
        k = (to, note.chat_id, note.user, note.kind)
        if k not in furthest or note.up_to >= furthest[k][1].up_to:
            furthest[k] = (to, note)
    return list(furthest.values())


# What a request left unfinished, by name, as recorded for a partition's next holder (Keeper):
# "n" and the (chat, member, kind) of a receipt whose notices were not all told, or "a" and the
# (user, device) of an ack whose receipts were not all moved.
def _untold_name(key: tuple[str, str, str]) -> str:
    return "n" + json.dumps(key, separators=(",", ":"))


def _unfinished_ack_name(key: tuple[str, str]) -> str:
    return "a" + json.dumps(key, separators=(",", ":"))


def _untold_key(fields: object) -> tuple[str, str, str]:
    if not (isinstance(fields, list) and len(fields) == 3 and all(isinstance(f, str) for f in fields)
            and fields[2] in ("delivered", "read")):
        raise ValueError("not a chat, a member and a receipt kind")
    return fields[0], fields[1], fields[2]


def _untold_note(key: tuple[str, str, str], fields: object) -> tuple[str, ReceiptNote]:
    """One notice of a record of ``key``'s (a notice about the chat, for another user)."""
    if not (isinstance(fields, list) and len(fields) == 5):
        raise ValueError("not a notice")
    to, chat_id, who, kind, up_to = fields
    about = who == "*" or (who == key[1] and to != who)  # (a group notice, or the member's own to another)
    if not (isinstance(to, str) and chat_id == key[0] and about and kind in ("delivered", "read")
            and type(up_to) is int and 0 < up_to < 2**63):
        raise ValueError("not a notice of this receipt")
    return to, ReceiptNote(chat_id, who, kind, up_to)


def _as_they_stand(receipts: Sequence[Receipt], notes: list[tuple[str, ReceiptNote]]
                   ) -> list[tuple[str, ReceiptNote]]:
    """Receipt notices of a chat with each position brought up to its ``receipts``: a member's
    own (a direct notice), or the lowest of the other members' (a group notice, ``user`` "*").
    Receipts only move forward, so each is true, and none is behind a notice told before (for
    a group notice: unless a member joined since; the inbox's writer then drops it when it knows
    of the later one, GroupNotices)."""
    def now(to: str, note: ReceiptNote) -> int:
        at = [(r.read if note.kind == "read" else r.delivered) for r in receipts
              if (r.user_id != to if note.user == "*" else r.user_id == note.user)]
        return max(note.up_to, min(at, default=0))

    return [(to, ReceiptNote(n.chat_id, n.user, n.kind, now(to, n))) for to, n in notes]


def _notes_value(notes: list[tuple[str, ReceiptNote]]) -> str:
    return json.dumps([[to, n.chat_id, n.user, n.kind, n.up_to] for to, n in notes], separators=(",", ":"))



def chat_message(m: Message) -> ChatMessage:
    """A stored message as the protocol shows it."""
    media = m.media
    return ChatMessage(
        chat=m.chat_id, seq=m.seq, id=m.client_id if m.client_id is not None else f"{m.chat_id}:{m.seq}",
        sender=m.sender, device=m.device, ts=m.ts, kind=m.kind, body=m.body,
        media=None if media is None else Attachment(media.key, media.mime, media.size, media.sha256, media.name),
        event=m.event, user=m.target,
    )


def receipt_event(note: ReceiptNote, inbox: int) -> ReceiptEvent:
    return ReceiptEvent(inbox=inbox, chat=note.chat_id, user=note.user, kind=note.kind, up_to=note.up_to)


def entry_event(entry: InboxEntry) -> InboxEvent:
    if isinstance(entry.item, Message):
        return MsgEvent(entry.pos, chat_message(entry.item))
    return receipt_event(entry.item, entry.pos)


def media_ref(a: Attachment) -> MediaRef:
    return MediaRef(key=a.key, mime=a.mime, size=a.size, sha256=a.sha256, name=a.name)


class WakeSink(Protocol):
    """Told of inbox events, to wake users who are not connected (``bridge.push.Pusher``)."""

    def note(self, user_ids: Sequence[str], ts_ms: int, *, message: bool) -> None:
        """One inbox event reached each of these users: a message (``message``) or a receipt.
        Must return at once: it is called on the message path."""


class Keeper(Protocol):
    """Where a process records what a user's request left unfinished (``bridge/handover.py``),
    so that the bridge next holding the user's partition finishes it on the request's retry."""

    def record(self, name: str, value: str) -> Record:
        """The record of ``value`` under ``name`` as this process writes it: its own field (each
        process writes its own, so two failing the same request do not overwrite each other)
        and its value with when it was written."""

    async def keep(self, user_id: str, record: Record) -> None:
        """Write ``record`` for the user's partition. Returns within a bound and does not raise:
        a record that cannot be written is logged."""

    async def forget(self, user_id: str, covered: Covered) -> None:
        """Forget each of the records ``covered`` that still holds its value, or an earlier one
        of its field (a later record of a field holds what is left of the earlier): the records
        of what a retry finished (written, tried, or adopted here); one written since stays, for
        its retry or the partition's next holder. Returns within a bound and does not raise."""


class Messenger:
    def __init__(self, store: Store, clock: Clock, presence: PresenceTracker, max_group: int) -> None:
        self.wakes: WakeSink | None = None
        self.keeper: Keeper | None = None
        self._keeping: set[asyncio.Task[None]] = set()  # records written for cancelled requests
        self._store = store
        self._clock = clock
        self._presence = presence
        self.max_group = max_group
        # (chat, member, kind) -> highest aggregate receipt this process has seen told
        self._told: dict[tuple[str, str, str], int] = {}
        # (chat, kind) whose group notices are being worked out -> whether a member moved since
        self._noting: dict[tuple[str, str], bool] = {}
        # chat -> (when read, chat) for the ack path, where every member of a group asks for the
        # same chat (and its hundred members) within moments of the others
        self._acked_chats: dict[str, tuple[float, Chat]] = {}
        # chat -> its read for the ack path under way, which every ack that misses meanwhile joins
        self._reading_chats: dict[str, asyncio.Future[Chat | None]] = {}
        self._known_users: LRUCache[str, bool] = LRUCache(200_000)
        # Receipt notices worked out after a receipt moved but not appended (the store failed
        # on the way), by (chat, member, kind): the retry of the request finds the receipt moved
        # already, and tells these instead of nothing. Recorded with the ``keeper`` too, when
        # there is one, for the next holder of the member's partition (adopt_unfinished).
        # Each with the records that hold it (``Keeper``), which its retry forgets.
        self._untold: LRUCache[tuple[str, str, str], tuple[list[tuple[str, ReceiptNote]], Covered]] = \
            LRUCache(UNTOLD_KEPT)
        # (user, device) -> the acknowledged position an ack moved from whose receipts were not
        # all moved (the store failed on the way): the next ack of the device starts there; with
        # the records that hold it, and the store's claims on the position (the ``prev`` of each
        # ack of this process's that it covers, ``Store.device_ack_done``) its retry is done with
        self._acks_unfinished: LRUCache[tuple[str, str], tuple[int, Covered, tuple[int, ...]]] = \
            LRUCache(UNTOLD_KEPT)
        # What retries under way took on (one kept above each), by the same keys: another request
        # that fails meanwhile records it too, so a process dying before the retry ends loses
        # none of it (it may then be told twice)
        self._telling: dict[tuple[str, str, str], list[list[tuple[str, ReceiptNote]]]] = {}
        self._acking: dict[tuple[str, str], list[int]] = {}

    # -- helpers --------------------------------------------------------------------------------
    async def _member_chat(self, caller: Caller, chat_id: str, *, current_seq: bool = True) -> Chat:
        chat = await self._store.get_chat(chat_id, current_seq=current_seq)
        if chat is None:
            raise NotFound(f"chat {chat_id} does not exist")
        if chat.member(caller.user_id) is None:
            raise Forbidden("you are not a member of this chat")
        return chat

    async def _existing_user(self, user_id: str) -> None:
        if user_id in self._known_users:  # users are never deleted: once seen, no need to ask again
            return
        if await self._store.get_user(user_id) is None:
            raise NotFound(f"user {user_id} does not exist")
        self._known_users[user_id] = True

    async def _append(self, msg: NewMessage, recipients: Sequence[str], *, direct: bool = False
                      ) -> tuple[Message, list[Out]]:
        """Store a message; the stored one and a ``msg`` event for each recipient's inbox.
        ``direct``: the chat is a direct chat (v2 leaves it out of the peer's live copy)."""
        appended = await self._store.append_message(msg, recipients)
        message = chat_message(appended.message)  # one for every recipient's event
        outs = [Out(ToUser(u), MsgEvent(pos, message, direct)) for u, pos in appended.inbox.items()]
        if self.wakes is not None:  # one's own message wakes none of one's devices
            self.wakes.note([u for u in appended.inbox if u != msg.sender], appended.message.ts, message=True)
        return appended.message, outs

    # -- send ------------------------------------------------------------------------------------
    async def send(self, caller: Caller, req: Send) -> Result:
        async with storage_errors():
            earlier = await self._store.find_sent(caller.device_id, req.id)
            if earlier is not None:
                return Result(reply=self._sent(req.id, earlier, chat_known=req.chat is not None))
            if req.to is not None:
                if req.to == caller.user_id:
                    raise BadRequest("'to' must name another user")
                await self._existing_user(req.to)
                # (who is in it is all a send needs: its seq comes from the chat's numbering)
                chat = await self._store.direct_chat(caller.user_id, req.to, self._clock.now_ms(),
                                                     current_seq=False)
            else:
                assert req.chat is not None
                chat = await self._member_chat(caller, req.chat, current_seq=False)
            if req.media is not None:
                obj = await self._store.get_media(req.media.key)
                if obj is None or obj.state != "ready":
                    raise BadRequest("media key is not a ready upload")
                if obj.size != req.media.size or obj.sha256 != req.media.sha256:
                    raise BadRequest("media size or sha256 differs from the upload")
            new = NewMessage(
                chat_id=chat.chat_id, sender=caller.user_id, device=caller.device_id, client_id=req.id,
                ts=self._clock.now_ms(), kind="media" if req.media else "text", body=req.body,
                media=media_ref(req.media) if req.media is not None else None,
            )
            stored, outs = await self._append(new, chat.member_ids, direct=chat.kind == "direct")
        own = next((o.event.inbox for o in outs if o.to == ToUser(caller.user_id) and isinstance(o.event, MsgEvent)),
                   None)
        return Result(reply=self._sent(req.id, stored, own, chat_known=req.chat is not None), outs=outs)

    @staticmethod
    def _sent(rid: str, m: Message, inbox: int | None = None, *, chat_known: bool = False) -> Sent:
        return Sent(id=rid, chat=m.chat_id, seq=m.seq, ts=m.ts, inbox=inbox, chat_known=chat_known)

    # -- sync / ack ------------------------------------------------------------------------------
    async def sync(self, caller: Caller, req: Sync) -> Result:
        async with storage_errors():
            entries = await self._store.read_inbox(caller.user_id, req.after, req.limit + 1)
        more = len(entries) > req.limit
        entries = entries[: req.limit]
        last = entries[-1].pos if entries else req.after
        return Result(reply=Batch(id=req.id, events=tuple(entry_event(e) for e in entries), last=last, more=more,
                                  now=self._clock.now_ms()))

    async def ack(self, caller: Caller, req: Ack) -> Result:
        async with storage_errors():
            prev, new = await self._store.advance_device_ack(caller.device_id, caller.user_id, req.up_to)
            return await self._ack_from(caller, prev, new)

    async def _ack_from(self, caller: Caller, prev: int, new: int) -> Result:
        """The rest of ``ack``: the user's position moved from ``prev`` to ``new``. The store
        keeps the position no further than ``prev`` until its receipts have moved
        (``Store.device_ack_done``): at the end of this ack, or of the retry that finishes them."""
        key = (caller.user_id, caller.device_id)
        claims = [prev] if new > prev else []  # (the store's, to be done with here or by a retry)
        # (empty unless the store failed an ack part way)
        unfinished = self._acks_unfinished.pop(key, None) if self._acks_unfinished else None
        if unfinished is not None:
            if new <= min(prev, unfinished[0]):  # (a position read back lower, and an ack below it)
                self._acks_unfinished[key] = unfinished  # (still left to a retry)
                return Result()
            prev = min(prev, unfinished[0])
            claims += unfinished[2]
        if new > prev:
            took = prev
            if unfinished is not None:  # (what this retry took on, for another ack failing meanwhile)
                _under_way(self._acking, key, took)
            try:
                result = await self._deliver_receipts(caller, prev, new)
            except BaseException as exc:
                # (a retry of this ack does the rest; with what was adopted meanwhile, and what
                # other acks of the device under way took on, if any)
                adopted = self._acks_unfinished.get(key)
                if adopted is not None:
                    prev = min(prev, adopted[0])
                    claims += adopted[2]
                # (the record holds the ranges of retries under way too, the entry only this one's)
                record = self._record(_unfinished_ack_name(key), str(min([prev, *self._acking.get(key, ())])))
                # (it holds the store's claims too, so a crash before the retry leaves the kept
                # position where these receipts start: the device's next ack moves them then)
                self._acks_unfinished[key] = (prev, _covering(unfinished and unfinished[1], adopted and adopted[1],
                                                              new=record), tuple(claims))
                await self._keep(caller.user_id, record, exc)
                raise
            finally:
                if unfinished is not None:
                    _done(self._acking, key, took)
        else:
            result = Result()
        await self._done_with(caller.user_id, claims)  # (one a cancellation skips only holds the position lower)
        if unfinished is not None:
            await self._forget(caller.user_id, unfinished[1])
        return result

    async def _done_with(self, user_id: str, claims: Sequence[int]) -> None:
        """Tell the store the receipts of the acks that moved the user's position from each of
        ``claims`` have moved: the position may be kept past them."""
        for prev in claims:
            try:
                await self._store.device_ack_done(user_id, prev)
            except Exception as exc:  # noqa: BLE001 - kept with a later ack's (or read back lower: redone)
                log.warning("keeping the acknowledged position of %s failed: %r", user_id, exc)

    def _record(self, name: str, value: str) -> Record | None:
        return None if self.keeper is None else self.keeper.record(name, value)

    async def _keep(self, user_id: str, record: Record | None, failed: BaseException) -> None:
        """Record with the keeper, if any, in a task of its own that a cancellation of the
        request does not stop. ``failed``: what the request failed with; when it is being
        cancelled (the bridge stopping), the record is written without waiting for it
        (``flush_keeping`` waits for those)."""
        if self.keeper is not None and record is not None:
            await self._keeping_task(self.keeper.keep(user_id, record), failed)

    async def _forget(self, user_id: str, covered: Covered) -> None:
        """A retry finished what an entry held: forget the records that held it (``covered``,
        as the entry was when the retry took it on), in a task of its own as ``_keep``."""
        if self.keeper is not None and covered:
            await self._keeping_task(self.keeper.forget(user_id, covered), None)

    async def _keeping_task(self, write: Coroutine[Any, Any, None], failed: BaseException | None) -> None:
        # (a keeper takes a field's records as newest in the order their writes start: nothing
        # awaits between making a record and this, so they start in the order they were made)
        task = asyncio.get_running_loop().create_task(write)
        self._keeping.add(task)
        task.add_done_callback(self._kept)
        if failed is None or isinstance(failed, Exception):
            await asyncio.shield(task)

    def _kept(self, task: asyncio.Task[None]) -> None:
        self._keeping.discard(task)
        if not task.cancelled() and task.exception() is not None:  # (a keeper is not to raise)
            log.warning("recording an unfinished request failed: %r", task.exception())

    async def flush_keeping(self, bound_s: float = 10.0) -> None:
        """Wait for the records of cancelled requests still being written (each write is
        bounded; this waits ``bound_s`` at most, for those started meanwhile too)."""
        deadline = asyncio.get_running_loop().time() + bound_s
        while self._keeping and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self._keeping), timeout=left)

    def adopt_unfinished(self, recorded: Mapping[str, tuple[str, str, str]]) -> list[str]:
        """Take on what processes recorded as unfinished (``Keeper``) for the users of a
        partition now held here, by field: (its name, what it kept, its value as stored). The
        retries of those requests finish it here, and forget the records. What is kept here
        already stays (the furthest notices of all, the lowest of acks' positions). Returns the
        fields of the records that are not understood (and were skipped)."""
        skipped = []
        for field, (name, value, stored) in recorded.items():
            try:
                if name.startswith("n"):
                    key = _untold_key(json.loads(name[1:]))
                    if name != _untold_name(key):  # (one a bridge did not write is not taken on)
                        raise ValueError("not named as a bridge names it")
                    notes = [_untold_note(key, n) for n in json.loads(value)]
                    if not notes:
                        raise ValueError("no notices")
                    old_notes, old_covered = self._untold.get(key, ([], ()))
                    self._untold[key] = (_latest_notes(old_notes + notes), _covering(old_covered, new=(field, stored)))
                elif name.startswith("a"):
                    fields = json.loads(name[1:])
                    if not (isinstance(fields, list) and len(fields) == 2 and all(isinstance(f, str) for f in fields)
                            and value.isascii() and value.isdigit() and len(value) <= 18):
                        raise ValueError("not a user, a device and a position")
                    ack, prev = (fields[0], fields[1]), int(value)
                    if name != _unfinished_ack_name(ack):
                        raise ValueError("not named as a bridge names it")
                    old_prev, old_covered, held = self._acks_unfinished.get(ack, (prev, (), ()))
                    self._acks_unfinished[ack] = (min(prev, old_prev), _covering(old_covered, new=(field, stored)),
                                                  held)
                else:
                    raise ValueError("neither notices nor an ack")
            except Exception as exc:  # noqa: BLE001 - one record another process wrote: skipped
                log.warning("an unfinished request recorded as %.200r (%.200r) was not understood: %r",
                            field, value, exc)
                skipped.append(field)
        return skipped

    async def _deliver_receipts(self, caller: Caller, prev: int, new: int) -> Result:
        """Move the delivered receipts of the chats with messages at ``prev``..``new`` of the
        caller's inbox, and tell their senders."""
        reached: dict[str, int] = {}
        after = prev
        while after < new:
            page = await self._store.read_inbox(caller.user_id, after, min(1000, new - after))
            if not page:
                break
            for e in page:
                # one's own messages say nothing to the others about delivery
                if isinstance(e.item, Message) and e.item.sender != caller.user_id:
                    reached[e.item.chat_id] = max(reached.get(e.item.chat_id, 0), e.item.seq)
            after = page[-1].pos
        # Chats are independent: advance them side by side, a bounded number at a time, so a
        # device catching up on many chats is not held up by one round trip after another.
        slots = asyncio.Semaphore(ACK_PARALLEL_CHATS)

        async def advance(chat_id: str, seq: int) -> list[Out]:
            async with slots:
                return await self._advance(chat_id, caller.user_id, "delivered", seq)

        # (each to its end, though another fails: the request ends with all it did, and what the
        # chats that moved tell goes out with its error, DoneInPart)
        told = await asyncio.gather(*(advance(c, s) for c, s in reached.items()), return_exceptions=True)
        outs = [o for one in told if not isinstance(one, BaseException) for o in one]
        failed = [one for one in told if isinstance(one, BaseException)]
        if failed:  # (a cancellation first, then a fault of the bridge's own, then the store's)
            first = next((f for f in failed if not isinstance(f, Exception)), None) or \
                next((f for f in failed if not isinstance(f, StorageError)), failed[0])
            for other in failed:
                if other is not first and not isinstance(other, StorageError | asyncio.CancelledError):
                    log.error("moving a receipt for %s's ack failed", caller.device_id, exc_info=other)
            if outs and isinstance(first, Exception):
                raise DoneInPart(first, outs)
            raise first
        return Result(outs=outs)

    # -- read receipts --------------------------------------------------------------------------
    async def read(self, caller: Caller, req: Read) -> Result:
        async with storage_errors():
            chat = await self._member_chat(caller, req.chat)
            up_to = min(req.up_to, chat.last_seq)
            if up_to <= 0:
                return Result()
            outs = await self._advance(chat.chat_id, caller.user_id, "read", up_to, chat)
        return Result(outs=outs)

    async def _advance(
        self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int, chat: Chat | None = None
    ) -> list[Out]:
        """Move a member's receipt forward and tell whoever should hear of it."""
        if chat is None:
            chat = await self._recent_chat(chat_id)
            if chat is not None and chat.member(user_id) is None:  # perhaps added since it was read
                self._forget_chat(chat_id, chat)
                chat = await self._recent_chat(chat_id)
        if chat is None or chat.member(user_id) is None:
            return []
        moved = await self._store.advance_receipt(chat_id, user_id, kind, up_to)
        key = (chat_id, user_id, kind)
        # (told first: what this move tells supersedes them; empty unless the store failed one)
        held = self._untold.pop(key, None) if self._untold else None
        notes = [] if held is None else list(held[0])
        untold = bool(notes)
        if not moved and not notes:
            return []
        if held is not None:  # (what this retry took on, for another request failing meanwhile)
            _under_way(self._telling, key, held[0])
        try:
            try:
                current = None
                if untold:  # kept from a failed attempt (here, or recorded by another bridge, perhaps
                    # long ago): told as the receipts stand now, never behind a notice told since
                    current = await self._store.get_receipts(chat.chat_id)
                    notes = _as_they_stand(current, notes)
                if moved and chat.kind == "direct":
                    notes += [(m, ReceiptNote(chat_id, user_id, kind, up_to)) for m in chat.member_ids if m != user_id]
                elif moved:
                    if kind == "read":  # it moved the delivered too, and may have been the last to have
                        # it: both notices from one read of the members' receipts
                        if current is None:
                            current = await self._store.get_receipts(chat.chat_id)
                        await self._group_notes_folded(chat, "delivered", notes, current)
                    await self._group_notes_folded(chat, kind, notes, current)
                if untold:
                    notes = _latest_notes(notes)
                if notes:
                    positions = await self._store.append_receipts(notes)
            except BaseException as exc:
                if notes:  # (with what was adopted meanwhile, and what retries under way took on, if any)
                    adopted = self._untold.get(key)
                    kept = _latest_notes((adopted[0] if adopted is not None else []) + notes)
                    # (the record holds what retries under way took on too, the entry only what is
                    # left to this request: a retry that ends tells its own)
                    others = [n for t in self._telling.get(key, ()) if held is None or t is not held[0] for n in t]
                    record = self._record(_untold_name(key), _notes_value(_latest_notes(others + kept) if others
                                                                          else kept))
                    self._untold[key] = (kept, _covering(held and held[1], adopted and adopted[1], new=record))
                    await self._keep(user_id, record, exc)
                raise
            if held is not None:
                await self._forget(user_id, held[1])
            if not notes:
                return []
            # (position 0: a group notice a higher one, worked out on another bridge, overtook)
            told = [(u, n, p) for (u, n), p in zip(notes, positions, strict=True) if p]
            if self.wakes is not None and told:
                self.wakes.note([u for u, _, _ in told], self._clock.now_ms(), message=False)
            return [Out(ToUser(u), receipt_event(n, p)) for u, n, p in told]
        finally:
            if held is not None:
                _done(self._telling, key, held[0])

    async def _recent_chat(self, chat_id: str) -> Chat | None:
        """The chat as read at most ACK_CHAT_TTL_S ago by this process (membership changes made
        here are seen at once; those made by another bridge process within that time). The acks
        of a group's members come together: those that find it unread or out of date join one
        read (each read a hundred members, once for every member, when they did not)."""
        now = self._clock.monotonic()
        hit = self._acked_chats.get(chat_id)
        if hit is not None and now - hit[0] < ACK_CHAT_TTL_S:
            return hit[1]
        reading = self._reading_chats.get(chat_id)
        if reading is None or reading.done():
            reading = asyncio.ensure_future(self._read_acked_chat(chat_id, now))
            reading.add_done_callback(lambda f: f.cancelled() or f.exception())  # (its waiters may be gone)
            self._reading_chats[chat_id] = reading
        return await asyncio.shield(reading)

    async def _read_acked_chat(self, chat_id: str, now: float) -> Chat | None:
        me = asyncio.current_task()
        try:
            chat = await self._store.get_chat(chat_id, current_seq=False)  # (receipts need its members only)
            if chat is not None and self._reading_chats.get(chat_id) is me:  # (not forgotten meanwhile)
                if len(self._acked_chats) > 10_000:
                    self._acked_chats.clear()
                self._acked_chats[chat_id] = (now, chat)
            return chat
        finally:
            if self._reading_chats.get(chat_id) is me:
                del self._reading_chats[chat_id]

    def _forget_chat(self, chat_id: str, read: Chat | None = None) -> None:
        """Its members changed (or may have): the next ack reads it afresh, not joining a read
        begun before. With ``read`` (the chat as an ack found it, lacking its member), only if
        that is what is kept: when it was forgotten already, a read begun since is fresh enough,
        and the members finding themselves missing together join that one."""
        if read is not None:
            kept = self._acked_chats.get(chat_id)
            if kept is None or kept[1] is not read:
                return
        self._acked_chats.pop(chat_id, None)
        self._reading_chats.pop(chat_id, None)

    async def _group_notes_folded(self, chat: Chat, kind: ReceiptKind, notes: list[tuple[str, ReceiptNote]],
                                  current: list[Receipt] | None = None) -> None:
        """Group notices, worked out once for all the members whose receipts moved meanwhile,
        added to ``notes`` as each is recorded as told (so a failure part way keeps those).

        When the members of a group ack the same message, their acks arrive together. The first
        to get here works out the notices; those arriving while it runs only mark the chat, and
        it goes round once more for them and returns every notice. (Each round reads all
        members' receipts, so a hundred acks used to read ten thousand rows.)
        """
        key = (chat.chat_id, kind)
        if key in self._noting:
            self._noting[key] = True
            return
        self._noting[key] = False
        try:
            while True:
                await self._group_notes(chat, kind, notes, current)
                current = None  # (a member moved meanwhile: read them again)
                if not self._noting[key]:
                    return
                self._noting[key] = False
        finally:
            del self._noting[key]

    async def _group_notes(self, chat: Chat, kind: ReceiptKind, notes: list[tuple[str, ReceiptNote]],
                           current: list[Receipt] | None = None) -> None:
        """For each member, the position every *other* member has reached, when it moved past
        one of that member's own messages (a notice is about one's own messages' ticks; a member
        who sent nothing in between has nothing to learn from it).

        Computed from the receipts as stored *after* this request's write, so of two members
        advancing at once at least one handler sees both; the store's record of what each
        member was told keeps the notices moving forward only.
        """
        if current is None:
            current = await self._store.get_receipts(chat.chat_id)
        ranked = sorted(((r.read if kind == "read" else r.delivered), r.user_id) for r in current)
        due: list[tuple[str, int, int]] = []
        for member in chat.member_ids:
            agg = next((v for v, u in ranked if u != member), 0)
            told = self._told.get((chat.chat_id, member, kind), 0)
            if agg > told:
                due.append((member, agg, told))
        if not due:
            return
        senders = await self._senders_between(chat.chat_id, min(t for _, _, t in due), max(a for _, a, _ in due))
        for member, agg, told in due:
            concerned = senders is None or any(told < seq <= agg for seq in senders.get(member, ()))
            if concerned and await self._store.advance_group_notice(chat.chat_id, member, kind, agg):
                notes.append((member, ReceiptNote(chat.chat_id, "*", kind, agg)))
            if len(self._told) > 200_000:
                self._told.clear()
            self._told[(chat.chat_id, member, kind)] = agg

    async def _senders_between(self, chat_id: str, after: int, up_to: int) -> dict[str, list[int]] | None:
        """Who sent which of the chat's messages after..up_to; None when that is more than
        GROUP_NOTICE_SCAN messages, and every member is then told."""
        if up_to - after > GROUP_NOTICE_SCAN:
            return None
        out: dict[str, list[int]] = {}
        for m in await self._store.history(chat_id, up_to + 1, up_to - after):
            out.setdefault(m.sender, []).append(m.seq)
        return out

    # -- typing ----------------------------------------------------------------------------------
    async def typing(self, caller: Caller, req: Typing) -> Result:
        async with storage_errors():
            chat = await self._member_chat(caller, req.chat)
        event = TypingEvent(user=caller.user_id, chat=chat.chat_id)
        outs = [
            Out(ToUser(m), event, qos=0)
            for m in chat.member_ids
            if m != caller.user_id and await self._presence.is_online(m)
        ]
        return Result(outs=outs)

    # -- chats and groups (HTTP) ----------------------------------------------------------------
    async def chats(self, caller: Caller) -> list[Chat]:
        async with storage_errors():
            return await self._store.user_chats(caller.user_id)

    async def open_direct(self, caller: Caller, peer: str) -> Chat:
        if peer == caller.user_id:
            raise BadRequest("'peer' must be another user")
        async with storage_errors():
            await self._existing_user(peer)
            return await self._store.direct_chat(caller.user_id, peer, self._clock.now_ms())

    async def create_group(self, caller: Caller, title: str, members: Sequence[str]) -> tuple[Chat, list[Out]]:
        everyone = list(dict.fromkeys([caller.user_id, *members]))
        if len(everyone) > self.max_group:
            raise BadRequest(f"a group holds at most {self.max_group} members")
        async with storage_errors():
            for uid in everyone:
                await self._existing_user(uid)
            now = self._clock.now_ms()
            chat = await self._store.create_group(caller.user_id, title, everyone, now)
            outs = await self._system(caller, chat, "created", None, chat.member_ids)
            fresh = await self._store.get_chat(chat.chat_id)
        return (fresh or chat), outs

    async def add_member(self, caller: Caller, chat_id: str, user_id: str) -> tuple[Chat, list[Out]]:
        async with storage_errors():
            chat = await self._admin_group(caller, chat_id)
            await self._existing_user(user_id)
            if chat.member(user_id) is not None:
                return chat, []
            if len(chat.members) >= self.max_group:
                raise Conflict(f"the group is full ({self.max_group} members)")
            await self._store.add_member(chat_id, user_id, "member", self._clock.now_ms())
            self._forget_chat(chat_id)
            chat = await self._member_chat(caller, chat_id)
            outs = await self._system(caller, chat, "member_added", user_id, chat.member_ids)
            chat = await self._member_chat(caller, chat_id)  # its last_seq counts the system message
        return chat, outs

    async def remove_member(self, caller: Caller, chat_id: str, user_id: str) -> list[Out]:
        async with storage_errors():
            chat = await self._member_chat(caller, chat_id)
            if chat.kind != "group":
                raise Forbidden("members of a direct chat cannot be removed")
            if user_id != caller.user_id:
                me = chat.member(caller.user_id)
                if me is None or me.role != "admin":
                    raise Forbidden("only an admin can remove other members")
            if chat.member(user_id) is None:
                raise NotFound("that user is not a member of this chat")
            event = "member_left" if user_id == caller.user_id else "member_removed"
            # The departing member is told too, in the same sequence, then leaves.
            outs = await self._system(caller, chat, event, user_id, chat.member_ids)
            await self._store.remove_member(chat_id, user_id)
            self._forget_chat(chat_id)
        return outs

    async def _admin_group(self, caller: Caller, chat_id: str) -> Chat:
        chat = await self._member_chat(caller, chat_id)
        if chat.kind != "group":
            raise Forbidden("members cannot be added to a direct chat")
        me = chat.member(caller.user_id)
        if me is None or me.role != "admin":
            raise Forbidden("only an admin can add members")
        return chat

    async def _system(
        self, caller: Caller, chat: Chat, event: str, target: str | None, recipients: Sequence[str]
    ) -> list[Out]:
        new = NewMessage(
            chat_id=chat.chat_id, sender=caller.user_id, device=caller.device_id, client_id=None,
            ts=self._clock.now_ms(), kind="system", event=event, target=target,
        )
        _stored, outs = await self._append(new, recipients)
        return outs

    async def history(
        self, caller: Caller, chat_id: str, before: int | None, limit: int
    ) -> tuple[list[ChatMessage], int | None]:
        if not 1 <= limit <= 200:
            raise BadRequest("'limit' must be between 1 and 200")
        if before is not None and before < 1:
            raise BadRequest("'before' must be a positive seq")
        async with storage_errors():
            await self._member_chat(caller, chat_id)
            msgs = await self._store.history(chat_id, before, limit + 1)
        more = len(msgs) > limit
        msgs = msgs[:limit]
        return [chat_message(m) for m in msgs], (msgs[-1].seq if more and msgs else None)

    async def receipts(self, caller: Caller, chat_id: str) -> list[Receipt]:
        async with storage_errors():
            await self._member_chat(caller, chat_id)
            return await self._store.get_receipts(chat_id)

    async def share_chat(self, a: str, b: str) -> bool:
        async with storage_errors():
            return await self._store.share_chat(a, b)

    async def get_chat(self, caller: Caller, chat_id: str) -> Chat:
        async with storage_errors():
            return await self._member_chat(caller, chat_id)


__all__ = ["Messenger", "chat_message", "entry_event"]
