"""Cassandra backend (cassandra-driver), for stores larger than one machine.

Layout (see ``SCHEMA``):

* messages live in partitions of ``(chat_id, bucket)`` with ``bucket = seq // 1000``,
  clustered by seq newest first, so a partition never grows past 1,000 messages and a
  history page reads one partition, or two at a bucket edge;
* each user's inbox lives in partitions of ``(user_id, bucket)`` clustered by position. Inbox
  rows carry a copy of the message, so ``sync`` reads the inbox alone; they expire after 30
  days (``inbox_ttl_s``) under TimeWindowCompactionStrategy, so expiry never leaves tombstones
  to read through;
* nothing on the send, sync or ack path deletes.

Numbering without gaps or repeats: a ``seq`` (or inbox position) *is* the row that holds it,
written with ``INSERT … IF NOT EXISTS`` (a lightweight transaction). A writer tries the number
after the highest it knows exists; if someone else took it, it tries the next. A number is thus
never handed out twice, and never tried before the one below it exists. The known heads
(``chat_heads``, ``user_state``) are written ``USING TIMESTAMP <value>``, so the largest value
always wins and a head never moves back.

Idempotent sends: the ``device_sent`` row for ``(device, client id)`` is written after the message and
its inbox rows. A retry that finds no such row looks for the message among the chat's most
recent ones before numbering a new one, and completes the fan-out for members whose inbox has
no entry for it yet.

All calls run on the driver's own I/O threads through ``execute_async``; results come back to
the event loop with ``call_soon_threadsafe``, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .base import (
    Appended,
    Chat,
    Device,
    InboxEntry,
    LoginCode,
    MediaObject,
    Member,
    Message,
    NewMessage,
    NotStored,
    Receipt,
    ReceiptKind,
    ReceiptNote,
    Role,
    StorageError,
    StorageUnavailable,
    StoreOps,
    User,
    media_from_json,
    media_to_json,
)
from .sqlite import new_id
from .state import SharedState

_row_types: dict[tuple[str, ...], Any] = {}


def _cached_row_factory(colnames: list[str], rows: list[Sequence[Any]]) -> list[Any]:
    """Rows as named tuples, like the driver's default factory, but with one tuple type per
    column list instead of a new type built for every result (a profile showed that costing
    about a tenth of the bridge's CPU)."""
    key = tuple(colnames)
    row_type = _row_types.get(key)
    if row_type is None:
        from collections import namedtuple

        from cassandra.query import _clean_column_name

        row_type = _row_types[key] = namedtuple("Row", [_clean_column_name(c) for c in colnames],
                                                 rename=True)
    return [row_type(*row) for row in rows]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3
BUCKET = 1000
RECENT_SCAN = 50
INBOX_TTL_S = 30 * 86_400
DAY_MS = 86_400_000
SENT_WINDOW_S = 86_400
UNKNOWN_OUTCOME_RETRIES = 4
SEND_LOCK_MS = 15_000  # how long the shared state remembers a send for fast retries
SWEEP_DAYS = 30  # how far back the upload sweep looks for unconfirmed uploads


class SchemaError(StorageError):
    """The keyspace is missing or older than this code: run ``pigeon db migrate``."""


def schema(keyspace: str, replication: str, inbox_ttl_s: int) -> list[str]:
    ks = keyspace
    msg_cols = ("client_id text, sender text, device text, ts bigint, kind text, body text, media text, "
                "event text, target text")
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}",
        f"CREATE TABLE IF NOT EXISTS {ks}.meta (key text PRIMARY KEY, value text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.users (user_id text PRIMARY KEY, phone text, name text, "
        "created_at bigint, last_seen bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.users_by_phone (phone text PRIMARY KEY, user_id text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.user_state (user_id text PRIMARY KEY, inbox_head bigint, acked bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.devices (device_id text PRIMARY KEY, user_id text, name text, "
        "platform text, created_at bigint, push_provider text, push_token text, acked bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.login_codes (phone text PRIMARY KEY, code_hash text, expires_at bigint, "
        "attempts int, locked_until bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.chats (chat_id text PRIMARY KEY, kind text, title text, "
        "created_by text, created_at bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.chat_heads (chat_id text PRIMARY KEY, last_seq bigint, last_ts bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.direct_chats (pair text PRIMARY KEY, chat_id text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.members (chat_id text, user_id text, role text, joined_at bigint, "
        "PRIMARY KEY (chat_id, user_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.user_chats (user_id text, chat_id text, PRIMARY KEY (user_id, chat_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.messages (chat_id text, bucket bigint, seq bigint, {msg_cols}, "
        "PRIMARY KEY ((chat_id, bucket), seq)) WITH CLUSTERING ORDER BY (seq DESC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.device_sent (device text, client_id text, chat_id text, seq bigint, "
        "PRIMARY KEY ((device, client_id)))",
        f"CREATE TABLE IF NOT EXISTS {ks}.inbox (user_id text, bucket bigint, pos bigint, chat_id text, seq bigint, "
        f"{msg_cols}, rkind text, ruser text, up_to bigint, PRIMARY KEY ((user_id, bucket), pos)) "
        f"WITH CLUSTERING ORDER BY (pos ASC) AND default_time_to_live = {inbox_ttl_s} "
        "AND compaction = {'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', "
        "'compaction_window_size': 1}",
        f"CREATE TABLE IF NOT EXISTS {ks}.inbox_refs (user_id text, chat_id text, seq bigint, pos bigint, "
        f"PRIMARY KEY ((user_id, chat_id), seq)) WITH default_time_to_live = {inbox_ttl_s}",
        f"CREATE TABLE IF NOT EXISTS {ks}.receipts (chat_id text, user_id text, delivered bigint, read bigint, "
        "PRIMARY KEY (chat_id, user_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.group_notices (chat_id text, user_id text, delivered bigint, read bigint, "
        "PRIMARY KEY (chat_id, user_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.media (key text PRIMARY KEY, sha256 text, size bigint, mime text, "
        "owner text, state text, created_at bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.chat_media (chat_id text, key text, PRIMARY KEY (chat_id, key))",
        f"CREATE TABLE IF NOT EXISTS {ks}.pending_uploads (day bigint, key text, created_at bigint, "
        "PRIMARY KEY (day, key))",
    ]


