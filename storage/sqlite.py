"""SQLite backend: the embedded default.

One writer thread owns the write connection, so every write runs start to finish without
interleaving; a second connection serves reads (WAL lets them run beside the writer).
``synchronous=FULL`` makes a committed transaction survive a power cut, so a message is durable
before the bridge answers ``sent``.

Writes are group-committed: the writes that arrive while a commit is in progress are run
together in the next transaction, each inside its own savepoint (a write that fails rolls back
alone), and every caller is answered only after that one shared COMMIT. A commit costs an
fsync; sharing it is what lets the embedded server store hundreds of messages a second rather
than one per fsync.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cachetools import LRUCache

from .base import (
    Appended,
    Chat,
    Device,
    GroupNotices,
    InboxEntry,
    LoginCode,
    MediaObject,
    Member,
    Message,
    MovingAcks,
    NewMessage,
    NotStored,
    Receipt,
    ReceiptKind,
    ReceiptNote,
    Role,
    StorageUnavailable,
    StoreOps,
    User,
    media_from_json,
    media_to_json,
)
from .ids import ID_ALPHABET as ID_ALPHABET  # (made here before)
from .ids import ID_DIGITS as ID_DIGITS
from .ids import new_id as new_id

log = logging.getLogger(__name__)
T = TypeVar("T")
SCHEMA_VERSION = 3
# How long a write waits for a lock held elsewhere before the store reports itself unavailable.
BUSY_TIMEOUT_S = 5.0
# At most this many writes share one commit.
GROUP_COMMIT_MAX = 512
# Direct chats whose pair of users this process remembers (see SqliteStore._pairs).
PAIRS_CACHED = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users(
  user_id TEXT PRIMARY KEY, phone TEXT NOT NULL UNIQUE, name TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL, last_seen INTEGER NOT NULL DEFAULT 0,
  inbox_head INTEGER NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS devices(
  device_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, name TEXT NOT NULL, platform TEXT NOT NULL,
  created_at INTEGER NOT NULL, push_provider TEXT, push_token TEXT, acked INTEGER NOT NULL DEFAULT 0,
  proto INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS devices_by_user ON devices(user_id, created_at);
CREATE TABLE IF NOT EXISTS login_codes(
  phone TEXT PRIMARY KEY, code_hash TEXT NOT NULL, expires_at INTEGER NOT NULL,
  attempts INTEGER NOT NULL, locked_until INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chats(
  chat_id TEXT PRIMARY KEY, kind TEXT NOT NULL, title TEXT NOT NULL, created_by TEXT NOT NULL,
  created_at INTEGER NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, last_ts INTEGER NOT NULL,
  direct_key TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS members(
  chat_id TEXT NOT NULL, user_id TEXT NOT NULL, role TEXT NOT NULL, joined_at INTEGER NOT NULL,
  PRIMARY KEY(chat_id, user_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_user ON members(user_id, chat_id);
CREATE TABLE IF NOT EXISTS messages(
  chat_id TEXT NOT NULL, seq INTEGER NOT NULL, client_id TEXT, sender TEXT NOT NULL,
  device TEXT NOT NULL, ts INTEGER NOT NULL, kind TEXT NOT NULL, body TEXT, media TEXT,
  event TEXT, target TEXT, PRIMARY KEY(chat_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_sent(
  device TEXT NOT NULL, client_id TEXT NOT NULL, chat_id TEXT NOT NULL, seq INTEGER NOT NULL,
  PRIMARY KEY(device, client_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox(
  user_id TEXT NOT NULL, pos INTEGER NOT NULL, chat_id TEXT NOT NULL, seq INTEGER,
  rkind TEXT, ruser TEXT, up_to INTEGER, PRIMARY KEY(user_id, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts(
  chat_id TEXT NOT NULL, user_id TEXT NOT NULL, delivered INTEGER NOT NULL DEFAULT 0,
  read INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(chat_id, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_notices(
  chat_id TEXT NOT NULL, user_id TEXT NOT NULL, delivered INTEGER NOT NULL DEFAULT 0,
  read INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(chat_id, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media(
  key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, mime TEXT NOT NULL,
  owner TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chat_media(
  chat_id TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY(chat_id, key)) WITHOUT ROWID;
"""

_MSG_COLS = "chat_id, seq, client_id, sender, device, ts, kind, body, media, event, target"




def _message(row: Sequence[Any]) -> Message:
    return Message(
        chat_id=row[0], seq=row[1], client_id=row[2], sender=row[3], device=row[4], ts=row[5],
        kind=row[6], body=row[7], media=media_from_json(row[8]), event=row[9], target=row[10],
    )


def _user(row: Sequence[Any]) -> User:
    return User(user_id=row[0], phone=row[1], name=row[2], created_at=row[3], last_seen=row[4])


def _device(row: Sequence[Any]) -> Device:
    return Device(
        device_id=row[0], user_id=row[1], name=row[2], platform=row[3], created_at=row[4],
        push_provider=row[5], push_token=row[6], proto=row[7],
    )


_USER_COLS = "user_id, phone, name, created_at, last_seen"
_DEVICE_COLS = "device_id, user_id, name, platform, created_at, push_provider, push_token, proto"
# the message a device already sent under a request id
_SENT_BY_DEVICE = (f"SELECT {_MSG_COLS} FROM messages WHERE (chat_id, seq) ="
                   " (SELECT chat_id, seq FROM device_sent WHERE device=? AND client_id=?)")


def _migrate(c: sqlite3.Connection, version: int, step: Callable[[sqlite3.Connection], None], what: str) -> None:
    """Run one schema step and mark the schema ``version``, in one transaction."""
    c.execute("BEGIN IMMEDIATE")
    try:
        step(c)
        c.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")
    log.info("sqlite schema moved to %d: %s", version, what)


def _to_v2(c: sqlite3.Connection) -> None:
    """Schema 1 kept send ids per user; request ids are unique per device, so from schema 2 they
    are kept per device. Carry the old ones over (each message knows its device) and drop them."""
    c.execute("INSERT OR IGNORE INTO device_sent SELECT m.device, s.client_id, s.chat_id, s.seq"
              " FROM sent s JOIN messages m ON m.chat_id = s.chat_id AND m.seq = s.seq")
    c.execute("DROP TABLE sent")


def _to_v3(c: sqlite3.Connection) -> None:
    """Schema 3: each device says which protocol it reads user events in (its login's
    ``proto``); devices from before read v1."""
    if not any(col[1] == "proto" for col in c.execute("PRAGMA table_info(devices)")):
        c.execute("ALTER TABLE devices ADD COLUMN proto INTEGER NOT NULL DEFAULT 1")