_MSG = "client_id, sender, device, ts, kind, body, media, event, target"
# Inserts that only ever create a row: an absent field is left unset rather than written as a
# null, which Cassandra stores as a tombstone per cell that every later read has to step over
# (a sync of 1,000 inbox rows read ~3,000 of them).
_NEW_ROWS = frozenset({"claim_seq", "claim_msg_pos", "claim_rcpt_pos"})
# Statements that are lightweight transactions (a Paxos round each), counted apart in ``ops``.
_CONDITIONAL = frozenset({"claim_phone", "claim_pair", "claim_seq", "claim_msg_pos", "claim_rcpt_pos", "put_media",
                          "media_ready", "drop_media"})


def _message(chat_id: str, seq: int, r: Sequence[Any]) -> Message:
    return Message(chat_id=chat_id, seq=seq, client_id=r[0], sender=r[1], device=r[2], ts=r[3], kind=r[4],
                   body=r[5], media=media_from_json(r[6]), event=r[7], target=r[8])


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    last: int = 0  # the last number claimed under this key while anyone was waiting


class Turns:
    """Claims of one counter (a chat's seq, a user's inbox position) take turns in this process.

    Each claim is a conditional insert (Paxos) of the next free number. Concurrent claims of the
    same counter would all try the same number, all but one lose and try the next, and under
    a hundred concurrent senders to one inbox that collapses into timeouts. Taking turns, each
    claim starts just past the last one taken here; only other processes can still collide.
    A key is forgotten as soon as nobody waits on it, so memory follows concurrency, not users.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Turn] = {}

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[_Turn]:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Turn()
        held.waiting += 1
        try:
            async with held.lock:
                yield held
        finally:
            held.waiting -= 1
            if held.waiting == 0:
                del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class CassandraStore:
    """The :class:`storage.base.Store` on a Cassandra cluster."""

    def __init__(self, hosts: Sequence[str], port: int, keyspace: str, *,
                 replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}",
                 inbox_ttl_s: int = INBOX_TTL_S, request_timeout_s: float = 5.0) -> None:
        if not keyspace.replace("_", "").isalnum():
            raise StorageError(f"keyspace name {keyspace!r} must be letters, digits and underscores")
        self._hosts, self._port, self.keyspace = list(hosts), port, keyspace
        self._replication, self._inbox_ttl = replication, inbox_ttl_s
        self._timeout = request_timeout_s
        self._cluster: Any = None
        self._session: Any = None
        self._ps: dict[str, Any] = {}
        self._state: SharedState | None = None
        self._turns = Turns()
        self._unset: Any = None  # the driver's UNSET_VALUE, once it is imported
        self.ops = StoreOps()

    def use_state(self, state: SharedState) -> None:
        """Take counter hints and the recent-sends window from the shared state (Redis)."""
        self._state = state

    async def _hints(self, keys: Sequence[str]) -> list[int]:
        if self._state is None:
            return [0] * len(keys)
        try:
            return await self._state.heads(keys)
        except StorageUnavailable as exc:
            log.warning("counter hints unavailable, reading heads from Cassandra: %s", exc)
            return [0] * len(keys)

    async def _raise_hint(self, key: str, value: int) -> None:
        if self._state is not None:
            try:
                await self._state.raise_head(key, value)
            except StorageUnavailable:
                pass

    # -- connection and schema -----------------------------------------------------------------
    def _connect(self) -> None:
        try:
            from cassandra.cluster import Cluster
            from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("the Cassandra backend needs cassandra-driver: pip install 'pigeon[cassandra]'") \
                from exc
        from cassandra import ConsistencyLevel
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, ExecutionProfile
        from cassandra.query import UNSET_VALUE

        self._unset = UNSET_VALUE

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()), request_timeout=self._timeout,
            consistency_level=ConsistencyLevel.LOCAL_QUORUM, serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
            row_factory=_cached_row_factory,
        )
        self._cluster = Cluster(self._hosts, port=self._port, protocol_version=5,
                                execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=5)
        self._session = self._cluster.connect()
        self._session.default_fetch_size = None

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cassandra: {exc}") from exc

    async def migrate(self) -> None:
        """Create or update the keyspace and tables (idempotent)."""
        if self._session is None:
            await self._blocking(self._connect)
        for stmt in schema(self.keyspace, self._replication, self._inbox_ttl):
            await self._blocking(self._session.execute, stmt)
        await self._blocking(self._send_ids_to_devices)
        await self._blocking(self._session.execute,
                             f"INSERT INTO {self.keyspace}.meta (key, value) VALUES ('schema', %s)",
                             (str(SCHEMA_VERSION),))
        log.info("cassandra keyspace %s at schema %d", self.keyspace, SCHEMA_VERSION)

    def _send_ids_to_devices(self) -> None:
        """Schema 2 kept send ids per user in ``sent``; request ids are unique per device, so from
        schema 3 they are kept per device. Carry the old rows over (each message names its device)
        and drop the old table."""
        from cassandra.query import SimpleStatement

        ks, session = self.keyspace, self._session
        if session.execute("SELECT table_name FROM system_schema.tables WHERE keyspace_name=%s AND table_name='sent'",
                           (ks,)).one() is None:
            return
        device_of = session.prepare(f"SELECT device FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq=?")
        put = session.prepare(f"INSERT INTO {ks}.device_sent (device, client_id, chat_id, seq) VALUES (?, ?, ?, ?)")
        moved = 0
        for client_id, chat_id, seq in session.execute(
                SimpleStatement(f"SELECT client_id, chat_id, seq FROM {ks}.sent", fetch_size=1000)):
            row = session.execute(device_of, (chat_id, seq // BUCKET, seq)).one()
            if row is not None:
                session.execute(put, (row[0], client_id, chat_id, seq))
                moved += 1
        session.execute(f"DROP TABLE {ks}.sent")
        log.info("moved %d send ids from %s.sent to %s.device_sent", moved, ks, ks)

    async def open(self) -> None:
        if self._session is None:
            await self._blocking(self._connect)

        def check() -> None:
            from cassandra import InvalidRequest

            try:
                row = self._session.execute(f"SELECT value FROM {self.keyspace}.meta WHERE key='schema'").one()
            except InvalidRequest as exc:
                raise SchemaError(f"keyspace {self.keyspace} has no Pigeon schema: run 'pigeon db migrate'") from exc
            if row is None or int(row[0]) < SCHEMA_VERSION:
                found = row[0] if row else "none"
                raise SchemaError(
                    f"keyspace {self.keyspace} is at schema {found}, this Pigeon needs {SCHEMA_VERSION}: "
                    "run 'pigeon db migrate'"
                )

        await self._blocking(check)
        await self._blocking(self._prepare)

    async def close(self) -> None:
        if self._cluster is not None:
            cluster, self._cluster, self._session = self._cluster, None, None
            await asyncio.to_thread(cluster.shutdown)

    def _prepare(self) -> None:
        ks = self.keyspace
        q = {
            "user_by_phone": f"SELECT user_id FROM {ks}.users_by_phone WHERE phone=?",
            "claim_phone": f"INSERT INTO {ks}.users_by_phone (phone, user_id) VALUES (?, ?) IF NOT EXISTS",
            "put_user": f"INSERT INTO {ks}.users (user_id, phone, name, created_at) VALUES (?, ?, '', ?)",
            "get_user": f"SELECT user_id, phone, name, created_at, last_seen FROM {ks}.users WHERE user_id=?",
            "set_name": f"UPDATE {ks}.users SET name=? WHERE user_id=?",
            "last_seen": f"UPDATE {ks}.users USING TIMESTAMP ? SET last_seen=? WHERE user_id=?",
            "put_device": f"INSERT INTO {ks}.devices (device_id, user_id, name, platform, created_at) "
                          "VALUES (?, ?, ?, ?, ?)",
            "get_device": f"SELECT device_id, user_id, name, platform, created_at, push_provider, push_token "
                          f"FROM {ks}.devices WHERE device_id=?",
            "set_push": f"UPDATE {ks}.devices SET push_provider=?, push_token=? WHERE device_id=?",
            "del_device": f"DELETE FROM {ks}.devices WHERE device_id=?",
            "put_code": f"INSERT INTO {ks}.login_codes (phone, code_hash, expires_at, attempts, locked_until) "
                        "VALUES (?, ?, ?, ?, ?) USING TTL ?",
            "get_code": f"SELECT phone, code_hash, expires_at, attempts, locked_until FROM {ks}.login_codes "
                        "WHERE phone=?",
            "del_code": f"DELETE FROM {ks}.login_codes WHERE phone=?",
            "get_chat": f"SELECT chat_id, kind, title, created_by, created_at FROM {ks}.chats WHERE chat_id=?",
            "put_chat": f"INSERT INTO {ks}.chats (chat_id, kind, title, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
            "claim_pair": f"INSERT INTO {ks}.direct_chats (pair, chat_id) VALUES (?, ?) IF NOT EXISTS",
            "get_pair": f"SELECT chat_id FROM {ks}.direct_chats WHERE pair=?",
            "members": f"SELECT user_id, role, joined_at FROM {ks}.members WHERE chat_id=?",
            "member": f"SELECT role FROM {ks}.members WHERE chat_id=? AND user_id=?",
            "add_member": f"INSERT INTO {ks}.members (chat_id, user_id, role, joined_at) VALUES (?, ?, ?, ?)",
            "del_member": f"DELETE FROM {ks}.members WHERE chat_id=? AND user_id=?",
            "add_user_chat": f"INSERT INTO {ks}.user_chats (user_id, chat_id) VALUES (?, ?)",
            "del_user_chat": f"DELETE FROM {ks}.user_chats WHERE user_id=? AND chat_id=?",
            "user_chats": f"SELECT chat_id FROM {ks}.user_chats WHERE user_id=?",
            "chat_head": f"SELECT last_seq, last_ts FROM {ks}.chat_heads WHERE chat_id=?",
            "set_chat_head": f"UPDATE {ks}.chat_heads USING TIMESTAMP ? SET last_seq=? WHERE chat_id=?",
            "set_chat_ts": f"UPDATE {ks}.chat_heads USING TIMESTAMP ? SET last_ts=? WHERE chat_id=?",
            "claim_seq": f"INSERT INTO {ks}.messages (chat_id, bucket, seq, {_MSG}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "recent": f"SELECT seq, {_MSG} FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq<=? LIMIT ?",
            "message": f"SELECT seq, {_MSG} FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq=?",
            "get_sent": f"SELECT chat_id, seq FROM {ks}.device_sent WHERE device=? AND client_id=?",
            "put_sent": f"INSERT INTO {ks}.device_sent (device, client_id, chat_id, seq) VALUES (?, ?, ?, ?)",
            "user_state": f"SELECT inbox_head, acked FROM {ks}.user_state WHERE user_id=?",
            "set_head": f"UPDATE {ks}.user_state USING TIMESTAMP ? SET inbox_head=? WHERE user_id=?",
            "set_acked": f"UPDATE {ks}.user_state USING TIMESTAMP ? SET acked=? WHERE user_id=?",
            "set_dev_ack": f"UPDATE {ks}.devices USING TIMESTAMP ? SET acked=? WHERE device_id=?",
            "claim_msg_pos": f"INSERT INTO {ks}.inbox (user_id, bucket, pos, chat_id, seq, {_MSG}) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "claim_rcpt_pos": f"INSERT INTO {ks}.inbox (user_id, bucket, pos, chat_id, rkind, ruser, up_to) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "read_inbox": f"SELECT pos, chat_id, seq, {_MSG}, rkind, ruser, up_to FROM {ks}.inbox "
                          "WHERE user_id=? AND bucket=? AND pos>? LIMIT ?",
            "put_ref": f"INSERT INTO {ks}.inbox_refs (user_id, chat_id, seq, pos) VALUES (?, ?, ?, ?)",
            "get_ref": f"SELECT pos FROM {ks}.inbox_refs WHERE user_id=? AND chat_id=? AND seq=?",
            "receipts": f"SELECT user_id, delivered, read FROM {ks}.receipts WHERE chat_id=?",
            "receipt": f"SELECT delivered, read FROM {ks}.receipts WHERE chat_id=? AND user_id=?",
            "set_delivered": f"UPDATE {ks}.receipts USING TIMESTAMP ? SET delivered=? WHERE chat_id=? AND user_id=?",
            "set_read": f"UPDATE {ks}.receipts USING TIMESTAMP ? SET read=? WHERE chat_id=? AND user_id=?",
            "notice": f"SELECT delivered, read FROM {ks}.group_notices WHERE chat_id=? AND user_id=?",
            "set_notice_delivered": f"UPDATE {ks}.group_notices USING TIMESTAMP ? SET delivered=? "
                                    "WHERE chat_id=? AND user_id=?",
            "set_notice_read": f"UPDATE {ks}.group_notices USING TIMESTAMP ? SET read=? "
                               "WHERE chat_id=? AND user_id=?",
            "put_media": f"INSERT INTO {ks}.media (key, sha256, size, mime, owner, state, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            "get_media": f"SELECT key, sha256, size, mime, owner, state, created_at FROM {ks}.media WHERE key=?",
            "media_ready": f"UPDATE {ks}.media SET state='ready' WHERE key=? IF EXISTS",
            "put_chat_media": f"INSERT INTO {ks}.chat_media (chat_id, key) VALUES (?, ?)",
            "chat_media": f"SELECT key FROM {ks}.chat_media WHERE chat_id=? AND key=?",
            "put_pending": f"INSERT INTO {ks}.pending_uploads (day, key, created_at) VALUES (?, ?, ?)",
            "pending_day": f"SELECT key, created_at FROM {ks}.pending_uploads WHERE day=?",
            "del_pending": f"DELETE FROM {ks}.pending_uploads WHERE day=? AND key=?",
            "drop_media": f"DELETE FROM {ks}.media WHERE key=? IF state='pending'",
        }
        q["message_serial"] = f"SELECT device, client_id, ts FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq=?"
        q["inbox_serial"] = (f"SELECT chat_id, seq, rkind, ruser, up_to FROM {ks}.inbox "
                             "WHERE user_id=? AND bucket=? AND pos=?")
        self._ps = {name: self._session.prepare(text) for name, text in q.items()}
        from cassandra import ConsistencyLevel

        for name in ("message_serial", "inbox_serial"):  # reads that see every settled conditional write
            self._ps[name].consistency_level = ConsistencyLevel.SERIAL

    async def _x(self, name: str, *params: Any) -> list[Any]:
        """Run a prepared statement without blocking the loop; driver errors become StorageUnavailable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        session = self._session
        if session is None:
            raise StorageUnavailable("cassandra store is not open")

        def ok(rows: Any) -> None:
            loop.call_soon_threadsafe(_settle, fut, list(rows or []), None)

        def fail(exc: BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, None, exc)

        if name in _NEW_ROWS:
            params = tuple(self._unset if p is None else p for p in params)
        self.ops.statements += 1
        if name in _CONDITIONAL:
            self.ops.conditional += 1
        try:
            session.execute_async(self._ps[name], params).add_callbacks(ok, fail)
        except Exception as exc:
            raise StorageUnavailable(f"cassandra: {exc}") from exc
        try:
            return await fut
        except StorageError:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cassandra {name}: {type(exc).__name__}: {exc}") from exc

    # -- accounts -------------------------------------------------------------------------------
    async def user_by_phone(self, phone: str) -> User | None:
        rows = await self._x("user_by_phone", phone)
        return await self.get_user(rows[0][0]) if rows else None

    async def create_user(self, phone: str, now: int) -> User:
        uid = new_id("u")
        rows = await self._x("claim_phone", phone, uid)
        if not rows[0][0]:  # someone has it: the existing user
            existing = await self.get_user(rows[0].user_id)
            if existing is not None:
                return existing
            uid = rows[0].user_id  # claimed but the user row was not written yet: finish it
        await self._x("put_user", uid, phone, now)
        return User(user_id=uid, phone=phone, name="", created_at=now, last_seen=0)

    async def get_user(self, user_id: str) -> User | None:
        rows = await self._x("get_user", user_id)
        if not rows:
            return None
        r = rows[0]
        return User(user_id=r[0], phone=r[1], name=r[2] or "", created_at=r[3], last_seen=r[4] or 0)

    async def set_user_name(self, user_id: str, name: str) -> User:
        if await self.get_user(user_id) is None:
            raise NotStored(f"user {user_id}")
        await self._x("set_name", name, user_id)
        user = await self.get_user(user_id)
        assert user is not None
        return user

    async def set_last_seen(self, user_id: str, when: int) -> None:
        await self._x("last_seen", when * 1000, when, user_id)

    async def add_device(self, user_id: str, name: str, platform: str, now: int) -> Device:
        did = new_id("d")
        await self._x("put_device", did, user_id, name, platform, now)
        return Device(device_id=did, user_id=user_id, name=name, platform=platform, created_at=now)

    async def get_device(self, device_id: str) -> Device | None:
        rows = await self._x("get_device", device_id)
        if not rows:
            return None
        r = rows[0]
        return Device(device_id=r[0], user_id=r[1], name=r[2], platform=r[3], created_at=r[4],
                      push_provider=r[5], push_token=r[6])

    async def set_push_target(self, device_id: str, provider: str, token: str) -> Device:
        if await self.get_device(device_id) is None:
            raise NotStored(f"device {device_id}")
        await self._x("set_push", provider, token, device_id)
        device = await self.get_device(device_id)
        assert device is not None
        return device

    async def remove_device(self, device_id: str) -> bool:
        # a plain delete, like the plain insert that wrote the row: mixing a conditional
        # (Paxos-timestamped) delete with it can leave the row standing
        if await self.get_device(device_id) is None:
            return False
        await self._x("del_device", device_id)
        return True

    async def put_login_code(self, code: LoginCode) -> None:
        # codes and lockouts outlive neither their expiry nor their lock by more than a day
        await self._x("put_code", code.phone, code.code_hash, code.expires_at, code.attempts, code.locked_until,
                      86_400 * 2)

    async def get_login_code(self, phone: str) -> LoginCode | None:
        rows = await self._x("get_code", phone)
        return LoginCode(*rows[0]) if rows else None

    async def delete_login_code(self, phone: str) -> None:
        await self._x("del_code", phone)

    # -- chats ----------------------------------------------------------------------------------
    async def _chat(self, chat_id: str) -> Chat | None:
        return (await self._chat_and_activity(chat_id))[0]

    async def _chat_and_activity(self, chat_id: str) -> tuple[Chat | None, int]:
        """The chat with its members, and when it was last active (one read of its head row)."""
        rows, members, head = await asyncio.gather(
            self._x("get_chat", chat_id), self._x("members", chat_id), self._x("chat_head", chat_id)
        )
        if not rows:
            return None, 0
        r = rows[0]
        ms = sorted((Member(user_id=m[0], role=m[1], joined_at=m[2]) for m in members),
                    key=lambda m: (m.joined_at, m.user_id))
        last_seq, last_ts = ((head[0][0] or 0), (head[0][1] or 0)) if head else (0, 0)
        chat = Chat(chat_id=r[0], kind=r[1], title=r[2] or "", created_by=r[3], created_at=r[4],
                    last_seq=last_seq, members=tuple(ms))
        return chat, last_ts

    async def get_chat(self, chat_id: str) -> Chat | None:
        return await self._chat(chat_id)

    async def _join(self, chat_id: str, user_id: str, role: Role, now: int) -> None:
        await asyncio.gather(self._x("add_member", chat_id, user_id, role, now),
                             self._x("add_user_chat", user_id, chat_id))

    async def direct_chat(self, a: str, b: str, now: int) -> Chat:
        pair = "|".join(sorted((a, b)))
        # Every message sent with "to" comes here: a plain read finds the chat of a pair that has
        # one, and only a first use pays for the conditional insert (a Paxos round).
        rows = await self._x("get_pair", pair)
        if not rows:
            cid = new_id("c")
            claim = await self._x("claim_pair", pair, cid)
            rows = [] if claim[0][0] else [(claim[0].chat_id,)]  # taken meanwhile: that one
        if rows:
            cid = rows[0][0]
            chat = await self._chat(cid)
            if chat is not None and len(chat.members) == 2:
                return chat
        # first use (or finishing a first use that was interrupted): write the chat and members
        await self._x("put_chat", cid, "direct", "", a, now)
        await asyncio.gather(self._join(cid, a, "member", now), self._join(cid, b, "member", now))
        await self._x("set_chat_ts", now * 1000, now, cid)
        chat = await self._chat(cid)
        assert chat is not None
        return chat

    async def create_group(self, creator: str, title: str, members: Sequence[str], now: int) -> Chat:
        cid = new_id("g")
        await self._x("put_chat", cid, "group", title, creator, now)
        await self._join(cid, creator, "admin", now)
        await asyncio.gather(*(self._join(cid, u, "member", now) for u in dict.fromkeys(members) if u != creator))
        await self._x("set_chat_ts", now * 1000, now, cid)
        chat = await self._chat(cid)
        assert chat is not None
        return chat

    async def user_chats(self, user_id: str) -> list[Chat]:
        ids = [r[0] for r in await self._x("user_chats", user_id)]
        found = await asyncio.gather(*(self._chat_and_activity(i) for i in ids))
        active = [(chat, ts) for chat, ts in found if chat is not None]
        return [chat for chat, _ts in sorted(active, key=lambda ct: (-ct[1], ct[0].chat_id))]

    async def add_member(self, chat_id: str, user_id: str, role: Role, now: int) -> bool:
        if not await self._x("get_chat", chat_id):
            raise NotStored(f"chat {chat_id}")
        if await self._x("member", chat_id, user_id):
            return False
        await self._join(chat_id, user_id, role, now)
        return True

    async def remove_member(self, chat_id: str, user_id: str) -> bool:
        if not await self._x("member", chat_id, user_id):
            return False
        await asyncio.gather(self._x("del_member", chat_id, user_id), self._x("del_user_chat", user_id, chat_id))
        return True

    async def share_chat(self, a: str, b: str) -> bool:
        mine = {r[0] for r in await self._x("user_chats", a)}
        if not mine:
            return False
        theirs = {r[0] for r in await self._x("user_chats", b)}
        return bool(mine & theirs)

    # -- numbering ------------------------------------------------------------------------------
    async def _chat_head(self, chat_id: str) -> int:
        rows = await self._x("chat_head", chat_id)
        return int(rows[0][0] or 0) if rows else 0

    async def _user_head(self, user_id: str) -> int:
        rows = await self._x("user_state", user_id)
        return int(rows[0][0] or 0) if rows else 0

    async def _claimed(self, claim: str, check: str, key: Sequence[Any], values: Sequence[Any],
                       mine: Sequence[Any]) -> bool:
        """Run one conditional insert; True if it is ours. When the outcome is unknown (a timeout
        under contention), read the row back at SERIAL consistency: a row holding ``mine`` is
        ours, another row is someone else's, no row means try again."""
        for _attempt in range(UNKNOWN_OUTCOME_RETRIES):
            try:
                rows = await self._x(claim, *key, *values)
                return bool(rows[0][0])
            except StorageUnavailable as exc:
                failure = exc
                log.warning("outcome of %s at %s unknown (%s); reading it back", claim, key, exc)
            try:
                found = await self._x(check, *key)
            except StorageUnavailable:
                continue
            if found:
                ours = tuple(found[0][: len(mine)]) == tuple(mine)
                log.warning("%s at %s was %s", claim, key, "ours" if ours else "taken by another writer")
                return ours
        raise failure

    async def _claim_seq(self, msg: NewMessage) -> int:
        hint = (await self._hints([f"c:{msg.chat_id}"]))[0]
        values = (msg.client_id, msg.sender, msg.device, msg.ts, msg.kind, msg.body, media_to_json(msg.media),
                  msg.event, msg.target)
        async with self._turns.turn(f"c:{msg.chat_id}") as turn:
            n = (max(hint, turn.last) or await self._chat_head(msg.chat_id)) + 1
            while not await self._claimed("claim_seq", "message_serial", (msg.chat_id, n // BUCKET, n), values,
                                          (msg.device, msg.client_id, msg.ts)):
                n += 1
            turn.last = n
        await asyncio.gather(self._x("set_chat_head", n, n, msg.chat_id),
                             self._x("set_chat_ts", msg.ts * 1000, msg.ts, msg.chat_id),
                             self._raise_hint(f"c:{msg.chat_id}", n))
        return n

    async def _claim_pos(self, user_id: str, stmt: str, *values: Any, hint: int = 0) -> int:
        # what identifies our entry: (chat, seq) for a message, (chat, None, kind, user, up_to) for a receipt
        mine = values[:2] if stmt == "claim_msg_pos" else (values[0], None, *values[1:4])
        async with self._turns.turn(f"u:{user_id}") as turn:
            n = (max(hint, turn.last) or await self._user_head(user_id)) + 1
            while not await self._claimed(stmt, "inbox_serial", (user_id, n // BUCKET, n), values, mine):
                n += 1
            turn.last = n
        await asyncio.gather(self._x("set_head", n, n, user_id), self._raise_hint(f"u:{user_id}", n))
        return n

    async def _fan_out(self, m: Message, recipients: Sequence[str], *, resumed: bool) -> dict[str, int]:
        """One inbox entry per recipient; when completing an interrupted send, skip any who
        already have one for this message."""
        users = list(dict.fromkeys(recipients))
        hints = await self._hints([f"u:{u}" for u in users])

        async def one(uid: str, hint: int) -> tuple[str, int]:
            if resumed and await self._x("get_ref", uid, m.chat_id, m.seq):
                return uid, -1
            pos = await self._claim_pos(uid, "claim_msg_pos", m.chat_id, m.seq, m.client_id, m.sender, m.device,
                                        m.ts, m.kind, m.body, media_to_json(m.media), m.event, m.target, hint=hint)
            await self._x("put_ref", uid, m.chat_id, m.seq, pos)
            return uid, pos

        done = await asyncio.gather(*(one(u, h) for u, h in zip(users, hints, strict=True)))
        return {u: p for u, p in done if p > 0}

    async def _recent_copy(self, msg: NewMessage) -> Message | None:
        """The message already stored for this (sender, client id) among the chat's latest ones."""
        head = await self._chat_head(msg.chat_id)
        if head == 0 or msg.client_id is None:
            return None
        rows = await self._x("recent", msg.chat_id, head // BUCKET, head, RECENT_SCAN)
        if head // BUCKET > 0 and len(rows) < RECENT_SCAN:
            rows += await self._x("recent", msg.chat_id, head // BUCKET - 1, head, RECENT_SCAN - len(rows))
        for r in rows:
            if r[1] == msg.client_id and r[3] == msg.device:
                return _message(msg.chat_id, r[0], r[1:])
        return None

    # -- messages -------------------------------------------------------------------------------
    async def append_message(self, msg: NewMessage, recipients: Sequence[str]) -> Appended:
        if msg.client_id is None or self._state is None:
            return await self._append(msg, recipients)
        # Two processes must never store the same send at once (a retry reaching another bridge,
        # a partition moving): the second waits for the first one's result.
        key = f"d:{msg.device}:send:{msg.client_id}"
        try:
            token = await self._state.acquire(key, SEND_LOCK_MS)
        except StorageUnavailable:
            token = ""  # without the shared state, fall back to the store's own checks
        if token is None:
            deadline = asyncio.get_running_loop().time() + SEND_LOCK_MS / 1000
            while asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                earlier = await self.find_sent(msg.device, msg.client_id)
                if earlier is not None:
                    return Appended(message=earlier, inbox={}, duplicate=True)
            raise StorageUnavailable("the same send is being stored by another process; retry")
        try:
            return await self._append(msg, recipients)
        finally:
            if token:
                try:
                    await self._state.release(key, token)
                except StorageUnavailable:
                    pass  # it expires by itself

    async def _append(self, msg: NewMessage, recipients: Sequence[str]) -> Appended:
        # three independent reads, side by side: an earlier send with this id, the chat, and a
        # copy of this very message an interrupted attempt left among the chat's latest
        earlier, chat, stored = await asyncio.gather(
            self.find_sent(msg.device, msg.client_id) if msg.client_id is not None else _nothing(),
            self._x("get_chat", msg.chat_id), self._recent_copy(msg))
        if earlier is not None:
            return Appended(message=earlier, inbox={}, duplicate=True)
        if not chat:
            raise NotStored(f"chat {msg.chat_id}")
        resumed = stored is not None
        if stored is None:
            seq = await self._claim_seq(msg)
            stored = Message(chat_id=msg.chat_id, seq=seq, client_id=msg.client_id, sender=msg.sender,
                             device=msg.device, ts=msg.ts, kind=msg.kind, body=msg.body, media=msg.media,
                             event=msg.event, target=msg.target)
        if msg.media is not None:
            await self._x("put_chat_media", msg.chat_id, msg.media.key)
        inbox = await self._fan_out(stored, recipients, resumed=resumed)
        if msg.client_id is not None:
            await asyncio.gather(self._x("put_sent", msg.device, msg.client_id, msg.chat_id, stored.seq),
                                 self._remember_sent(msg.device, msg.client_id, stored))
        if resumed:
            log.info("completed an interrupted send %s/%s at seq %d", msg.sender, msg.client_id, stored.seq)
        return Appended(message=stored, inbox=inbox, duplicate=False)

    async def _remember_sent(self, device: str, client_id: str, stored: Message) -> None:
        if self._state is not None:
            try:
                await self._state.remember_sent(device, client_id, f"{stored.chat_id}:{stored.seq}", SENT_WINDOW_S)
            except StorageUnavailable:
                pass  # the store's own record (put_sent) still recognises a retry

    async def _message_at(self, chat_id: str, seq: int) -> Message | None:
        rows = await self._x("message", chat_id, seq // BUCKET, seq)
        return _message(chat_id, seq, rows[0][1:]) if rows else None

    async def find_sent(self, device: str, client_id: str) -> Message | None:
        if self._state is not None:
            try:
                ref = await self._state.recall_sent(device, client_id)
            except StorageUnavailable:
                ref = None
            if ref:
                chat_id, _, seq = ref.rpartition(":")
                found = await self._message_at(chat_id, int(seq))
                if found is not None:
                    return found
        rows = await self._x("get_sent", device, client_id)
        if not rows:
            return None
        return await self._message_at(rows[0][0], rows[0][1])

    async def history(self, chat_id: str, before: int | None, limit: int) -> list[Message]:
        top = (before - 1) if before is not None else await self._chat_head(chat_id)
        out: list[Message] = []
        bucket = top // BUCKET
        while top > 0 and len(out) < limit and bucket >= 0:
            rows = await self._x("recent", chat_id, bucket, top, limit - len(out))
            out += [_message(chat_id, r[0], r[1:]) for r in rows]
            bucket -= 1
        return out

    async def message_carries_media(self, chat_id: str, key: str) -> bool:
        return bool(await self._x("chat_media", chat_id, key))

    async def append_receipts(self, notes: Sequence[tuple[str, ReceiptNote]]) -> list[int]:
        out: list[int] = []
        hints = dict(zip([u for u, _ in notes], await self._hints([f"u:{u}" for u, _ in notes]), strict=True))
        for uid, note in notes:  # in order: one user's receipts keep their order
            pos = await self._claim_pos(uid, "claim_rcpt_pos", note.chat_id, note.kind, note.user, note.up_to,
                                        hint=hints[uid])
            hints[uid] = pos
            out.append(pos)
        return out

    async def read_inbox(self, user_id: str, after: int, limit: int) -> list[InboxEntry]:
        head = await self._user_head(user_id)
        out: list[InboxEntry] = []
        cursor = after
        while len(out) < limit and cursor < head:
            bucket = (cursor + 1) // BUCKET
            rows = await self._x("read_inbox", user_id, bucket, cursor, limit - len(out))
            for r in rows:
                item: Message | ReceiptNote
                if r[2] is not None:
                    item = _message(r[1], r[2], r[3:12])
                else:
                    item = ReceiptNote(chat_id=r[1], user=r[13], kind=r[12], up_to=r[14])
                out.append(InboxEntry(user_id=user_id, pos=r[0], item=item))
            cursor = out[-1].pos if rows else (bucket + 1) * BUCKET - 1
        return out

    async def inbox_head(self, user_id: str) -> int:
        return await self._user_head(user_id)

    async def advance_device_ack(self, device_id: str, user_id: str, up_to: int) -> tuple[int, int]:
        rows = await self._x("user_state", user_id)
        head, prev = (int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else (0, 0)
        new = max(prev, min(up_to, head))
        await self._x("set_dev_ack", up_to, up_to, device_id)
        if new > prev:
            await self._x("set_acked", new, new, user_id)
        return prev, new

    async def get_receipts(self, chat_id: str) -> list[Receipt]:
        members, rows = await asyncio.gather(self._x("members", chat_id), self._x("receipts", chat_id))
        got = {r[0]: (r[1] or 0, r[2] or 0) for r in rows}
        ordered = sorted(members, key=lambda m: (m[2], m[0]))
        return [Receipt(chat_id=chat_id, user_id=m[0], delivered=got.get(m[0], (0, 0))[0],
                        read=got.get(m[0], (0, 0))[1]) for m in ordered]

    async def advance_receipt(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        rows = await self._x("receipt", chat_id, user_id)
        delivered, read = (rows[0][0] or 0, rows[0][1] or 0) if rows else (0, 0)
        current = read if kind == "read" else delivered
        if up_to <= current:
            return False
        if kind == "read":
            await asyncio.gather(self._x("set_read", up_to, up_to, chat_id, user_id),
                                 self._x("set_delivered", up_to, up_to, chat_id, user_id))
        else:
            await self._x("set_delivered", up_to, up_to, chat_id, user_id)
        return True

    async def advance_group_notice(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        rows = await self._x("notice", chat_id, user_id)
        current = (rows[0][1] if kind == "read" else rows[0][0]) or 0 if rows else 0
        if up_to <= current:
            return False
        await self._x("set_notice_read" if kind == "read" else "set_notice_delivered", up_to, up_to, chat_id,
                      user_id)
        return True

    # -- media ----------------------------------------------------------------------------------
    async def put_media(self, obj: MediaObject) -> MediaObject:
        rows = await self._x("put_media", obj.key, obj.sha256, obj.size, obj.mime, obj.owner, obj.state,
                             obj.created_at)
        if rows[0][0] and obj.state == "pending":
            await self._x("put_pending", obj.created_at // DAY_MS, obj.key, obj.created_at)
        got = await self.get_media(obj.key)
        assert got is not None
        return got

    async def get_media(self, key: str) -> MediaObject | None:
        rows = await self._x("get_media", key)
        return MediaObject(*rows[0]) if rows else None

    async def mark_media_ready(self, key: str) -> None:
        rows = await self._x("media_ready", key)
        if not rows[0][0]:
            raise NotStored(f"media {key}")
        obj = await self.get_media(key)
        if obj is not None:
            await self._x("del_pending", obj.created_at // DAY_MS, key)

    async def stale_uploads(self, before: int, limit: int) -> list[MediaObject]:
        out: list[MediaObject] = []
        last_day = before // DAY_MS
        for day in range(last_day - SWEEP_DAYS, last_day + 1):
            for key, created in await self._x("pending_day", day):
                if created >= before or len(out) >= limit:
                    continue
                obj = await self.get_media(key)
                if obj is None or obj.state != "pending":
                    await self._x("del_pending", day, key)  # confirmed or gone meanwhile
                    continue
                out.append(obj)
        return out

    async def drop_media(self, key: str) -> bool:
        obj = await self.get_media(key)
        if obj is None or obj.state != "pending":
            return False
        rows = await self._x("drop_media", key)
        await self._x("del_pending", obj.created_at // DAY_MS, key)
        return bool(rows[0][0])


def _settle(fut: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(rows or [])