class SqliteStore:
    """The :class:`storage.base.Store` on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-w")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.ops = StoreOps()  # here: reads and write jobs (a job may run several statements)
        # pair of users -> their direct chat: its members never change, so a send with ``to``
        # finds it here instead of in a write job of its own (a commit per message)
        self._pairs: LRUCache[str, Chat] = LRUCache(PAIRS_CACHED)
        self._notices = GroupNotices()  # (asked on the writer thread only)
        # user -> its acknowledged position not yet written, and where each of its acks whose
        # receipts are still moving moved it from (advance_device_ack)
        self._acks_claimed: dict[str, int] = {}
        self._acks_moving = MovingAcks()

    # -- plumbing -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the next group commit; return once it is committed."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.ops.statements += 1
        self._pending.append((fn, args, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._pending[:GROUP_COMMIT_MAX]
            del self._pending[:GROUP_COMMIT_MAX]
            try:
                outcomes = await loop.run_in_executor(self._writer, self._commit, [(f, a) for f, a, _ in batch])
            except sqlite3.Error as exc:
                outcomes = [(False, exc)] * len(batch)
            for (_, _, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                elif isinstance(value, sqlite3.Error):
                    fut.set_exception(StorageUnavailable(f"sqlite: {value}"))
                else:
                    fut.set_exception(value)

    def _commit(self, jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[tuple[bool, Any]]:
        """One transaction for a batch of writes, each in a savepoint (writer thread)."""
        conn = self._wconn
        assert conn is not None, "store not open"
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        try:
            for fn, args in jobs:
                conn.execute("SAVEPOINT w")
                try:
                    outcomes.append((True, fn(conn, *args)))
                except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                    conn.execute("ROLLBACK TO w")
                    outcomes.append((False, exc))
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._rconn
        assert conn is not None, "store not open"
        self.ops.statements += 1
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc

    async def open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)

        def setup() -> None:
            self._wconn = self._connect()
            self._wconn.executescript(_SCHEMA)
            row = self._wconn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._wconn.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {row[0]} is newer than this Pigeon understands ({SCHEMA_VERSION})"
                )
            else:
                if int(row[0]) < 2:
                    _migrate(self._wconn, 2, _to_v2, "send ids are kept per device")
                if int(row[0]) < 3:
                    _migrate(self._wconn, 3, _to_v3, "devices say which protocol they read")

        await self._run(self._writer, setup)

        try:
            self._rconn = self._connect()  # reads run on the event loop thread
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc
        log.info("sqlite store open at %s", self._path)

    def use_state(self, state: object) -> None:
        """One writer numbers everything in a transaction: hints would not help."""

    async def migrate(self) -> None:
        """The embedded store creates its schema on open; migrating is opening."""
        if self._wconn is None:
            await self.open()

    async def close(self) -> None:
        def close_w() -> None:
            if self._wconn is not None:
                self._wconn.close()
                self._wconn = None

        if self._flusher is not None:
            await self._flusher
        if self._wconn is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, close_w)
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None
        self._writer.shutdown(wait=True)

    # -- accounts -----------------------------------------------------------------------------
    async def user_by_phone(self, phone: str) -> User | None:
        def q(c: sqlite3.Connection) -> User | None:
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE phone=?", (phone,)).fetchone()
            return _user(row) if row else None

        return await self._read(q)

    async def create_user(self, phone: str, now: int) -> User:
        def q(c: sqlite3.Connection) -> User:
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE phone=?", (phone,)).fetchone()
            if row:
                return _user(row)
            uid = new_id("u")
            c.execute("INSERT INTO users(user_id, phone, created_at) VALUES(?,?,?)", (uid, phone, now))
            return User(user_id=uid, phone=phone, name="", created_at=now, last_seen=0)

        return await self._write(q)

    async def get_user(self, user_id: str) -> User | None:
        def q(c: sqlite3.Connection) -> User | None:
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE user_id=?", (user_id,)).fetchone()
            return _user(row) if row else None

        return await self._read(q)

    async def set_user_name(self, user_id: str, name: str) -> User:
        def q(c: sqlite3.Connection) -> User:
            row = c.execute(
                f"UPDATE users SET name=? WHERE user_id=? RETURNING {_USER_COLS}", (name, user_id)
            ).fetchone()
            if row is None:
                raise NotStored(f"user {user_id}")
            return _user(row)

        return await self._write(q)

    async def set_last_seen(self, user_id: str, when: int) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute("UPDATE users SET last_seen=max(last_seen, ?) WHERE user_id=?", (when, user_id))

        await self._write(q)

    async def add_device(self, user_id: str, name: str, platform: str, now: int, proto: int = 1) -> Device:
        def q(c: sqlite3.Connection) -> Device:
            did = new_id("d")
            c.execute(
                "INSERT INTO devices(device_id, user_id, name, platform, created_at, proto) VALUES(?,?,?,?,?,?)",
                (did, user_id, name, platform, now, proto),
            )
            return Device(device_id=did, user_id=user_id, name=name, platform=platform, created_at=now, proto=proto)

        return await self._write(q)

    async def get_device(self, device_id: str) -> Device | None:
        def q(c: sqlite3.Connection) -> Device | None:
            row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id=?", (device_id,)).fetchone()
            return _device(row) if row else None

        return await self._read(q)

    async def set_push_target(self, device_id: str, provider: str, token: str) -> Device:
        def q(c: sqlite3.Connection) -> Device:
            row = c.execute(
                f"UPDATE devices SET push_provider=?, push_token=? WHERE device_id=? RETURNING {_DEVICE_COLS}",
                (provider, token, device_id),
            ).fetchone()
            if row is None:
                raise NotStored(f"device {device_id}")
            return _device(row)

        return await self._write(q)

    async def clear_push_target(self, device_id: str, token: str | None = None) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            sql = "UPDATE devices SET push_provider=NULL, push_token=NULL WHERE device_id=? AND push_token IS NOT NULL"
            if token is None:
                return c.execute(sql, (device_id,)).rowcount == 1
            return c.execute(sql + " AND push_token=?", (device_id, token)).rowcount == 1

        return await self._write(q)

    async def user_devices(self, user_id: str) -> list[Device]:
        def q(c: sqlite3.Connection) -> list[Device]:
            rows = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE user_id=? ORDER BY created_at, device_id",
                             (user_id,)).fetchall()
            return [_device(r) for r in rows]

        return await self._read(q)

    async def reads_v1(self, user_id: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            found = c.execute("SELECT 1 FROM devices WHERE user_id=? AND proto<>2 LIMIT 1", (user_id,)).fetchone()
            return found is not None

        return await self._read(q)

    async def remove_device(self, device_id: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM devices WHERE device_id=?", (device_id,)).rowcount == 1

        return await self._write(q)

    async def put_login_code(self, code: LoginCode) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO login_codes VALUES(?,?,?,?,?)",
                (code.phone, code.code_hash, code.expires_at, code.attempts, code.locked_until),
            )

        await self._write(q)

    async def get_login_code(self, phone: str) -> LoginCode | None:
        def q(c: sqlite3.Connection) -> LoginCode | None:
            row = c.execute(
                "SELECT phone, code_hash, expires_at, attempts, locked_until FROM login_codes WHERE phone=?",
                (phone,),
            ).fetchone()
            return LoginCode(*row) if row else None

        return await self._read(q)

    async def delete_login_code(self, phone: str) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM login_codes WHERE phone=?", (phone,))

        await self._write(q)

    # -- chats --------------------------------------------------------------------------------
    @staticmethod
    def _load_chat(c: sqlite3.Connection, chat_id: str) -> Chat | None:
        row = c.execute(
            "SELECT chat_id, kind, title, created_by, created_at, last_seq FROM chats WHERE chat_id=?",
            (chat_id,),
        ).fetchone()
        if row is None:
            return None
        members = tuple(
            Member(user_id=m[0], role=m[1], joined_at=m[2])
            for m in c.execute(
                "SELECT user_id, role, joined_at FROM members WHERE chat_id=? ORDER BY joined_at, user_id",
                (chat_id,),
            )
        )
        return Chat(
            chat_id=row[0], kind=row[1], title=row[2], created_by=row[3], created_at=row[4],
            last_seq=row[5], members=members,
        )

    async def direct_chat(self, a: str, b: str, now: int, *, current_seq: bool = True) -> Chat:
        key = "|".join(sorted((a, b)))
        known = self._pairs.get(key)
        if known is not None:
            if not current_seq:
                return known
            chat = await self._read(self._load_chat, known.chat_id)
            if chat is not None:
                return chat

        def q(c: sqlite3.Connection) -> Chat:
            row = c.execute("SELECT chat_id FROM chats WHERE direct_key=?", (key,)).fetchone()
            if row is None:
                cid = new_id("c")
                c.execute(
                    "INSERT INTO chats(chat_id, kind, title, created_by, created_at, last_ts, direct_key)"
                    " VALUES(?, 'direct', '', ?, ?, ?, ?)",
                    (cid, a, now, now, key),
                )
                for uid in (a, b):
                    c.execute("INSERT INTO members VALUES(?,?,'member',?)", (cid, uid, now))
            else:
                cid = row[0]
            chat = self._load_chat(c, cid)
            assert chat is not None
            return chat

        chat = await self._write(q)
        self._pairs[key] = chat
        return chat

    async def create_group(self, creator: str, title: str, members: Sequence[str], now: int) -> Chat:
        def q(c: sqlite3.Connection) -> Chat:
            cid = new_id("g")
            c.execute(
                "INSERT INTO chats(chat_id, kind, title, created_by, created_at, last_ts)"
                " VALUES(?, 'group', ?, ?, ?, ?)",
                (cid, title, creator, now, now),
            )
            c.execute("INSERT INTO members VALUES(?,?,'admin',?)", (cid, creator, now))
            for uid in dict.fromkeys(members):
                if uid != creator:
                    c.execute("INSERT INTO members VALUES(?,?,'member',?)", (cid, uid, now))
            chat = self._load_chat(c, cid)
            assert chat is not None
            return chat

        return await self._write(q)

    async def get_chat(self, chat_id: str, *, current_seq: bool = True) -> Chat | None:
        return await self._read(self._load_chat, chat_id)  # the seq is always current here

    async def user_chats(self, user_id: str) -> list[Chat]:
        def q(c: sqlite3.Connection) -> list[Chat]:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT m.chat_id FROM members m JOIN chats ch ON ch.chat_id = m.chat_id"
                    " WHERE m.user_id=? ORDER BY ch.last_ts DESC, ch.chat_id",
                    (user_id,),
                )
            ]
            chats = [self._load_chat(c, i) for i in ids]
            return [ch for ch in chats if ch is not None]

        return await self._read(q)

    async def add_member(self, chat_id: str, user_id: str, role: Role, now: int) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            if c.execute("SELECT 1 FROM chats WHERE chat_id=?", (chat_id,)).fetchone() is None:
                raise NotStored(f"chat {chat_id}")
            cur = c.execute("INSERT OR IGNORE INTO members VALUES(?,?,?,?)", (chat_id, user_id, role, now))
            return cur.rowcount == 1

        return await self._write(q)

    async def remove_member(self, chat_id: str, user_id: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            cur = c.execute("DELETE FROM members WHERE chat_id=? AND user_id=?", (chat_id, user_id))
            return cur.rowcount == 1

        return await self._write(q)

    async def share_chat(self, a: str, b: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT 1 FROM members x JOIN members y ON x.chat_id = y.chat_id"
                " WHERE x.user_id=? AND y.user_id=? LIMIT 1",
                (a, b),
            ).fetchone()
            return row is not None

        return await self._read(q)

    # -- messages -------------------------------------------------------------------------------
    async def append_message(self, msg: NewMessage, recipients: Sequence[str]) -> Appended:
        def q(c: sqlite3.Connection) -> Appended:
            if msg.client_id is not None:
                prev = c.execute(_SENT_BY_DEVICE, (msg.device, msg.client_id)).fetchone()
                if prev is not None:
                    return Appended(message=_message(prev), inbox={}, duplicate=True)
            row = c.execute(
                "UPDATE chats SET last_seq = last_seq + 1, last_ts = ? WHERE chat_id=? RETURNING last_seq",
                (msg.ts, msg.chat_id),
            ).fetchone()
            if row is None:
                raise NotStored(f"chat {msg.chat_id}")
            seq = int(row[0])
            c.execute(
                f"INSERT INTO messages({_MSG_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (msg.chat_id, seq, msg.client_id, msg.sender, msg.device, msg.ts, msg.kind, msg.body,
                 media_to_json(msg.media), msg.event, msg.target),
            )
            if msg.client_id is not None:
                c.execute("INSERT INTO device_sent VALUES(?,?,?,?)", (msg.device, msg.client_id, msg.chat_id, seq))
            if msg.media is not None:
                c.execute("INSERT OR IGNORE INTO chat_media VALUES(?,?)", (msg.chat_id, msg.media.key))
            inbox: dict[str, int] = {}
            for uid in dict.fromkeys(recipients):
                pos = c.execute(
                    "UPDATE users SET inbox_head = inbox_head + 1 WHERE user_id=? RETURNING inbox_head", (uid,)
                ).fetchone()
                if pos is None:
                    continue
                inbox[uid] = int(pos[0])
                c.execute("INSERT INTO inbox(user_id, pos, chat_id, seq) VALUES(?,?,?,?)",
                          (uid, inbox[uid], msg.chat_id, seq))
            stored = Message(
                chat_id=msg.chat_id, seq=seq, client_id=msg.client_id, sender=msg.sender, device=msg.device,
                ts=msg.ts, kind=msg.kind, body=msg.body, media=msg.media, event=msg.event, target=msg.target,
            )
            return Appended(message=stored, inbox=inbox, duplicate=False)

        return await self._write(q)

    async def find_sent(self, device: str, client_id: str) -> Message | None:
        def q(c: sqlite3.Connection) -> Message | None:
            row = c.execute(_SENT_BY_DEVICE, (device, client_id)).fetchone()
            return _message(row) if row else None

        return await self._read(q)

    async def history(self, chat_id: str, before: int | None, limit: int) -> list[Message]:
        def q(c: sqlite3.Connection) -> list[Message]:
            bound = before if before is not None else 1 << 62
            return [
                _message(r)
                for r in c.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE chat_id=? AND seq < ? ORDER BY seq DESC LIMIT ?",
                    (chat_id, bound, limit),
                )
            ]

        return await self._read(q)

    async def message_carries_media(self, chat_id: str, key: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT 1 FROM chat_media WHERE chat_id=? AND key=?", (chat_id, key)).fetchone()
            return row is not None

        return await self._read(q)

    async def append_receipts(self, notes: Sequence[tuple[str, ReceiptNote]]) -> list[int]:
        def q(c: sqlite3.Connection) -> list[int]:
            out: list[int] = []
            for uid, note in notes:
                if not self._notices.moves(uid, note.chat_id, note.user, note.kind, note.up_to):
                    out.append(0)
                    continue
                row = c.execute(
                    "UPDATE users SET inbox_head = inbox_head + 1 WHERE user_id=? RETURNING inbox_head", (uid,)
                ).fetchone()
                if row is None:
                    raise NotStored(f"user {uid}")
                pos = int(row[0])
                c.execute(
                    "INSERT INTO inbox(user_id, pos, chat_id, rkind, ruser, up_to) VALUES(?,?,?,?,?,?)",
                    (uid, pos, note.chat_id, note.kind, note.user, note.up_to),
                )
                out.append(pos)
            return out

        return await self._write(q)

    async def read_inbox(self, user_id: str, after: int, limit: int) -> list[InboxEntry]:
        def q(c: sqlite3.Connection) -> list[InboxEntry]:
            rows = c.execute(
                "SELECT i.pos, i.chat_id, i.seq, i.rkind, i.ruser, i.up_to,"
                " m.chat_id, m.seq, m.client_id, m.sender, m.device, m.ts, m.kind, m.body, m.media, m.event,"
                " m.target FROM inbox i LEFT JOIN messages m ON m.chat_id = i.chat_id AND m.seq = i.seq"
                " WHERE i.user_id=? AND i.pos > ? ORDER BY i.pos LIMIT ?",
                (user_id, after, limit),
            ).fetchall()
            out: list[InboxEntry] = []
            for r in rows:
                item: Message | ReceiptNote
                if r[2] is not None:
                    item = _message(r[6:])
                else:
                    item = ReceiptNote(chat_id=r[1], user=r[4], kind=r[3], up_to=r[5])
                out.append(InboxEntry(user_id=user_id, pos=r[0], item=item))
            return out

        return await self._read(q)

    async def inbox_head(self, user_id: str) -> int:
        def q(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT inbox_head FROM users WHERE user_id=?", (user_id,)).fetchone()
            return int(row[0]) if row else 0

        return await self._read(q)

    async def inbox_positions(self, user_id: str) -> tuple[int, int]:
        def q(c: sqlite3.Connection) -> tuple[int, int]:
            row = c.execute("SELECT acked, inbox_head FROM users WHERE user_id=?", (user_id,)).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        acked, head = await self._read(q)
        return max(acked, self._acks_claimed.get(user_id, 0)), head  # (with acks whose receipts are moving)

    async def advance_device_ack(self, device_id: str, user_id: str, up_to: int) -> tuple[int, int]:
        def q(c: sqlite3.Connection) -> tuple[int, int]:
            c.execute("UPDATE devices SET acked = max(acked, ?) WHERE device_id=?", (up_to, device_id))
            row = c.execute("SELECT acked, inbox_head FROM users WHERE user_id=?", (user_id,)).fetchone()
            if row is None:
                raise NotStored(f"user {user_id}")
            return int(row[0]), int(row[1])

        kept, head = await self._write(q)
        # (on the loop, with no await between reading and claiming: each ack of the user moves
        # on from the last; the position is written once the receipts have moved, device_ack_done)
        prev = max(kept, self._acks_claimed.get(user_id, 0))
        new = max(prev, min(up_to, head))
        if new != prev:
            self._acks_claimed[user_id] = new
            self._acks_moving.claim(user_id, prev)
        return prev, new

    async def device_ack_done(self, user_id: str, prev: int) -> None:
        if not self._acks_moving.done(user_id, prev):
            return
        lowest = self._acks_moving.lowest(user_id)
        kept = self._acks_claimed[user_id] if lowest is None else lowest

        def q(c: sqlite3.Connection) -> None:
            c.execute("UPDATE users SET acked = max(acked, ?) WHERE user_id=?", (kept, user_id))

        try:
            await self._write(q)
        finally:  # (written, or not: then read back lower, and what it covered is done again)
            if self._acks_moving.lowest(user_id) is None and self._acks_claimed.get(user_id) == kept:
                del self._acks_claimed[user_id]

    async def get_receipts(self, chat_id: str) -> list[Receipt]:
        def q(c: sqlite3.Connection) -> list[Receipt]:
            return [
                Receipt(chat_id=chat_id, user_id=r[0], delivered=r[1], read=r[2])
                for r in c.execute(
                    "SELECT m.user_id, coalesce(r.delivered, 0), coalesce(r.read, 0) FROM members m"
                    " LEFT JOIN receipts r ON r.chat_id = m.chat_id AND r.user_id = m.user_id"
                    " WHERE m.chat_id=? ORDER BY m.joined_at, m.user_id",
                    (chat_id,),
                )
            ]

        return await self._read(q)

    async def advance_receipt(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT delivered, read FROM receipts WHERE chat_id=? AND user_id=?", (chat_id, user_id)
            ).fetchone()
            delivered, read = (int(row[0]), int(row[1])) if row else (0, 0)
            if kind == "read":
                changed = up_to > read
                read = max(read, up_to)
                delivered = max(delivered, up_to)
            else:
                changed = up_to > delivered
                delivered = max(delivered, up_to)
            if changed:
                c.execute("INSERT OR REPLACE INTO receipts VALUES(?,?,?,?)", (chat_id, user_id, delivered, read))
            return changed

        return await self._write(q)

    async def advance_group_notice(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        col = "read" if kind == "read" else "delivered"

        def q(c: sqlite3.Connection) -> bool:
            row = c.execute(
                f"SELECT {col} FROM group_notices WHERE chat_id=? AND user_id=?", (chat_id, user_id)
            ).fetchone()
            if row is not None and int(row[0]) >= up_to:
                return False
            if row is None:
                c.execute("INSERT INTO group_notices(chat_id, user_id) VALUES(?,?)", (chat_id, user_id))
            c.execute(f"UPDATE group_notices SET {col}=? WHERE chat_id=? AND user_id=?", (up_to, chat_id, user_id))
            return True

        return await self._write(q)

    # -- media --------------------------------------------------------------------------------
    async def put_media(self, obj: MediaObject) -> MediaObject:
        def q(c: sqlite3.Connection) -> MediaObject:
            c.execute(
                "INSERT OR IGNORE INTO media VALUES(?,?,?,?,?,?,?)",
                (obj.key, obj.sha256, obj.size, obj.mime, obj.owner, obj.state, obj.created_at),
            )
            row = c.execute(
                "SELECT key, sha256, size, mime, owner, state, created_at FROM media WHERE key=?", (obj.key,)
            ).fetchone()
            return MediaObject(*row)

        return await self._write(q)

    async def get_media(self, key: str) -> MediaObject | None:
        def q(c: sqlite3.Connection) -> MediaObject | None:
            row = c.execute(
                "SELECT key, sha256, size, mime, owner, state, created_at FROM media WHERE key=?", (key,)
            ).fetchone()
            return MediaObject(*row) if row else None

        return await self._read(q)

    async def mark_media_ready(self, key: str) -> None:
        def q(c: sqlite3.Connection) -> None:
            if c.execute("UPDATE media SET state='ready' WHERE key=?", (key,)).rowcount != 1:
                raise NotStored(f"media {key}")

        await self._write(q)

    async def stale_uploads(self, before: int, limit: int) -> list[MediaObject]:
        def q(c: sqlite3.Connection) -> list[MediaObject]:
            rows = c.execute(
                "SELECT key, sha256, size, mime, owner, state, created_at FROM media"
                " WHERE state='pending' AND created_at < ? ORDER BY created_at LIMIT ?",
                (before, limit),
            ).fetchall()
            return [MediaObject(*r) for r in rows]

        return await self._read(q)

    async def drop_media(self, key: str) -> bool:
        def q(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM media WHERE key=? AND state='pending'", (key,)).rowcount == 1

        return await self._write(q)
