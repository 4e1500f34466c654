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

Numbering without gaps or repeats, and without a consensus round per message: a chat's
``seq`` and a user's inbox position are given out by one process at a time, the holder of the
key's partition lease, which keeps the head in memory and writes the numbered rows plainly
(``storage/cassandra_owner.py`` says how leases, epochs and fences keep a stale holder out).
A process that does not hold a key's partition asks the holder through the shared state.
Consensus (``IF NOT EXISTS``) is left for what is rare: leases, a phone's first login, a
pair's first chat, media records.

Idempotent sends: the ``device_sent`` row for ``(device, client id)`` is written twice. The
chat's writer writes where the send was numbered (``open_chat``, ``open_seq``) before the message
row, which goes out only once the record has landed (a record that fails fails the chat's write,
and its log makes it again): a stored message always has its record. Once every member's inbox
entry is written, the sender's bridge writes ``chat_id`` and ``seq`` (the send is complete)
without waiting for it before the ``sent`` reply. A repeat that finds a complete send is answered
at once; one that finds an open send gets that message and completes the fan-out for members
whose inbox has no entry for it yet (each inbox writer knows its latest entries' (chat, seq),
and the entries written since the message was stored are read back for the others).
One that finds no record, or one whose row is not stored, is a send never stored, or one whose
row the chat's writer is still writing: that writer finds it among the chat's latest ids.

Plain writes (unconditional ``INSERT``/``UPDATE``/``DELETE`` and unlogged batches of them) go
out on a native-protocol connection of the event loop's own (``storage/cql_wire.py``). Everything
else, and every write while that connection is down, runs on the driver's own I/O threads through
``execute_async``; results come back to the event loop with ``call_soon_threadsafe``. Either
way the loop never blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import random
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
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
    StorageError,
    StorageUnavailable,
    StoreOps,
    User,
    media_from_json,
    media_to_json,
)
from .cassandra_owner import (
    FULL_ROWS,
    RECENT_IDS,
    KeyLog,
    Leases,
    LogCache,
    NotOwner,
    WriteAgain,
    chat_id_near,
    partition_of,
)
from .cql_wire import ERROR_UNPREPARED, Binder, CqlError, CqlWire, Direct, WireUnsupported, decode_rows
from .ids import new_id
from .state import SharedState
from .stopping import stop_tasks
from .timed import TimedMap

_row_types: dict[tuple[str, ...], Any] = {}
_T = TypeVar("_T")


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
SCHEMA_VERSION = 8
BUCKET = 1000
RECENT_SCAN = 50
# A repeat of a send found open (its complete record missing) writes a member's inbox entry only
# if the member's inbox holds none for its message: the inbox writer remembers its latest 256
# entries, and beyond them the entries written since the message was stored are read back,
# newest first, this many at most (a page at a time), from the writes of that moment on (less
# the clocks' margin).
INBOX_SINCE_MAX = 5_000
INBOX_SINCE_FIRST = 50  # (pages grow fourfold from this to INBOX_SINCE_PAGE)
INBOX_SINCE_PAGE = 500
INBOX_SINCE_SKEW_US = 5_000_000
INBOX_TTL_S = 30 * 86_400
DAY_MS = 86_400_000
SENT_WINDOW_S = 86_400
UNKNOWN_OUTCOME_RETRIES = 4
# A send id found unused is taken as unused by the store's own check for this long: the chat's
# writer still recognises a repeat among the chat's latest ids.
UNSENT_TTL_S = 10.0
SENT_HERE = 20_000  # sends completed by this process, kept to answer their repeats without a read
FORWARD_TIMEOUT_S = 5.0
# A forwarded append that reached a process which had just given the partition up (nothing was
# numbered) is asked again after this pause, doubling up to the second figure, within its time.
MOVED_PAUSE_S = (0.05, 0.5)
DDL_TIMEOUT_S = 120.0
# A user's acknowledged position is written this long after it moved (one write covers every ack
# meanwhile; a position lost with a crash is only read back lower, see advance_device_ack).
ACK_FLUSH_S = 5.0
ACK_PACE_S = 0.05  # acknowledged positions are written in slices this far apart, not all at once
SWEEP_DAYS = 30  # how far back the upload sweep looks for unconfirmed uploads
WIRE_RETRY_S = 1.0  # a lost write connection is opened again after this long (the driver meanwhile)
# What is tried again in the background is tried first this long after it failed, the pause
# doubling up to the second figure (each at random within a quarter of it, so that what failed
# together spreads out), until it works or the store closes: a write nobody waits for (a send's
# records) that Cassandra did not confirm, and an opening of a key that stopped between its two
# fences (while this process holds the key's partition). Past RETRYING_BEHIND_MAX such writes
# being written again, one more that fails is given up (as is one Cassandra refused as wrong,
# see _worth_writing_again).
AGAIN_S = (0.2, 5.0)
# receipt positions known here (lower bounds), at most
RECEIPTS_KNOWN = 200_000
RETRYING_BEHIND_MAX = 10_000
# Reads asked on the loop's own connection too: the point lookups of the message path (a send
# id's record, one message), whose callers read their rows by position. Every other read goes
# through the driver.
WIRE_READS = frozenset({"get_sent", "message"})


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
        "platform text, created_at bigint, push_provider text, push_token text, acked bigint, proto int)",
        # a user's devices, for the device list and for waking them (schema 5), with the protocol
        # each reads user events in (schema 6: whether the user needs v1 copies is one read)
        f"CREATE TABLE IF NOT EXISTS {ks}.user_devices (user_id text, device_id text, proto int, "
        "PRIMARY KEY (user_id, device_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.login_codes (phone text PRIMARY KEY, code_hash text, expires_at bigint, "
        "attempts int, locked_until bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.chats (chat_id text PRIMARY KEY, kind text, title text, "
        "created_by text, created_at bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.chat_heads (chat_id text PRIMARY KEY, last_seq bigint, last_ts bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.direct_chats (pair text PRIMARY KEY, chat_id text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.members (chat_id text, user_id text, role text, joined_at bigint, "
        "PRIMARY KEY (chat_id, user_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.user_chats (user_id text, chat_id text, PRIMARY KEY (user_id, chat_id))",
        f"CREATE TABLE IF NOT EXISTS {ks}.messages (chat_id text, bucket bigint, seq bigint, epoch bigint, {msg_cols}, "
        "PRIMARY KEY ((chat_id, bucket), seq)) WITH CLUSTERING ORDER BY (seq DESC)",
        # chat_id, seq: the send is complete; open_chat, open_seq: numbered and stored, its fan-out
        # perhaps not done (schema 7)
        f"CREATE TABLE IF NOT EXISTS {ks}.device_sent (device text, client_id text, chat_id text, seq bigint, "
        "open_chat text, open_seq bigint, PRIMARY KEY ((device, client_id)))",
        f"CREATE TABLE IF NOT EXISTS {ks}.inbox (user_id text, bucket bigint, pos bigint, epoch bigint, chat_id text, "
        "seq bigint, "
        f"{msg_cols}, rkind text, ruser text, up_to bigint, PRIMARY KEY ((user_id, bucket), pos)) "
        f"WITH CLUSTERING ORDER BY (pos ASC) AND default_time_to_live = {inbox_ttl_s} "
        "AND compaction = {'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', "
        "'compaction_window_size': 1}",
        # partition leases (rows live while renewed: TTL), the epochs handed out, and the fence
        # each new holder puts before its first row of a key (storage/cassandra_owner.py)
        # (one Cassandra partition, ring 0, for all of them: a holder renews all its leases in one
        # conditional batch, one consensus round)
        f"CREATE TABLE IF NOT EXISTS {ks}.leases (ring int, part int, holder text, epoch bigint, "
        "PRIMARY KEY (ring, part))",
        f"CREATE TABLE IF NOT EXISTS {ks}.owner_epochs (part int PRIMARY KEY, epoch bigint)",
        f"CREATE TABLE IF NOT EXISTS {ks}.bridges (holder text PRIMARY KEY)",
        # (prev_epoch, prev_after: the fence before an opening's first one, whose `after` is -1;
        # schema 8)
        f"CREATE TABLE IF NOT EXISTS {ks}.fences (key text PRIMARY KEY, epoch bigint, after bigint, "
        "prev_epoch bigint, prev_after bigint)",
        # the users of each partition: the topics its holder's broker session subscribes to
        f"CREATE TABLE IF NOT EXISTS {ks}.partition_users (part int, user_id text, PRIMARY KEY (part, user_id))",
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
# Statements that are lightweight transactions (a Paxos round each), counted apart in ``ops``.
_CONDITIONAL = frozenset({"claim_phone", "claim_pair", "put_media", "media_ready", "drop_media", "lease_take",
                          "lease_renew", "lease_drop", "epoch_first", "epoch_next"})


def _answered(loop: asyncio.AbstractEventLoop, reply: _T) -> asyncio.Future[_T]:
    fut: asyncio.Future[_T] = loop.create_future()
    fut.set_result(reply)
    return fut


def _message(chat_id: str, seq: int, r: Sequence[Any]) -> Message:
    return Message(chat_id=chat_id, seq=seq, client_id=r[0], sender=r[1], device=r[2], ts=r[3], kind=r[4],
                   body=r[5], media=media_from_json(r[6]), event=r[7], target=r[8])


def _inbox_item(v: Sequence[Any]) -> Message | ReceiptNote:
    """What an inbox row holds, from its values (chat, seq, the message's fields, then the
    receipt's kind, user and position: a row holds a message or a receipt note)."""
    if v[1] is not None:
        return _message(v[0], v[1], v[2:11])
    return ReceiptNote(chat_id=v[0], user=v[12], kind=v[11], up_to=v[13])


def _inbox_values(m: Message) -> tuple[Any, ...]:
    """A message as an inbox row holds it (what :func:`_inbox_item` reads): its values, plain
    ones only. The store keeps these tuples in memory by the hundred thousand (inbox entries,
    completed sends) rather than the objects: the interpreter's cyclic garbage collector stops
    tracking such a tuple the first time it looks at it, where it walks every dataclass instance
    at each collection of that instance's generation. Kept as objects, one middle-generation
    collection of a bridge under load walked some 90,000 of them and held the event loop for
    100 ms and more (BENCHMARKS.md, 2026-12-06)."""
    return (m.chat_id, m.seq, m.client_id, m.sender, m.device, m.ts, m.kind, m.body, media_to_json(m.media),
            m.event, m.target, None, None, None)


class CassandraStore:
    """The :class:`storage.base.Store` on a Cassandra cluster."""

    def __init__(self, hosts: Sequence[str], port: int, keyspace: str, *,
                 replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}",
                 inbox_ttl_s: int = INBOX_TTL_S, request_timeout_s: float = 5.0,
                 direct_writes: bool = True, credentials: tuple[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not keyspace.replace("_", "").isalnum():
            raise StorageError(f"keyspace name {keyspace!r} must be letters, digits and underscores")
        self._hosts, self._port, self.keyspace = list(hosts), port, keyspace
        self._credentials = credentials  # (user, password) for a cluster that asks for them
        self._tls = ssl_context  # TLS to the nodes (cassandras://), on every connection
        self._replication, self._inbox_ttl = replication, inbox_ttl_s
        self._timeout = request_timeout_s
        self._cluster: Any = None
        self._session: Any = None
        self._ps: dict[str, Any] = {}
        self._binders: dict[str, Binder] = {}  # the prepared statements' values serialisers, by name
        self._state: SharedState | None = None
        self._holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._leases: Leases | None = None
        self._logs = LogCache()
        self._opening: dict[str, asyncio.Future[KeyLog]] = {}
        # appends to keys being opened, in the order they came, and the task opening each key
        # for them (_append_soon): they are numbered before any append that comes after them
        self._waiting: dict[str, list[tuple[tuple[Any, ...], Hashable | None, asyncio.Future[tuple[int, bool]]]]] = {}
        self._openers: dict[str, asyncio.Task[None]] = {}
        self._notices = GroupNotices()  # the last group notice numbered into each inbox held here
        # keys whose opening stopped between its two fences, opened again (_finish_opening)
        self._finishing: dict[str, asyncio.Task[None]] = {}
        self._serving: asyncio.Task[None] | None = None
        # Bounded caches of facts that never change once true, or only grow: chats that exist,
        # the direct chat of a pair, inbox entries this process wrote, each user's acknowledged
        # position and each member's receipt positions (lower bounds), send ids not yet used.
        self._known_chats: LRUCache[str, bool] = LRUCache(100_000)
        self._pairs: LRUCache[str, Chat] = LRUCache(100_000)
        self._directs: LRUCache[str, Chat] = LRUCache(100_000)
        # (user, position) -> the entry's row values (_inbox_values)
        self._entries: LRUCache[tuple[str, int], tuple[Any, ...]] = LRUCache(200_000)
        self._acked: LRUCache[str, int] = LRUCache(100_000)
        self._receipts: LRUCache[tuple[str, str], tuple[int, int]] = LRUCache(RECEIPTS_KNOWN)
        self._unsent: TimedMap[tuple[str, str], bool] = TimedMap(100_000, UNSENT_TTL_S)
        # sends completed here (their record may still be on its way), and open sends found by
        # find_sent for append_message to complete
        self._sent_here: LRUCache[tuple[str, str], tuple[Any, ...]] = LRUCache(SENT_HERE)  # _inbox_values
        self._open_sends: TimedMap[tuple[str, str], Message] = TimedMap(10_000, UNSENT_TTL_S)
        # sends whose fan-out failed here -> the members whose entry was written: their retry
        # writes the others' only (an inbox writer remembers its latest 256 entries, not all)
        self._fanned: LRUCache[tuple[str, str], frozenset[str]] = LRUCache(10_000)
        self._behind = 0  # writes nobody waits for, not yet answered
        self._behind_idle: list[asyncio.Future[None]] = []
        self._retrying_behind = 0  # of them, those that failed and are being written again
        self._closing = asyncio.Event()  # set by close(): what is written behind is tried once more, no longer
        self._unset: Any = None  # the driver's UNSET_VALUE, once it is imported
        self.ops = StoreOps()
        self._results: _Results | None = None
        self._per_chat = _PartitionWrites(self)
        # user -> (acknowledged position not yet written, when it first was), oldest first
        self._acks_due: dict[str, tuple[int, float]] = {}
        # where acks whose receipts are still moving moved their users' positions from: a
        # position is written no further than the lowest of them, and the rest is held (user ->
        # position) until they are done (device_ack_done)
        self._acks_moving = MovingAcks()
        self._acks_held: dict[str, int] = {}
        self._ack_writer: asyncio.Task[None] | None = None
        # plain writes on the event loop's own connection (storage/cql_wire.py), when it is up
        self._direct_writes = direct_writes
        self._closed = False
        self._wire: CqlWire | None = None
        self._wire_ok: dict[str, tuple[bytes, int]] = {}  # statement -> (prepared id, consistency)
        self._wire_reads: dict[str, tuple[bytes, int, list[Any]]] = {}  # read -> (id, consistency, column types)
        self._wire_retry: asyncio.TimerHandle | None = None
        self._wire_opening: asyncio.Task[None] | None = None

    # -- partitions, for the MQTT edge: a bridge receives the device traffic of the users of the
    # partitions it holds (see bridge/mqtt_ingest.py) --------------------------------------------
    @property
    def partition_scope(self) -> str:
        return self.keyspace

    def queue_of(self, part: int) -> str:
        """Where requests for a partition of this deployment wait in the shared state."""
        return f"{self.keyspace}:p{part}"

    def held_partitions(self) -> list[int]:
        return self._leases.held() if self._leases is not None else []

    def leased_here(self, part: int) -> bool:
        return self._leases is not None and self._leases.leased(part)

    async def partitions_changed(self) -> None:
        """Return when the set of held partitions may have changed."""
        if self._leases is None:
            await asyncio.Event().wait()
            return
        self._leases.changed.clear()
        await self._leases.changed.wait()

    @staticmethod
    def partition_of_user(user_id: str) -> int:
        return partition_of(f"u:{user_id}")

    async def partition_users(self, part: int) -> list[str]:
        return [r[0] for r in await self._x("partition_users", part)]

    @property
    def shared_state(self) -> SharedState | None:
        """The shared state this store reaches other bridge processes through, if any."""
        return self._state

    def use_state(self, state: SharedState) -> None:
        """Reach the other bridge processes through the shared state (Redis): a key whose
        partition another process holds is numbered there, and this process numbers the keys of
        its own partitions for the others."""
        self._state = state
        self._serve_others()

    def _serve_others(self) -> None:
        """Once open and given a shared state that carries requests, number for the others."""
        serve = getattr(self._state, "serve", None)
        if serve is not None and self._serving is None and self._leases is not None:
            self._state.handle("number", self._serve_forwarded)  # type: ignore[union-attr]
            leases = self._leases
            self._serving = asyncio.create_task(serve(lambda: [self.queue_of(p) for p in leases.held()]),
                                                name="requests-from-other-bridges")

    # -- connection and schema -----------------------------------------------------------------
    def _connect(self) -> None:
        try:
            from cassandra.cluster import Cluster
            from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("the Cassandra backend needs cassandra-driver: pip install 'pigeon[cassandra]'") \
                from exc
        from cassandra import AuthenticationFailed, ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, ExecutionProfile, NoHostAvailable
        from cassandra.query import UNSET_VALUE

        self._unset = UNSET_VALUE

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()), request_timeout=self._timeout,
            consistency_level=ConsistencyLevel.LOCAL_QUORUM, serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
            row_factory=_cached_row_factory,
        )
        # Native protocol 4: everything used here, without version 5's framing of every frame
        # into checksummed segments (about 3 % of the bridge's CPU in a profile).
        auth = PlainTextAuthProvider(*self._credentials) if self._credentials is not None else None
        self._cluster = Cluster(self._hosts, port=self._port, protocol_version=4, auth_provider=auth,
                                ssl_context=self._tls, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                                connect_timeout=5)
        try:
            self._session = self._cluster.connect()
        except NoHostAvailable as exc:
            cluster, self._cluster = self._cluster, None
            cluster.shutdown()
            errors = list(exc.errors.values())
            if errors and all(isinstance(e, AuthenticationFailed) for e in errors):  # not down: it said no
                who = f"user {self._credentials[0]!r}" if self._credentials else "no credentials"
                raise StorageError(f"cassandra refused the login ({who}): give the user and password it "
                                   "knows in the URL, cassandra://USER:PASSWORD@HOST/KEYSPACE") from exc
            # (the driver hands an SSL error on as an OSError that only quotes it)
            if errors and all(isinstance(e, ssl.SSLError) or (isinstance(e, OSError) and "[SSL" in str(e))
                              for e in errors):
                raise StorageError(f"cassandra: TLS to the nodes failed ({errors[0]}); check that they take TLS, "
                                   "that their certificates name their addresses, and with a private CA give its "
                                   "certificate as ?ca=PATH in the cassandras:// URL") from exc
            raise
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
            # a schema change waits for every node to agree on it: far longer than a request may
            await self._blocking(functools.partial(self._session.execute, stmt, timeout=DDL_TIMEOUT_S))
        await self._blocking(self._send_ids_to_devices)
        await self._blocking(self._add_epochs)
        await self._blocking(self._add_protos)
        await self._blocking(self._add_open_sends)
        await self._blocking(self._add_fence_prev)
        await self._blocking(self._index_devices)
        await self._blocking(self._session.execute,
                             f"INSERT INTO {self.keyspace}.meta (key, value) VALUES ('schema', %s)",
                             (str(SCHEMA_VERSION),))
        log.info("cassandra keyspace %s at schema %d", self.keyspace, SCHEMA_VERSION)

    def _add_epochs(self) -> None:
        """Schema 4: rows carry the epoch of the partition lease they were written under. Rows
        from before have none, and count as older than any fence (every one of them is at or
        below the first fence, which is put at the head as found)."""
        ks, session = self.keyspace, self._session
        for table in ("messages", "inbox"):
            found = session.execute("SELECT column_name FROM system_schema.columns WHERE keyspace_name=%s "
                                    "AND table_name=%s AND column_name='epoch'", (ks, table)).one()
            if found is None:
                session.execute(f"ALTER TABLE {ks}.{table} ADD epoch bigint")
                if table == "inbox":  # coming from schema 3: every user joins their partition's list
                    put = session.prepare(f"INSERT INTO {ks}.partition_users (part, user_id) VALUES (?, ?)")
                    from cassandra.query import SimpleStatement

                    for (uid,) in session.execute(SimpleStatement(f"SELECT user_id FROM {ks}.users",
                                                                  fetch_size=1000)):
                        session.execute(put, (partition_of(f"u:{uid}"), uid))

    def _add_protos(self) -> None:
        """Schema 6: devices (and their rows in ``user_devices``) say which protocol they read
        user events in; rows from before have none, and read v1."""
        ks, session = self.keyspace, self._session
        for table in ("devices", "user_devices"):
            found = session.execute("SELECT column_name FROM system_schema.columns WHERE keyspace_name=%s "
                                    "AND table_name=%s AND column_name='proto'", (ks, table)).one()
            if found is None:
                session.execute(f"ALTER TABLE {ks}.{table} ADD proto int", timeout=DDL_TIMEOUT_S)

    def _add_open_sends(self) -> None:
        """Schema 7: ``device_sent`` also records where a send was numbered before its fan-out is
        done. Rows from before have only ``chat_id`` and ``seq``: complete sends."""
        ks, session = self.keyspace, self._session
        have = {r[0] for r in session.execute("SELECT column_name FROM system_schema.columns WHERE "
                                              "keyspace_name=%s AND table_name='device_sent'", (ks,))}
        for column, kind in (("open_chat", "text"), ("open_seq", "bigint")):
            if column not in have:
                session.execute(f"ALTER TABLE {ks}.device_sent ADD {column} {kind}", timeout=DDL_TIMEOUT_S)

    def _add_fence_prev(self) -> None:
        """Schema 8: the first fence of a key's opening keeps the fence it replaces, so that an
        opening cut short between its two fences is finished from where the key stood. Fences
        from before have none (an opening cut short then is finished as for a key never fenced)."""
        ks, session = self.keyspace, self._session
        have = {r[0] for r in session.execute("SELECT column_name FROM system_schema.columns WHERE "
                                              "keyspace_name=%s AND table_name='fences'", (ks,))}
        for column in ("prev_epoch", "prev_after"):
            if column not in have:
                session.execute(f"ALTER TABLE {ks}.fences ADD {column} bigint", timeout=DDL_TIMEOUT_S)

    def _index_devices(self) -> None:
        """Schema 5: each user's devices are listed in ``user_devices``; every device in
        ``devices`` is (re)added to it at each migration (idempotent: a second run writes the
        same rows), so ``pigeon db migrate`` also repairs a listing that lost a row (a device
        linked by a server from before ``add_device`` wrote both rows in one batch)."""
        ks, session = self.keyspace, self._session
        from cassandra.query import SimpleStatement

        put = session.prepare(f"INSERT INTO {ks}.user_devices (user_id, device_id, proto) VALUES (?, ?, ?)")
        for device_id, user_id, proto in session.execute(
                SimpleStatement(f"SELECT device_id, user_id, proto FROM {ks}.devices", fetch_size=1000)):
            if user_id is not None:
                session.execute(put, (user_id, device_id, proto))

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
        self._closed = False
        self._closing = asyncio.Event()  # (of this open's event loop)
        if self._direct_writes and self._wire is None:
            await self._open_wire()
        if self._leases is None:
            self._leases = Leases(self._x, self._holder, on_lost=self._lost, quiesce=self._quiesce,
                                  run_together=self._run_together)
            await self._leases.start()
            self._serve_others()

    async def _behind_settled(self) -> None:
        if self._behind:
            try:  # (a write on the loop's own connection, then perhaps once more the ordinary way)
                await asyncio.wait_for(self.settled(), 2 * self._timeout)
            except TimeoutError:
                log.warning("closing with %d writes unanswered", self._behind)

    async def close(self) -> None:
        self._closing.set()
        if self._finishing or self._openers:
            await asyncio.gather(*self._finishing.values(), *self._openers.values(), return_exceptions=True)
        await self._behind_settled()
        if self._ack_writer is not None:
            await stop_tasks([self._ack_writer], "closing the store")
            self._ack_writer = None
        if self._acks_due and self._session is not None:
            await self._write_acks()
        if self._serving is not None:  # (a blocking pop on Redis: its cancellation can be lost)
            await stop_tasks([self._serving], "closing the store")
            self._serving = None
        if self._leases is not None:
            await self._leases.stop()
            self._leases = None
        self._closed = True  # no reopening of the write connection from here on
        if self._wire_retry is not None:
            self._wire_retry.cancel()
        if self._wire_opening is not None:
            await stop_tasks([self._wire_opening], "closing the store")
        await self._behind_settled()  # (sends that completed meanwhile)
        if self._wire is not None:
            wire, self._wire = self._wire, None
            wire.close()
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
            "put_device": f"INSERT INTO {ks}.devices (device_id, user_id, name, platform, created_at, proto) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
            "get_device": f"SELECT device_id, user_id, name, platform, created_at, push_provider, push_token, proto "
                          f"FROM {ks}.devices WHERE device_id=?",
            "set_push": f"UPDATE {ks}.devices SET push_provider=?, push_token=? WHERE device_id=?",
            "clear_push": f"UPDATE {ks}.devices SET push_provider=null, push_token=null WHERE device_id=?",
            "del_device": f"DELETE FROM {ks}.devices WHERE device_id=?",
            "put_user_device": f"INSERT INTO {ks}.user_devices (user_id, device_id, proto) VALUES (?, ?, ?)",
            "del_user_device": f"DELETE FROM {ks}.user_devices WHERE user_id=? AND device_id=?",
            "user_devices": f"SELECT device_id, proto FROM {ks}.user_devices WHERE user_id=?",
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
            "put_msg": f"INSERT INTO {ks}.messages (chat_id, bucket, seq, epoch, {_MSG}) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "chat_tail": f"SELECT seq, epoch, device, client_id, ts FROM {ks}.messages WHERE chat_id=? AND bucket=? "
                         "LIMIT ?",
            "chat_tail_below": f"SELECT seq, epoch, device, client_id, ts FROM {ks}.messages WHERE chat_id=? "
                               "AND bucket=? AND seq<? LIMIT ?",
            "recent": f"SELECT seq, {_MSG}, epoch FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq<=? LIMIT ?",
            "message": f"SELECT seq, {_MSG}, epoch FROM {ks}.messages WHERE chat_id=? AND bucket=? AND seq=?",
            "get_sent": f"SELECT chat_id, seq, open_chat, open_seq FROM {ks}.device_sent WHERE device=? "
                        "AND client_id=?",
            "put_sent": f"INSERT INTO {ks}.device_sent (device, client_id, chat_id, seq) VALUES (?, ?, ?, ?)",
            # timestamped when numbered, so that a late retry never hides a newer holder's record
            "open_sent": f"INSERT INTO {ks}.device_sent (device, client_id, open_chat, open_seq) VALUES (?, ?, ?, ?) "
                         "USING TIMESTAMP ?",
            "user_state": f"SELECT inbox_head, acked FROM {ks}.user_state WHERE user_id=?",
            "set_head": f"UPDATE {ks}.user_state USING TIMESTAMP ? SET inbox_head=? WHERE user_id=?",
            "set_acked": f"UPDATE {ks}.user_state USING TIMESTAMP ? SET acked=? WHERE user_id=?",
            "set_dev_ack": f"UPDATE {ks}.devices USING TIMESTAMP ? SET acked=? WHERE device_id=?",
            "put_inbox": f"INSERT INTO {ks}.inbox (user_id, bucket, pos, epoch, chat_id, seq, {_MSG}, rkind, ruser, "
                         "up_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "inbox_tail": f"SELECT pos, epoch, chat_id, seq, rkind, ruser, up_to FROM {ks}.inbox WHERE user_id=? "
                          "AND bucket=? ORDER BY pos DESC LIMIT ?",
            "inbox_tail_below": f"SELECT pos, epoch, chat_id, seq, rkind, ruser, up_to FROM {ks}.inbox "
                                "WHERE user_id=? AND bucket=? AND pos<? ORDER BY pos DESC LIMIT ?",
            # newest first, with when each was written: a repeat's fan-out reads back what came
            # since its message was stored
            "inbox_since": f"SELECT pos, epoch, chat_id, seq, WRITETIME(epoch) FROM {ks}.inbox WHERE user_id=? "
                           "AND bucket=? AND pos<=? ORDER BY pos DESC LIMIT ?",
            "read_inbox": f"SELECT pos, chat_id, seq, {_MSG}, rkind, ruser, up_to, epoch FROM {ks}.inbox "
                          "WHERE user_id=? AND bucket=? AND pos>? LIMIT ?",
            "fence_get": f"SELECT epoch, after, prev_epoch, prev_after FROM {ks}.fences WHERE key=?",
            # fences compete only with fences: their timestamp is 2 × epoch (+1 for the second of the
            # two a new holder writes), so the newest wins
            "fence_put": f"INSERT INTO {ks}.fences (key, epoch, after) VALUES (?, ?, ?) USING TIMESTAMP ?",
            # the first of the two, with the fence the key stood at before it
            "fence_open": f"INSERT INTO {ks}.fences (key, epoch, after, prev_epoch, prev_after) "
                          "VALUES (?, ?, -1, ?, ?) USING TIMESTAMP ?",
            "leases": f"SELECT part, holder, epoch FROM {ks}.leases WHERE ring=0",
            "put_partition_user": f"INSERT INTO {ks}.partition_users (part, user_id) VALUES (?, ?)",
            "partition_users": f"SELECT user_id FROM {ks}.partition_users WHERE part=?",
            "alive": f"INSERT INTO {ks}.bridges (holder) VALUES (?) USING TTL ?",
            "bridges": f"SELECT holder FROM {ks}.bridges",
            "gone": f"DELETE FROM {ks}.bridges WHERE holder=?",
            "lease_take": f"INSERT INTO {ks}.leases (ring, part, holder, epoch) VALUES (0, ?, ?, ?) IF NOT EXISTS "
                          "USING TTL ?",
            "lease_renew": f"UPDATE {ks}.leases USING TTL ? SET holder=?, epoch=? WHERE ring=0 AND part=? "
                           "IF holder=? AND epoch=?",
            "lease_drop": f"DELETE FROM {ks}.leases WHERE ring=0 AND part=? IF holder=? AND epoch=?",
            "epoch_get": f"SELECT epoch FROM {ks}.owner_epochs WHERE part=?",
            "epoch_first": f"INSERT INTO {ks}.owner_epochs (part, epoch) VALUES (?, ?) IF NOT EXISTS",
            "epoch_next": f"UPDATE {ks}.owner_epochs SET epoch=? WHERE part=? IF epoch=?",
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
        self._ps = {name: self._session.prepare(text) for name, text in q.items()}
        self._ps["put_msg_full"] = self._ps["put_msg"]
        self._ps["put_inbox_full"] = self._ps["put_inbox"]
        self._binders = {name: Binder(ps, self._unset) for name, ps in self._ps.items()}
        from cassandra import ConsistencyLevel

        for name in ("leases", "epoch_get"):  # reads that see every settled conditional write
            self._ps[name].consistency_level = ConsistencyLevel.SERIAL
        # what may go out on the loop's own connection: plain writes, whose answer is only "done"
        self._wire_ok = {
            name: (ps.query_id, ps.consistency_level if ps.consistency_level is not None
                   else ConsistencyLevel.LOCAL_QUORUM)
            for name, ps in self._ps.items()
            if ps.query_string.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
            and " IF " not in ps.query_string.upper() and name not in _CONDITIONAL
        }
        # reads on that connection: (prepared id, consistency, the result's column types)
        self._wire_reads = {
            name: (ps.query_id, ps.consistency_level if ps.consistency_level is not None
                   else ConsistencyLevel.LOCAL_QUORUM, [c[3] for c in ps.result_metadata])
            for name, ps in self._ps.items() if name in WIRE_READS and ps.result_metadata
        }

    # -- the event loop's own write connection ---------------------------------------------------
    async def _open_wire(self) -> None:
        """Open the write connection to the first host the driver sees up; if none answers, the
        driver carries the writes and another try follows a second later."""
        hosts = [h.endpoint for h in self._cluster.metadata.all_hosts() if h.is_up is not False]
        for endpoint in hosts:
            try:
                self._wire = await CqlWire.open(endpoint.address, endpoint.port, self._unset,
                                                self._cluster.timestamp_generator, self._wire_lost,
                                                credentials=self._credentials, tls=self._tls)
                log.info("cassandra: plain writes go straight to %s", self._wire.host)
                return
            except WireUnsupported as exc:
                log.warning("cassandra: writes stay on the driver (%s)", exc)
                self._direct_writes = False
                return
            except CqlError as exc:  # refused where the driver was let in: this cluster wants what the driver does
                log.warning("cassandra: writes stay on the driver (the write connection was refused: %s)", exc)
                self._direct_writes = False
                return
            except (TimeoutError, OSError) as exc:
                log.warning("cassandra: no write connection to %s:%s (%s)", endpoint.address, endpoint.port, exc)
        self._wire_later()

    def _wire_lost(self, wire: CqlWire) -> None:
        if self._wire is wire:
            self._wire = None
            log.warning("cassandra: write connection to %s lost; the driver carries writes until it is back",
                        wire.host)
            self._wire_later()

    def _wire_later(self) -> None:
        if not self._direct_writes or self._closed or self._cluster is None:
            return
        loop = asyncio.get_running_loop()

        def reopen() -> None:
            self._wire_retry = None
            if self._direct_writes and not self._closed and self._wire is None and self._cluster is not None:
                self._wire_opening = loop.create_task(self._open_wire())

        self._wire_retry = loop.call_later(WIRE_RETRY_S, reopen)

    def _usable_wire(self) -> CqlWire | None:
        """The loop's own connection, when it is open, has a free stream and is this loop's."""
        wire = self._wire
        if wire is None or not wire.usable or wire._loop is not asyncio.get_running_loop():
            return None
        return wire

    def _wire_for(self, names: Sequence[str]) -> CqlWire | None:
        wire = self._usable_wire()
        ok = self._wire_ok
        return wire if wire is not None and all(n in ok for n in names) else None

    async def _on_wire(self, name: str, fut: asyncio.Future[_T]) -> _T | None:
        """Wait for a statement sent on the loop's own connection. None if the server had
        forgotten the prepared statement (a restart), and for a read whose connection was lost
        before its answer: the caller then runs it through the driver, which prepares it again."""
        results = self._results_for(fut.get_loop())
        results.watch(fut, name)
        try:
            return await fut
        except (StorageError, CqlError, ConnectionError) as exc:
            failure = _wire_failure(name, exc, read=name in self._wire_reads)
            if failure is None:
                return None
            if failure is exc:
                raise
            raise failure from exc
        finally:
            results.forget(fut)

    async def _read_on_wire(self, name: str, params: Sequence[Any]) -> list[Any] | None:
        """A read of WIRE_READS on the loop's own connection: its rows (as tuples), or None when
        the driver must ask instead (no connection, a forgotten prepared id, a lost connection)."""
        wire = self._usable_wire()
        if wire is None:
            return None
        query_id, consistency, types = self._wire_reads[name]
        try:
            values = self._binders[name](params)
        except Exception as exc:
            raise StorageUnavailable(f"cassandra {name}: {exc}") from exc
        self._count(name)
        body = await self._on_wire(name, wire.query(query_id, values, consistency))
        if body is None:
            return None
        try:
            return decode_rows(body, types)
        except WireUnsupported as exc:  # rows in a form this connection does not read: the driver's way
            log.warning("cassandra %s: %s; asking through the driver", name, exc)
            return None

    def _results_for(self, loop: asyncio.AbstractEventLoop) -> _Results:
        results = self._results
        if results is None or results.loop is not loop:
            results = self._results = _Results(loop, self._timeout)
        return results

    def _count(self, name: str) -> None:
        self.ops.statements += 1
        self.ops.by_name[name] = self.ops.by_name.get(name, 0) + 1
        if name in _CONDITIONAL:
            self.ops.conditional += 1

    async def _batch(self, label: str, items: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Plain writes as one unlogged batch (one request; callers keep each batch within one
        Cassandra partition)."""
        wire = self._wire_for([n for n, _ in items])
        if wire is not None:
            binders = self._binders
            try:
                statements = [(self._wire_ok[n][0], binders[n](p)) for n, p in items]
            except Exception as exc:  # as _x: a value the statement cannot take, nothing sent
                raise StorageUnavailable(f"cassandra {label}: {exc}") from exc
            self._count(label)
            if await self._on_wire(label, wire.batch(statements, self._wire_ok[items[0][0]][1])) is not None:
                return
        from cassandra.query import BatchStatement, BatchType

        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        try:
            for n, p in items:
                batch.add(self._ps[n], tuple(p))
        except Exception as exc:  # as on the wire: a value the statement cannot take, nothing sent
            raise StorageUnavailable(f"cassandra {label}: {exc}") from exc
        await self._run_statement(batch, label)

    async def _run_together(self, name: str, params: Sequence[Sequence[Any]]) -> list[Any]:
        """One prepared statement with several parameter sets, as one batch (one request; for
        conditional statements, within one Cassandra partition, one consensus round)."""
        from cassandra.query import BatchStatement

        batch = BatchStatement()
        for p in params:
            batch.add(self._ps[name], tuple(p))
        return await self._run_statement(batch, name)

    async def _run_statement(self, statement: Any, name: str) -> list[Any]:
        """Run a bound statement or batch (one request to Cassandra) without blocking the loop."""
        return await self._x(name, statement=statement)

    async def _x(self, name: str, *params: Any, statement: Any = None) -> list[Any]:
        """Run a prepared statement without blocking the loop; driver errors become StorageUnavailable."""
        if statement is None:
            if name in self._wire_reads:
                rows = await self._read_on_wire(name, params)
                if rows is not None:
                    return rows
            wire = self._wire_for((name,))
            if wire is not None:
                try:
                    values = self._binders[name](params)
                except Exception as exc:
                    raise StorageUnavailable(f"cassandra {name}: {exc}") from exc
                self._count(name)
                query_id, consistency = self._wire_ok[name]
                if await self._on_wire(name, wire.execute(query_id, values, consistency)) is not None:
                    return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        session = self._session
        if session is None:
            raise StorageUnavailable("cassandra store is not open")

        results = self._results_for(loop)

        def ok(rows: Any) -> None:
            results.put(fut, list(rows or []), None)

        def fail(exc: BaseException) -> None:
            results.put(fut, None, exc)

        self._count(name)
        try:
            # No timeout in the driver: its per-request timer (a libev timer and a reference
            # cycle per statement) cost more CPU than the statement; _Results times it out.
            session.execute_async(statement if statement is not None else self._ps[name], params or None,
                                  timeout=None).add_callbacks(ok, fail)
        except Exception as exc:
            raise StorageUnavailable(f"cassandra: {exc}") from exc
        results.watch(fut, name)
        try:
            return await fut
        except StorageError:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cassandra {name}: {type(exc).__name__}: {exc}") from exc
        finally:
            results.forget(fut)


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
        await asyncio.gather(self._x("put_user", uid, phone, now),
                             self._x("put_partition_user", partition_of(f"u:{uid}"), uid))
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

    async def add_device(self, user_id: str, name: str, platform: str, now: int, proto: int = 1) -> Device:
        from cassandra.query import BatchStatement, BatchType

        did = new_id("d")
        # one logged batch: both rows or (eventually) neither. Written one after the other, a
        # crash between them left a device that is never listed, so never woken by a push.
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        batch.add(self._ps["put_device"], (did, user_id, name, platform, now, proto))
        batch.add(self._ps["put_user_device"], (user_id, did, proto))
        await self._run_statement(batch, "put_device")
        return Device(device_id=did, user_id=user_id, name=name, platform=platform, created_at=now, proto=proto)

    async def get_device(self, device_id: str) -> Device | None:
        rows = await self._x("get_device", device_id)
        if not rows:
            return None
        r = rows[0]
        return Device(device_id=r[0], user_id=r[1], name=r[2], platform=r[3], created_at=r[4],
                      push_provider=r[5], push_token=r[6], proto=r[7] or 1)

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
        device = await self.get_device(device_id)
        if device is None:
            return False
        await self._x("del_device", device_id)
        await self._x("del_user_device", device.user_id, device_id)
        return True

    async def clear_push_target(self, device_id: str, token: str | None = None) -> bool:
        # a plain read then write: a registration racing a push service's refusal is the device
        # asking again, and it asks again at its next start as well
        device = await self.get_device(device_id)
        if device is None or device.push_token is None or (token is not None and device.push_token != token):
            return False
        await self._x("clear_push", device_id)
        return True

    async def user_devices(self, user_id: str) -> list[Device]:
        rows = await self._x("user_devices", user_id)
        found = await asyncio.gather(*(self.get_device(r[0]) for r in rows))
        return sorted((d for d in found if d is not None), key=lambda d: (d.created_at, d.device_id))

    async def reads_v1(self, user_id: str) -> bool:
        return any(proto != 2 for _device, proto in await self._x("user_devices", user_id))

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
    async def _chat(self, chat_id: str, current_seq: bool = True) -> Chat | None:
        return (await self._chat_and_activity(chat_id, current_seq=current_seq))[0]

    async def _chat_and_activity(self, chat_id: str, activity: bool = False,
                                 current_seq: bool = True) -> tuple[Chat | None, int]:
        """The chat with its members, and (with ``activity``) when it was last active. The last
        seq comes from this process's writer of the chat when it has one, else (unless
        ``current_seq`` is False: then it is 0) from the chat's newest rows.

        The seq is read before the members: a member is added before its ``member_added`` message
        is numbered, so members read afterwards include every addition at or below that seq (a
        client keeps, of two descriptions, the one with the higher last_seq: read the other way
        round, one could pair the members of before an addition with the seq of its message)."""
        key = f"c:{chat_id}"
        held = self._logs.get(key)
        last_ts = 0
        if not activity and (not current_seq or held is not None):
            last_seq = held.head if held is not None else 0
            rows, members = await asyncio.gather(self._x("get_chat", chat_id), self._x("members", chat_id))
        else:
            last_seq, recent, head_row, _ = await self._tail(key)
            last_ts = int(recent[0][4]) if recent else int(head_row[1] or 0) if head_row is not None else 0
            rows, members = await asyncio.gather(self._x("get_chat", chat_id), self._x("members", chat_id))
        if not rows:
            return None, 0
        r = rows[0]
        ms = sorted((Member(user_id=m[0], role=m[1], joined_at=m[2]) for m in members),
                    key=lambda m: (m.joined_at, m.user_id))
        chat = Chat(chat_id=r[0], kind=r[1], title=r[2] or "", created_by=r[3], created_at=r[4],
                    last_seq=last_seq, members=tuple(ms))
        if chat.kind == "direct" and len(ms) == 2:  # complete: its members never change
            self._directs[chat_id] = chat
        return chat, last_ts

    async def get_chat(self, chat_id: str, *, current_seq: bool = True) -> Chat | None:
        known = self._directs.get(chat_id)  # a direct chat's members never change
        if known is not None:
            return dataclasses.replace(known, last_seq=await self._head(f"c:{chat_id}")) if current_seq else known
        return await self._chat(chat_id, current_seq)

    async def _join(self, chat_id: str, user_id: str, role: Role, now: int) -> None:
        await asyncio.gather(self._x("add_member", chat_id, user_id, role, now),
                             self._x("add_user_chat", user_id, chat_id))

    async def direct_chat(self, a: str, b: str, now: int, *, current_seq: bool = True) -> Chat:
        pair = "|".join(sorted((a, b)))
        known = self._pairs.get(pair)  # a direct chat's members never change
        if known is not None:
            if not current_seq:
                return known
            return dataclasses.replace(known, last_seq=await self._head(f"c:{known.chat_id}"))
        chat = await self._direct_chat(pair, a, b, now)
        self._pairs[pair] = self._directs[chat.chat_id] = chat
        return chat

    async def _direct_chat(self, pair: str, a: str, b: str, now: int) -> Chat:
        # Every message sent with "to" comes here: a plain read finds the chat of a pair that has
        # one, and only a first use pays for the conditional insert (a Paxos round).
        rows = await self._x("get_pair", pair)
        if not rows:  # numbered beside the traffic of its first sender (storage/cassandra_owner.py)
            cid = chat_id_near(a, lambda: new_id("c"))
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
        found = await asyncio.gather(*(self._chat_and_activity(i, activity=True) for i in ids))
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

    # -- numbering: one writer per key (see storage/cassandra_owner.py) ------------------------
    async def _fence(self, key: str) -> tuple[int, int]:
        """The key's newest fence, as readers take it: while an opening is between its two fences
        (``after`` -1) every row of an older epoch is hidden."""
        return (await self._fence_to_open(key))[0]

    async def _fence_to_open(self, key: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """The key's newest fence, and the one its rows are read under when it is opened: the
        newest, or, when an opening stopped between its two fences (a statement failed, the
        process died, the opener was cancelled), the fence that opening started from. No row was
        written under such an opening's epoch: its log was never made."""
        rows = await self._x("fence_get", key)
        if not rows:
            return (0, 0), (0, 0)
        epoch, after, prev_epoch, prev_after = rows[0]
        newest = (int(epoch), int(after))
        if newest[1] != -1:
            return newest, newest
        return newest, (int(prev_epoch or 0), int(prev_after or 0))

    @staticmethod
    def _valid(epoch: int | None, n: int, fence: tuple[int, int]) -> bool:
        """Whether a row belongs to the key: written under the newest fence's epoch or later, or
        numbered at or below it (see the module docstring of ``cassandra_owner``)."""
        return (epoch or 0) >= fence[0] or n <= fence[1]

    async def _tail(self, key: str, fence: tuple[int, int] | None = None) -> tuple[int, list[Any], Any, int]:
        """A key's highest number as stored, its newest valid rows (newest first), its head row
        (``chat_heads`` or ``user_state``, None if absent), and the lowest number down to which
        those rows' bucket was read (nothing of the key lies between it and the rows)."""
        kind, _, ident = key.partition(":")
        if fence is None:
            fence = await self._fence(key)
        hint_rows = await self._x("chat_head" if kind == "c" else "user_state", ident)
        hint = int(hint_rows[0][0] or 0) if hint_rows else 0
        # inbox rows expire; what was acknowledged never goes back
        acked = int(hint_rows[0][1] or 0) if kind == "u" and hint_rows else 0
        floor = max(hint, acked)
        stmt = "chat_tail" if kind == "c" else "inbox_tail"
        bucket, head, recent, reached = hint // BUCKET, 0, [], 0
        rows, low = await self._valid_tail(stmt, ident, bucket, fence)
        if not rows and hint:
            # Nothing of the key's own where the hint points: a holder writes a bucket's rows
            # before moving the hint there, so this hint came with an older holder's late write
            # (or, for an inbox, the rows expired). If the key's rows are found below it, the
            # newest of them is the head, not the hint.
            for lower in range(bucket - 1, max(-1, bucket - 3), -1):
                rows, low = await self._valid_tail(stmt, ident, lower, fence)
                if rows:
                    bucket = lower
                    floor = acked
                    break
        while rows:
            head, recent, reached = int(rows[0][0]), rows, low
            if head % BUCKET != BUCKET - 1:
                break
            bucket += 1  # that bucket is full: the head may be in the next one
            rows, low = await self._valid_tail(stmt, ident, bucket, fence)
        return max(head, floor), recent, hint_rows[0] if hint_rows else None, reached

    async def _valid_tail(self, stmt: str, ident: str, bucket: int, fence: tuple[int, int]) -> tuple[list[Any], int]:
        """The newest rows of one bucket that belong to the key (newest first), and the lowest
        number the reads covered: the last row read, or the bucket's start once a page came back
        short (the bucket holds nothing below it). Past the fence there may be rows of an older
        holder that landed late, hidden; as many as a batch of its held, so a page of nothing
        else is read past, down to the rows under it."""
        page = await self._x(stmt, ident, bucket, RECENT_SCAN)
        while page:
            valid = [r for r in page if self._valid(r[1], r[0], fence)]
            low = int(page[-1][0]) if len(page) == RECENT_SCAN else bucket * BUCKET
            if valid or len(page) < RECENT_SCAN:
                return valid, low
            page = await self._x(f"{stmt}_below", ident, bucket, int(page[-1][0]), RECENT_SCAN)
        return [], bucket * BUCKET

    async def _older_rows(self, key: str, rows: list[Any], head: int, fence: tuple[int, int],
                          reached: int) -> list[Any]:
        """``rows`` (a key's newest, newest first, read down to ``reached``) and the key's rows
        below them, up to RECENT_IDS in all, from the head's bucket and the one before it: a
        writer opening the key remembers the ids of as many as it keeps itself, so a repeat
        finds what was numbered before a restart as it would have before (a chat's rows also
        have their sends' records; an inbox's entries only this and the read-back of a repeat's
        fan-out)."""
        kind, _, ident = key.partition(":")
        stmt = "chat_tail_below" if kind == "c" else "inbox_tail_below"
        out = list(rows)
        # (a short first page read its bucket to the start: an inbox whose oldest entries there
        # expired is not read again below them)
        low = reached if out else head + 1
        last_bucket = max(0, head // BUCKET - 1)
        while len(out) < RECENT_IDS and low > 1 and (low - 1) // BUCKET >= last_bucket:
            bucket, want = (low - 1) // BUCKET, RECENT_IDS - len(out)
            page = await self._x(stmt, ident, bucket, low, want)
            out += [r for r in page if self._valid(r[1], r[0], fence)]
            low = int(page[-1][0]) if len(page) == want else bucket * BUCKET
        return out

    async def _head(self, key: str) -> int:
        held = self._logs.get(key)
        if held is not None:
            return held.head
        return (await self._tail(key))[0]

    async def _log(self, key: str) -> KeyLog:
        """This process's log of a key in a partition it holds: opened on first use under an
        epoch by reading the key's tail and writing the fence."""
        held = self._logs.get(key)
        if held is not None:
            return held
        opening = self._opening.get(key)
        if opening is not None:
            return await asyncio.shield(opening)
        fut: asyncio.Future[KeyLog] = asyncio.get_running_loop().create_future()
        self._opening[key] = fut
        fenced = False  # between the two fences
        epoch = None
        try:
            part = partition_of(key)
            epoch = self._leases.epoch(part) if self._leases is not None else None
            if epoch is None:
                raise NotOwner(f"partition {part} is not held here")
            newest, fence = await self._fence_to_open(key)
            # rows after the head are written whole only where an older holder may have left a
            # late row: a key no epoch has opened before has none
            full_after = fence[1] if fence[0] else -FULL_ROWS - 1
            if newest[0] != epoch or newest[1] == -1:
                # First hide every row of older epochs, then read the tail as it was, then put the
                # fence at its head: a late row of an old holder is either in what is read (and
                # kept) or hidden, and no reader ever sees one that is later replaced. The first
                # fence keeps the one it replaces: an opening cut short after it is finished from
                # there (by this process, _finish_opening, or the next holder).
                fenced = True
                if newest[0] != epoch:
                    await self._x("fence_open", key, epoch, fence[0], fence[1], 2 * epoch)
                head, recent, _, reached = await self._tail(key, fence)
                await self._x("fence_put", key, epoch, head, 2 * epoch + 1)
                fenced = False
                if fence[0]:
                    full_after = head
                fence = (epoch, head)
            else:
                head, recent, _, reached = await self._tail(key, fence)
            recent = await self._older_rows(key, recent, head, fence, reached)
            if not self._leases.valid(part, epoch):  # type: ignore[union-attr]
                raise NotOwner(f"partition {part} changed hands while opening {key}")
            if key.startswith("c:"):
                ids: dict[Hashable, int] = {(r[2], r[3]): int(r[0]) for r in reversed(recent) if r[3] is not None}
            else:
                ids = {(r[2], int(r[3])): int(r[0]) for r in reversed(recent) if r[3] is not None}
                # the group notices among the newest entries: one a higher one overtook is not
                # appended after it, whichever process appended that one (GroupNotices)
                for r in recent:
                    if r[5] == "*" and r[4] and r[6] is not None:
                        self._notices.seen(key[2:], r[2], r[4], int(r[6]))
            log_ = KeyLog(key, part, epoch, head, full_after, ids, self._write_rows, self._leases,  # type: ignore[arg-type]
                          self._write_rows_now)
            self._logs.put(log_)
            fut.set_result(log_)
            return log_
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the opener's own: the others are told unavailable
                fut.set_exception(StorageUnavailable(f"opening {key} was interrupted"))
            else:
                fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it themselves
            if fenced and epoch is not None:
                self._finish_opening(key, epoch)
            raise
        finally:
            del self._opening[key]

    def _finish_opening(self, key: str, epoch: int) -> None:
        """An opening of ``key`` under ``epoch`` stopped between its two fences: readers see none
        of the key's older rows until an opening finishes, so open it again soon, here, for as
        long as this process holds the partition at that epoch (the next holder finishes it
        otherwise, on the key's first use)."""
        if key in self._finishing or self._closing.is_set():
            return

        async def finish() -> None:
            pause = AGAIN_S[0]
            try:
                while True:
                    if await self._paused(pause):
                        return
                    part = partition_of(key)
                    if self._leases is None or self._leases.epoch(part) != epoch or self._logs.get(key) is not None:
                        return
                    try:
                        await self._log(key)
                        return
                    except NotOwner:
                        return
                    except StorageError as exc:
                        log.warning("opening %s again failed: %s", key, exc)
                    pause = min(2 * pause, AGAIN_S[1])
            finally:
                del self._finishing[key]

        self._finishing[key] = asyncio.get_running_loop().create_task(finish(), name=f"finish-opening-{key}")

    async def _number(self, key: str, values: tuple[Any, ...], ident: Hashable | None) -> tuple[int, bool]:
        """Give ``values`` the key's next number and store them: here when this process holds
        the key's partition, else by the holder (through the shared state)."""
        return await self._number_soon(key, values, ident)

    def _number_soon(self, key: str, values: tuple[Any, ...], ident: Hashable | None
                     ) -> Awaitable[tuple[int, bool]]:
        """:meth:`_number` as something to await beside others: when the key's partition is held
        here, a future its append settles (no task around it once the key's log is open), else
        the request to the holder."""
        part = partition_of(key)
        if self._leases is not None and self._leases.epoch(part) is not None:
            return self._append_soon(key, values, ident)
        return self._forward(part, key, values, ident)

    def _append_soon(self, key: str, values: tuple[Any, ...], ident: Hashable | None
                     ) -> asyncio.Future[tuple[int, bool]]:
        """Append to the log of a key whose partition is held here, in the order of the calls:
        at once when the log is open and no earlier append still waits for its opening, else
        behind those: a list the opening empties into the log, while later appends join it. (A
        caller that awaited the opening itself would wake a turn or two after the log is cached,
        and an append made in between would be numbered before it: a chat's seq 6 ahead of its
        seq 5 in an inbox.)"""
        waiting = self._waiting.get(key)
        if waiting is None:
            held = self._logs.get(key)
            if held is not None:
                if self._overtaken(key, values):
                    return _answered(asyncio.get_running_loop(), (0, True))
                return held.append(values, ident)
            waiting = self._waiting[key] = []
            self._openers[key] = asyncio.get_running_loop().create_task(self._open_for(key), name=f"open-{key}")
        out: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        waiting.append((values, ident, out))
        return out

    async def _open_for(self, key: str) -> None:
        """Open ``key``'s log, then append what waited for it, in order."""
        try:
            log_ = await self._log(key)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else StorageUnavailable(f"opening {key} was interrupted")
            for _values, _ident, out in self._waiting.pop(key):
                if not out.done():
                    out.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return  # (told to the waiters)
        finally:
            del self._openers[key]
        for values, ident, out in self._waiting.pop(key):
            if self._overtaken(key, values):  # (asked once the log is open: it knows the tail's notices)
                out.set_result((0, True))
            else:
                log_.append(values, ident, out)

    def _overtaken(self, key: str, values: tuple[Any, ...]) -> bool:
        """A group notice for an inbox that a higher one overtook (Store.append_receipts): not
        appended, position 0. Asked in the order of the inbox's appends."""
        return (key[0] == "u" and len(values) == 14 and values[12] == "*"
                and not self._notices.moves(key[2:], values[0], "*", values[11], values[13]))

    async def _forward(self, part: int, key: str, values: tuple[Any, ...], ident: Hashable | None) -> tuple[int, bool]:
        rpc = getattr(self._state, "call", None)
        if rpc is None:
            raise StorageUnavailable(f"partition {part} is held by another process, and no shared state "
                                     "(--redis) connects this one to it")
        until = time.time() + FORWARD_TIMEOUT_S
        pause = MOVED_PAUSE_S[0]
        while True:
            request = {"kind": "number", "scope": self.keyspace, "key": key, "values": list(values),
                       "ident": list(ident) if isinstance(ident, tuple) else ident, "until": until}
            reply = await rpc(self.queue_of(part), request, max(until - time.time(), MOVED_PAUSE_S[0]))
            if reply.get("moved") and time.time() + pause < until:
                # Taken by a process that gave the partition up before numbering anything (a
                # rebalance): asked again of the next holder, which may be this process by then.
                await asyncio.sleep(pause)
                pause = min(2 * pause, MOVED_PAUSE_S[1])
                if self._leases is not None and self._leases.epoch(part) is not None:
                    return await self._append_soon(key, values, ident)
                continue
            if "error" in reply:
                raise StorageUnavailable(f"partition {part}: {reply['error']}")
            return int(reply["n"]), bool(reply["dup"])

    def _serve_forwarded(self, req: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """Number a key for another process (it holds no lease on the key's partition). When the
        key's log is open here the answer is a future settled by the append itself (no task, no
        coroutine: a forward is most of what a second bridge adds to a message)."""
        loop = asyncio.get_running_loop()
        try:
            if req.get("scope") != self.keyspace:  # another deployment's request: never number it here
                other = req.get("scope")
                return _answered(loop, {"error": f"this bridge serves keyspace {self.keyspace}, not {other!r}"})
            if time.time() > float(req["until"]):
                return _answered(loop, {"error": "the request waited too long"})
            ident = tuple(req["ident"]) if isinstance(req["ident"], list) else req["ident"]
            key = str(req["key"])
            part = partition_of(key)
            if self._leases is None or self._leases.epoch(part) is None:
                return _answered(loop, {"error": f"partition {part} is not held here", "moved": True})
            values = tuple(req["values"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed forwarded request: %s", exc)
            return _answered(loop, {"error": "malformed request"})
        out: asyncio.Future[dict[str, Any]] = loop.create_future()

        def answer(appended: asyncio.Future[tuple[int, bool]]) -> None:
            reply = self._served(key, values, appended)
            if not out.done():  # (its waiter may have been cancelled meanwhile)
                out.set_result(reply)

        self._append_soon(key, values, ident).add_done_callback(answer)
        return out

    def _served(self, key: str, values: tuple[Any, ...], appended: asyncio.Future[tuple[int, bool]]) -> dict[str, Any]:
        """The answer to a forwarded append, once it is done."""
        exc = appended.exception()
        if exc is not None:
            if isinstance(exc, StorageUnavailable):
                return {"error": str(exc)}
            log.error("numbering %s for another bridge failed", key, exc_info=exc)
            return {"error": type(exc).__name__}
        n, dup = appended.result()
        kind, _, user = key.partition(":")
        if kind == "u" and not dup:  # kept for the user's acks and syncs, which come here
            self._entries[(user, n)] = values
        return {"n": n, "dup": dup}

    async def _quiesce(self, part: int) -> None:
        """Wait until what this process took for a partition's keys is written: the keys being
        opened for appends first (their logs are not made yet), then every log's writes."""
        opening = [task for key, task in self._openers.items() if partition_of(key) == part]
        if opening:
            await asyncio.gather(*(asyncio.shield(task) for task in opening), return_exceptions=True)
        await asyncio.gather(*(held.settled() for held in self._logs.of_partition(part)))

    def _lost(self, part: int) -> None:
        for held in self._logs.of_partition(part):
            held.kill(f"partition {part} changed hands")
            self._logs.drop(held.key)
        # the receipts of the partition's users move on another bridge now: what this one knows
        # of them may fall behind, and a move it then made would be told as news (going back)
        self._receipts = LRUCache(RECEIPTS_KNOWN)

    def _row_params(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]],
                    full: bool) -> tuple[str, dict[int, list[tuple[Any, ...]]]]:
        """The statement that writes one key's numbered rows, and their parameters by bucket."""
        # An absent field is left unset rather than written as a null, which Cassandra keeps as
        # a tombstone per cell that later reads step over (a sync of 1,000 inbox rows read ~3,000
        # of them) -- except right after a fence, where a late row of an old epoch may hold the
        # number and every one of its cells must be overwritten.
        kind, _, ident = key.partition(":")
        name = ("put_msg" if kind == "c" else "put_inbox") + ("_full" if full else "")
        unset = self._unset
        by_bucket: dict[int, list[tuple[Any, ...]]] = {}
        for n, values in rows:
            params = (ident, n // BUCKET, n, epoch, *values)
            if not full:
                params = tuple(unset if p is None else p for p in params)
            by_bucket.setdefault(n // BUCKET, []).append(params)
        return name, by_bucket

    def _opened(self, key: str, rows: Sequence[tuple[int, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        """The ``open_sent`` parameters written before a chat's rows: where each send with an id
        was numbered (a chat row's values start client_id, sender, device), with the time of this
        attempt. Every attempt is made under a lease still trusted, so its time comes before any
        a newer holder of the chat can give a record of its own (the bridges' clocks agreeing
        within the lease's margin): one that lands late never hides the newer one."""
        kind, _, chat_id = key.partition(":")
        if kind != "c":
            return []
        cluster = self._cluster
        now_us = cluster.timestamp_generator() if cluster is not None else time.time_ns() // 1000
        return [(values[2], values[0], chat_id, n, now_us) for n, values in rows if values[0] is not None]

    async def _write_rows(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]],
                          full: bool) -> None:
        """Write one key's numbered rows in order: one statement (an unlogged batch when there
        are several) per Cassandra partition, lower buckets first. A chat's rows go out only once
        the ``open_sent`` records of their sends have landed, so a stored row always has its
        record and a send without one was never stored: a record that fails fails the write, and
        the key's log writes records and rows again."""
        opened = self._opened(key, rows)
        if opened:
            records = await asyncio.gather(*(self._x("open_sent", *params) for params in opened),
                                           return_exceptions=True)
            failed = [r for r in records if isinstance(r, BaseException)]
            if failed:  # (anything but a storage error is a fault of this code: raised as is)
                raise next((f for f in failed if not isinstance(f, StorageError)), failed[0])
        await self._write_rows_in_order(key, epoch, rows, full)

    def _rows_may_not_go(self, key: str, epoch: int) -> NotOwner | None:
        """Why rows of ``key`` may not be sent now under ``epoch`` (None: they may). Checked in the
        same step as the send, so that a row never carries a later Cassandra timestamp (taken
        when it is sent) than the lease under which it was numbered allows: a newer holder's
        rows must win over any row of this one that lands late."""
        leases, part = self._leases, partition_of(key)
        if leases is not None and leases.valid(part, epoch):
            return None
        return NotOwner(f"{key}: the lease of partition {part} ended before its rows went out")

    async def _write_rows_in_order(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]],
                                   full: bool) -> None:
        name, by_bucket = self._row_params(key, epoch, rows, full)
        for bucket in sorted(by_bucket):
            ended = self._rows_may_not_go(key, epoch)  # (after the records, or a bucket before)
            if ended is not None:
                raise ended
            group = by_bucket[bucket]
            if len(group) == 1:
                await self._x(name, *group[0])
            else:
                await self._batch(name, [(name, params) for params in group])
        kind, _, ident = key.partition(":")
        for n, _values in rows:
            if n % BUCKET == 0:  # a new bucket: readers start their search for the head there
                await self._x("set_chat_head" if kind == "c" else "set_head", n, n, ident)

    def _write_rows_now(self, key: str, epoch: int, rows: Sequence[tuple[int, tuple[Any, ...]]], full: bool,
                        then: Callable[[BaseException | None], None]) -> bool:
        """:meth:`_write_rows` sent at once on the loop's own connection, its outcome given to
        ``then`` as soon as it is read (None: stored; WriteAgain: to be written the ordinary way;
        else StorageUnavailable). Only for rows within one bucket that start none: False, and
        nothing sent, for anything else, or when the connection cannot take it. A chat's
        ``open_sent`` records go first, one statement each, and its rows once every record has
        landed (from the answer of the last, in the same turn of the loop) if the lease still
        holds; a record that failed fails the write, its rows not sent."""
        if any(n % BUCKET == 0 for n, _ in rows):
            return False
        name, by_bucket = self._row_params(key, epoch, rows, full)
        opened = self._opened(key, rows)
        wire = self._wire_for((name, "open_sent") if opened else (name,))
        if len(by_bucket) != 1 or wire is None:
            return False
        (group,) = by_bucket.values()
        query_id, consistency = self._wire_ok[name]
        binder = self._binders[name]
        try:
            values = [binder(params) for params in group]
            opens = [self._binders["open_sent"](params) for params in opened]
        except Exception:  # the ordinary way says what was wrong
            return False
        results = self._results_for(wire._loop)

        def send_rows() -> None:
            def rows_answered(exc: BaseException | None) -> None:
                results.forget(answer)
                if exc is None:
                    then(None)
                else:
                    then(_log_write_failure(name, exc))

            answer = Direct(rows_answered)
            results.watch(answer, name)
            self._count(name)
            try:
                if len(values) == 1:
                    wire.execute(query_id, values[0], consistency, to=answer)
                else:
                    wire.batch([(query_id, v) for v in values], consistency, to=answer)
            except BaseException:  # a late answer is dropped
                results.forget(answer)
                answer.cancel()
                raise

        if not opens:
            send_rows()  # (raising: the caller writes it the ordinary way)
            return True
        left = [len(opens)]
        failed: list[BaseException] = []

        def record_answered(i: int, exc: BaseException | None) -> None:
            results.forget(answers[i])
            if exc is not None:
                failed.append(_log_write_failure("open_sent", exc))
            left[0] -= 1
            if left[0]:
                return
            if failed:
                then(failed[0])
                return
            ended = self._rows_may_not_go(key, epoch)
            if ended is not None:
                then(ended)
                return
            try:
                send_rows()
            except Exception as exc:  # (the connection went meanwhile) the ordinary way writes them
                then(WriteAgain(f"cassandra {name}: {exc}"))

        answers = [Direct(functools.partial(record_answered, i)) for i in range(len(opens))]
        for answer in answers:
            results.watch(answer, "open_sent")
            self._count("open_sent")
        try:
            open_id, open_consistency = self._wire_ok["open_sent"]
            for v, answer in zip(opens, answers, strict=True):
                wire.execute(open_id, v, open_consistency, to=answer)
        except BaseException:  # the caller writes it the ordinary way; a late answer is dropped
            for answer in answers:
                results.forget(answer)
                answer.cancel()
            raise
        return True

    # -- messages -------------------------------------------------------------------------------
    async def append_message(self, msg: NewMessage, recipients: Sequence[str]) -> Appended:
        sent_id = (msg.device, msg.client_id) if msg.client_id is not None else None
        if sent_id is not None and sent_id not in self._unsent and sent_id not in self._open_sends:
            earlier = await self.find_sent(msg.device, msg.client_id)  # type: ignore[arg-type]
            if earlier is not None:
                return Appended(message=earlier, inbox={}, duplicate=True)
        opened = self._open_sends.pop(sent_id, None) if sent_id is not None else None
        if opened is not None:  # numbered and stored before, its fan-out perhaps not done
            if opened.chat_id != msg.chat_id:  # the id reused for another chat: the first send is the one
                first = await self.get_chat(opened.chat_id, current_seq=False)
                recipients = first.member_ids if first is not None else []
            return await self._complete(opened, recipients, dup=True, accepted_ms=opened.ts)
        if msg.chat_id not in self._known_chats:
            if not await self._x("get_chat", msg.chat_id):
                raise NotStored(f"chat {msg.chat_id}")
            self._known_chats[msg.chat_id] = True
        media = media_to_json(msg.media)
        values = (msg.client_id, msg.sender, msg.device, msg.ts, msg.kind, msg.body, media, msg.event, msg.target)
        seq, dup = await self._number(f"c:{msg.chat_id}", values, sent_id)
        if sent_id is not None:  # used now: a retry looks for its record (the fan-out may yet fail)
            self._unsent.pop(sent_id, None)
        stored = None
        if dup:  # the chat has it already (an earlier attempt): that one is the message
            stored = await self._message_at(msg.chat_id, seq)
        accepted_ms = stored.ts if stored is not None else None  # (of the first attempt: not this one's)
        if stored is None:
            stored = Message(chat_id=msg.chat_id, seq=seq, client_id=msg.client_id, sender=msg.sender,
                             device=msg.device, ts=msg.ts, kind=msg.kind, body=msg.body, media=msg.media,
                             event=msg.event, target=msg.target)
        return await self._complete(stored, recipients, dup=dup, accepted_ms=accepted_ms)

    async def _complete(self, stored: Message, recipients: Sequence[str], *, dup: bool,
                        accepted_ms: int | None = None) -> Appended:
        """Write every member's inbox entry of a stored message, then record its send as complete.
        On a repeat, ``accepted_ms`` is when the message was accepted (its ``ts``, read from its
        row), None when not known."""
        if stored.media is not None:
            await self._x("put_chat_media", stored.chat_id, stored.media.key)
        # every member's entry, even on a repeat: an interrupted attempt may have stopped short of
        # some (those it wrote, when it failed here, are known), and the inbox logs know the
        # (chat, seq) entries they already hold
        sent_id = (stored.device, stored.client_id) if stored.client_id is not None else None
        if dup and sent_id is not None and sent_id in self._sent_here:  # completed meanwhile (another repeat)
            return Appended(message=stored, inbox={}, duplicate=True)
        had = self._fanned.get(sent_id, frozenset()) if dup and sent_id is not None else frozenset()
        if dup:  # (members whose entry an earlier attempt wrote, beyond what their inbox writers remember)
            users = [u for u in dict.fromkeys(recipients) if u not in had]
            found = await asyncio.gather(*(self._has_entry(u, stored, accepted_ms) for u in users))
            had = had | {u for u, yes in zip(users, found, strict=True) if yes}
        try:
            inbox = await self._fan_out(stored, [u for u in recipients if u not in had] if had else recipients)
        except _FanOutFailed as failed:
            if sent_id is not None:  # (with what another repeat may have found meanwhile)
                self._fanned[sent_id] = self._fanned.get(sent_id, frozenset()) | had | failed.written
            raise failed.error from None
        if sent_id is not None:
            # only after every entry: a retry that finds this record is answered at once, with
            # nothing more stored (tests/test_storage_contract.py, "finds a send only once ...").
            # Nobody waits for it: a retry that comes before it lands finds the send open, and
            # completes a fan-out that is complete (each inbox writer knows its latest entries).
            self._sent_here[sent_id] = _inbox_values(stored)
            self._unsent.pop(sent_id, None)
            if had:
                self._fanned.pop(sent_id, None)
            self._write_behind("put_sent", (stored.device, stored.client_id, stored.chat_id, stored.seq))
        if dup and inbox:
            log.info("completed an interrupted send %s/%s at seq %d", stored.sender, stored.client_id, stored.seq)
        return Appended(message=stored, inbox=inbox, duplicate=dup and not inbox)

    def _write_behind(self, name: str, params: tuple[Any, ...]) -> None:
        """A plain write nobody waits for: sent at once on the loop's own connection when it can
        take it, else (and again when that failed) by a task the ordinary way, until it lands or
        the store closes (:meth:`_write_behind_in_task`); :meth:`settled` returns once every such
        write is answered."""
        wire = self._wire_for((name,))
        if wire is not None:
            try:
                values = self._binders[name](params)
            except Exception as exc:
                log.warning("cassandra %s: %s", name, exc)
                return
            results = self._results_for(wire._loop)

            def answered(exc: BaseException | None) -> None:
                results.forget(answer)
                if exc is not None:  # again the ordinary way (it writes the same cells again)
                    self._write_behind_in_task(name, params, exc)
                self._behind_done()

            answer = Direct(answered)
            results.watch(answer, name)
            self._count(name)
            self._behind += 1
            query_id, consistency = self._wire_ok[name]
            try:
                wire.execute(query_id, values, consistency, to=answer)
                return
            except Exception:  # the driver's way below
                results.forget(answer)
                answer.cancel()
                self._behind_done()
        self._write_behind_in_task(name, params)

    def _write_behind_in_task(self, name: str, params: tuple[Any, ...], failed: BaseException | None = None) -> None:
        """Write it the ordinary way, and again after a pause for as long as Cassandra does not
        confirm it (it writes the same cells each time), until the store closes: a send's complete
        record that lands late still answers its retry at once. A write Cassandra refused as
        wrong, or one that could not be bound, is not written again: given up at once when its
        first failure (``failed``, on the loop's own connection) says so."""
        if failed is not None and not _worth_writing_again(failed):
            log.warning("cassandra %s (written behind) failed, given up: %s", name, failed)
            return
        self._behind += 1

        async def write() -> None:
            pause, failures, counted = AGAIN_S[0], 0, False
            try:
                while True:
                    try:
                        await self._x(name, *params)
                    except StorageError as exc:
                        failures += 1
                        if failures == 1 and (not _worth_writing_again(exc)
                                              or self._retrying_behind >= RETRYING_BEHIND_MAX):
                            log.warning("cassandra %s (written behind) failed, given up: %s", name, exc)
                            return
                        if self._closing.is_set():
                            log.warning("cassandra %s (written behind) failed, given up at close after %d tries: %s",
                                        name, failures, exc)
                            return
                        if failures == 1:
                            self._retrying_behind += 1  # from its first failure until it ends
                            counted = True
                            log.warning("cassandra %s (written behind) failed, writing it again: %s", name, exc)
                    else:
                        if failures:
                            log.info("cassandra %s (written behind) landed after %d failures", name, failures)
                        return
                    await self._paused(pause)  # (after it, a try that fails while closing gives up)
                    pause = min(2 * pause, AGAIN_S[1])
            finally:
                if counted:
                    self._retrying_behind -= 1
                self._behind_done()

        asyncio.get_running_loop().create_task(write(), name=f"behind-{name}")

    async def _paused(self, pause: float) -> bool:
        """Wait about ``pause`` seconds (see AGAIN_S); True when the store closed meanwhile."""
        try:
            async with asyncio.timeout(pause * random.uniform(0.75, 1.25)):
                await self._closing.wait()
            return True
        except TimeoutError:
            return False

    def _behind_done(self) -> None:
        self._behind -= 1
        if not self._behind:
            idle, self._behind_idle = self._behind_idle, []
            for fut in idle:
                if not fut.done():
                    fut.set_result(None)

    async def settled(self) -> None:
        """Return once every write nobody waits for (a send's records) is answered: landed, or
        given up. One that keeps failing is written again until the store closes, so while
        Cassandra fails this waits; close() bounds its own wait."""
        while self._behind:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._behind_idle.append(fut)
            await fut

    async def _fan_out(self, m: Message, recipients: Sequence[str]) -> dict[str, int]:
        users = list(dict.fromkeys(recipients))
        values = _inbox_values(m)
        # (a task for each member only where its inbox is not open here: one message's fan-out
        # made two tasks of its own, of the ten or so it made in all)
        done = await asyncio.gather(*(self._number_soon(f"u:{u}", values, (m.chat_id, m.seq)) for u in users),
                                    return_exceptions=True)
        out: dict[str, int] = {}
        failure: BaseException | None = None
        for u, outcome in zip(users, done, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                continue
            pos, dup = outcome
            self._entries[(u, pos)] = values
            if not dup:
                out[u] = pos
        if failure is not None:
            raise _FanOutFailed(failure, frozenset(u for u, o in zip(users, done, strict=True)
                                                   if not isinstance(o, BaseException)))
        return out

    async def _has_entry(self, user_id: str, m: Message, accepted_ms: int | None) -> bool:
        """Whether ``user_id``'s inbox holds an entry for message ``m``: the inbox writer's memory
        answers for its latest entries (an entry it is still writing is not held: the fan-out's
        append joins that write), and for the rest the inbox is read back from its head, newest
        first, down to the entries written before ``m`` was accepted at ``accepted_ms`` less the
        clocks' margin (None: not known, no such bound), INBOX_SINCE_MAX of them at most. Only
        for a repeat of a send."""
        key = f"u:{user_id}"
        ident = (m.chat_id, m.seq)
        held = self._logs.get(key)
        if held is not None and held.writing(ident):
            return False
        if held is not None and held.remembers(ident):
            return True
        since_us = accepted_ms * 1000 - INBOX_SINCE_SKEW_US if accepted_ms is not None else None
        top, read, size = await self._head(key), 0, INBOX_SINCE_FIRST
        while top > 0 and read < INBOX_SINCE_MAX:
            page = await self._x("inbox_since", user_id, top // BUCKET, top, size)
            if not page:  # (a bucket with nothing left: what was below it expired)
                return False
            for pos, epoch, chat_id, seq, written in page:
                if chat_id == m.chat_id and seq == m.seq:
                    # (the fence after the row, as in _message_at: a newer holder's fence written
                    # before the row was read and hiding it is then not missed)
                    return self._valid(epoch, pos, await self._fence(key))
                if since_us is not None and written is not None and written < since_us:
                    return False
            read += len(page)
            top = int(page[-1][0]) - 1 if len(page) == size else (top // BUCKET) * BUCKET - 1
            size = min(INBOX_SINCE_PAGE, size * 4)
        if read >= INBOX_SINCE_MAX:
            log.warning("inbox of %s: no entry for %s/%d among its latest %d; written again",
                        user_id, m.chat_id, m.seq, read)
        return False

    async def _message_at(self, chat_id: str, seq: int) -> Message | None:
        # the row before the fence: a fence read first could miss a newer holder's, written before
        # the row was read, that hides it (the newer holder, reading the tail after its fence,
        # sees any row found before the fence it wrote, and keeps its number)
        rows = await self._x("message", chat_id, seq // BUCKET, seq)
        if not rows or not self._valid(rows[0][-1], seq, await self._fence(f"c:{chat_id}")):
            return None
        return _message(chat_id, seq, rows[0][1:])

    async def find_sent(self, device: str, client_id: str) -> Message | None:
        """The message of a complete send (every member's inbox entry written). An open one
        (numbered and stored, its fan-out perhaps not done) is None here, and kept for
        :meth:`append_message`, which completes it."""
        sent_id = (device, client_id)
        here = self._sent_here.get(sent_id)
        if here is not None:
            return _message(here[0], here[1], here[2:11])
        rows = await self._x("get_sent", device, client_id)
        chat_id, seq, open_chat, open_seq = rows[0] if rows else (None, None, None, None)
        if chat_id is not None and seq is not None:
            return await self._message_at(chat_id, seq)
        if open_chat is not None and open_seq is not None:
            opened = await self._message_at(open_chat, open_seq)
            # (the record is written before the message, not with it: it names this send's
            # message only when that row is there, valid, and this send's; else the send was
            # never stored, or its row is still being written, and the chat's writer knows it)
            if opened is not None and opened.device == device and opened.client_id == client_id:
                self._open_sends[sent_id] = opened
                return None
        self._unsent[sent_id] = True
        return None

    async def history(self, chat_id: str, before: int | None, limit: int) -> list[Message]:
        key = f"c:{chat_id}"
        head = await self._head(key)
        top = min(before - 1, head) if before is not None else head
        out: list[Message] = []
        bucket = top // BUCKET
        while top > 0 and len(out) < limit and bucket >= 0:
            rows = await self._x("recent", chat_id, bucket, top, limit - len(out))
            if rows:
                fence = await self._fence(key)  # after the rows (see read_inbox)
                out += [_message(chat_id, r[0], r[1:]) for r in rows if self._valid(r[-1], r[0], fence)]
            bucket -= 1
        return out

    async def message_carries_media(self, chat_id: str, key: str) -> bool:
        return bool(await self._x("chat_media", chat_id, key))

    async def append_receipts(self, notes: Sequence[tuple[str, ReceiptNote]]) -> list[int]:
        by_user: dict[str, list[int]] = {}
        for i, (uid, _note) in enumerate(notes):
            by_user.setdefault(uid, []).append(i)
        out = [0] * len(notes)

        async def one_user(uid: str, indices: list[int]) -> None:
            for i in indices:  # one user's receipts keep their order
                note = notes[i][1]
                values = (note.chat_id, None, None, None, None, None, None, None, None, None, None, note.kind,
                          note.user, note.up_to)
                out[i], _dup = await self._number(f"u:{uid}", values, None)
                if out[i]:  # (0: a group notice overtaken, not appended)
                    self._entries[(uid, out[i])] = values

        await asyncio.gather(*(one_user(u, ix) for u, ix in by_user.items()))
        return out

    async def read_inbox(self, user_id: str, after: int, limit: int) -> list[InboxEntry]:
        held = self._logs.get(f"u:{user_id}")
        if held is not None:  # what this process wrote, from memory when it has it all
            cached: list[InboxEntry] = []
            for pos in range(after + 1, min(held.head, after + limit) + 1):
                item = self._entries.get((user_id, pos))
                if item is None:
                    break
                cached.append(InboxEntry(user_id=user_id, pos=pos, item=_inbox_item(item)))
            else:
                return cached
        rows = await self._inbox_from(user_id, after, limit)
        if not rows:
            # Nothing right after ``after``: caught up, or the entries after it expired (inbox
            # rows last inbox_ttl_s, the oldest going first). Then the batch starts at the oldest
            # entry kept: for a device, a position a sync skips does not exist (docs/protocol.md).
            # Without this a device syncing from below the expired ones got nothing, ever.
            kept = await self._oldest_kept(user_id, after, held)
            if kept is None:
                return []
            rows = await self._inbox_from(user_id, kept - 1, limit)
        # The fence after the rows (as in _message_at): a late row of an older holder that was
        # read is either hidden by the fence read now, or was there before a newer holder read
        # the tail, which kept it.
        fence = await self._fence(f"u:{user_id}")
        out: list[InboxEntry] = []
        for r in rows:
            if not self._valid(r[15], r[0], fence):
                break  # (a late row of an older epoch: what follows it is not kept)
            out.append(InboxEntry(user_id=user_id, pos=r[0], item=_inbox_item(r[1:15])))
        return out

    async def _oldest_kept(self, user_id: str, after: int, held: KeyLog | None) -> int | None:
        """The position of the oldest inbox row after ``after`` still stored, when the one right
        after ``after`` is not (it expired); None when there is none."""
        if held is not None:
            head = held.head
        else:  # (the head as written behind: it lags by seconds, and expired entries are a month old)
            rows = await self._x("user_state", user_id)
            head = int(rows[0][0] or 0) if rows else 0
        for bucket in range((after + 1) // BUCKET, head // BUCKET + 1):  # none when caught up
            rows = await self._x("read_inbox", user_id, bucket, after, 1)
            if rows:
                return int(rows[0][0])
        return None

    async def _inbox_from(self, user_id: str, after: int, limit: int) -> list[Any]:
        """Up to ``limit`` inbox rows from ``after + 1`` on, as long as they follow each other
        (not yet checked against the fence)."""
        out: list[Any] = []
        cursor = after
        while len(out) < limit:
            bucket = (cursor + 1) // BUCKET
            want = limit - len(out)
            rows = await self._x("read_inbox", user_id, bucket, cursor, want)
            for r in rows:
                if r[0] != cursor + 1:
                    return out  # the end of what is written
                out.append(r)
                cursor = r[0]
            if len(rows) < want and cursor % BUCKET != BUCKET - 1:
                break
            if not rows:
                break
        return out

    async def inbox_head(self, user_id: str) -> int:
        return await self._head(f"u:{user_id}")

    async def inbox_positions(self, user_id: str) -> tuple[int, int]:
        acked = self._acked.get(user_id)  # this process's latest; it is written behind
        if acked is None:
            rows = await self._x("user_state", user_id)
            acked = int(rows[0][1] or 0) if rows else 0
        return acked, await self.inbox_head(user_id)

    async def advance_device_ack(self, device_id: str, user_id: str, up_to: int) -> tuple[int, int]:
        prev = self._acked.get(user_id)
        if prev is None:
            rows = await self._x("user_state", user_id)
            prev = int(rows[0][1] or 0) if rows else 0
        head = await self.inbox_head(user_id)
        new = max(prev, min(up_to, head))
        self._acked[user_id] = new
        if new > prev:
            # Written behind, at most once per user every ACK_FLUSH_S: the position only saves
            # work (what an ack newly covers); one lost with a crash is read back lower, and the
            # receipts it leads to only move forward. (The device's own position is not kept.)
            # Never past an ack whose receipts are still moving (until device_ack_done): a crash
            # then would leave them unmoved, and the device's next ack would not cover them.
            self._acks_moving.claim(user_id, prev)
            self._ack_due(user_id, new)
        return prev, new

    def _ack_due(self, user_id: str, position: int) -> None:
        """Write the user's position behind (in about ACK_FLUSH_S, or with one due already; once
        the store is closing, only if ``close`` has not written what is due yet)."""
        due = self._acks_due.get(user_id)
        self._acks_due[user_id] = (position, time.monotonic()) if due is None else (max(position, due[0]), due[1])
        if (self._ack_writer is None or self._ack_writer.done()) and not self._closing.is_set():
            self._ack_writer = asyncio.create_task(self._write_acks_behind(), name="acked-positions")

    async def device_ack_done(self, user_id: str, prev: int) -> None:
        if self._acks_moving.done(user_id, prev) and user_id in self._acks_held:
            lowest = self._acks_moving.lowest(user_id)
            if lowest is None or lowest > prev:  # (else what was written stands: no ack below it is done)
                self._ack_due(user_id, self._acks_held.pop(user_id))  # (again up to the next moving one, if any)

    async def _write_acks_behind(self) -> None:
        # Each position is written about ACK_FLUSH_S after it first moved, a slice every
        # ACK_PACE_S: a period's worth all at once made a burst that every other statement
        # queued behind (the tail of the latency).
        while self._acks_due:
            oldest = next(iter(self._acks_due.values()))[1]
            await asyncio.sleep(max(ACK_PACE_S, oldest + ACK_FLUSH_S - time.monotonic()))
            await self._write_acks(time.monotonic() - ACK_FLUSH_S)

    async def _write_acks(self, moved_before: float = float("inf")) -> None:
        due: dict[str, int] = {}
        for user_id, (value, since) in self._acks_due.items():
            if since > moved_before:
                break
            due[user_id] = value
        for user_id in list(due):
            del self._acks_due[user_id]
            lowest = self._acks_moving.lowest(user_id)
            if lowest is not None and lowest < due[user_id]:  # (the rest once those acks are done)
                self._acks_held[user_id] = max(due[user_id], self._acks_held.get(user_id, 0))
                due[user_id] = lowest
                if not due[user_id]:
                    del due[user_id]
        done = await asyncio.gather(*(self._x("set_acked", v, v, u) for u, v in due.items()), return_exceptions=True)
        for (user_id, value), outcome in zip(due.items(), done, strict=True):
            if isinstance(outcome, BaseException):  # tried again with the next slice
                again = self._acks_due.pop(user_id, None)
                self._acks_due[user_id] = (max(value, again[0] if again else 0), time.monotonic() - ACK_FLUSH_S)

    async def get_receipts(self, chat_id: str) -> list[Receipt]:
        members, rows = await asyncio.gather(self._x("members", chat_id), self._x("receipts", chat_id))
        got = {r[0]: (r[1] or 0, r[2] or 0) for r in rows}
        for uid, (delivered, read) in got.items():
            self._receipts[(chat_id, uid)] = (delivered, read)
        ordered = sorted(members, key=lambda m: (m[2], m[0]))
        return [Receipt(chat_id=chat_id, user_id=m[0], delivered=got.get(m[0], (0, 0))[0],
                        read=got.get(m[0], (0, 0))[1]) for m in ordered]

    async def advance_receipt(self, chat_id: str, user_id: str, kind: ReceiptKind, up_to: int) -> bool:
        # Positions only grow (the writes carry them as their timestamps), so what this process
        # last saw is a lower bound: enough to skip a step it has seen made, and a read otherwise.
        known = self._receipts.get((chat_id, user_id))
        if known is None:
            rows = await self._x("receipt", chat_id, user_id)
            known = (rows[0][0] or 0, rows[0][1] or 0) if rows else (0, 0)
        delivered, read = known
        current = read if kind == "read" else delivered
        if up_to <= current:
            self._receipts[(chat_id, user_id)] = known
            return False
        # A chat's receipts are one Cassandra partition: the members' moves that arrive while one
        # is being written go out together (a group's members acknowledge the same message at
        # about the same time).
        if kind == "read":
            await asyncio.gather(self._per_chat.run(chat_id, "set_read", (up_to, up_to, chat_id, user_id)),
                                 self._per_chat.run(chat_id, "set_delivered", (up_to, up_to, chat_id, user_id)))
        else:
            await self._per_chat.run(chat_id, "set_delivered", (up_to, up_to, chat_id, user_id))
        # Another move of the same receipt may have been made here meanwhile (two devices of the
        # user reading at once): the higher one stands, and a lower one finishing after it is no
        # news (its notice would take the receipt back). (Equal: this one, as read back meanwhile.)
        delivered, read = self._receipts.get((chat_id, user_id), known)
        overtaken = (read if kind == "read" else delivered) > up_to
        self._receipts[(chat_id, user_id)] = (max(delivered, up_to), max(read, up_to) if kind == "read" else read)
        return not overtaken

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


_Joined = tuple[str, tuple[Any, ...], asyncio.Future[None]]  # statement name, parameters, who waits


class _PartitionWrites:
    """Writes to one Cassandra partition, joined while one is under way: the first is written at
    once; those that arrive meanwhile wait for it and then go out as one unlogged batch (one
    request, one partition), and so on. Only for writes whose order does not matter (each
    carries its own timestamp)."""

    def __init__(self, store: CassandraStore) -> None:
        self._store = store
        # partition -> writes waiting for the one under way (present while one is)
        self._waiting: dict[str, list[_Joined]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, partition: str, name: str, params: tuple[Any, ...]) -> None:
        waiting = self._waiting.get(partition)
        if waiting is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append((name, params, fut))
            await fut
            return
        self._waiting[partition] = []
        try:
            await self._store._x(name, *params)
        finally:
            self._next(partition)

    def _next(self, partition: str) -> None:
        joined = self._waiting.pop(partition, [])
        if joined:
            self._waiting[partition] = []
            task = asyncio.get_running_loop().create_task(self._write_joined(partition, joined))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write_joined(self, partition: str, joined: list[_Joined]) -> None:
        try:
            if len(joined) == 1:
                await self._store._x(joined[0][0], *joined[0][1])
            else:
                await self._store._batch("+".join(sorted({n for n, _, _ in joined})),
                                         [(name, params) for name, params, _ in joined])
        except Exception as exc:  # noqa: BLE001 - each waiter gets the failure as its own
            for _, _, fut in joined:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for _, _, fut in joined:
                if not fut.done():
                    fut.set_result(None)
        finally:
            self._next(partition)


class _Results:
    """Results from the driver's I/O thread, handed to the event loop in bunches: one wake-up of
    the loop for everything that arrived meanwhile, not one per statement (a profile of the
    bridge showed about 5 % of its CPU in those wake-ups). Statements not answered within the
    timeout fail here, checked a few times a second, so the driver needs no timer per statement.
    Only statements still waiting are held: each is let go as soon as its caller has its
    answer (held until its deadline instead, every result lived 5 s, and letting go of them in
    bulk then showed in the profile)."""

    SWEEP_S = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Future[list[Any]], list[Any] | None, BaseException | None]] = []
        self._scheduled = False
        self._timeout = timeout_s
        self._waiting: dict[asyncio.Future[Any] | Direct, tuple[float, str]] = {}  # future -> (deadline, statement)
        self._sweeping = False

    def watch(self, fut: asyncio.Future[Any] | Direct, name: str) -> None:
        """Fail ``fut`` if it has no result once the timeout has passed (event loop thread)."""
        self._waiting[fut] = (self.loop.time() + self._timeout, name)
        if not self._sweeping:
            self._sweeping = True
            self.loop.call_later(self.SWEEP_S, self._sweep)

    def forget(self, fut: asyncio.Future[Any] | Direct) -> None:
        """``fut``'s caller has its answer (or gave up): nothing more to watch."""
        self._waiting.pop(fut, None)

    def _sweep(self) -> None:
        now, waiting = self.loop.time(), self._waiting
        late = [(fut, name) for fut, (deadline, name) in waiting.items() if deadline <= now]
        for fut, name in late:
            del waiting[fut]
            if not fut.done():
                fut.set_exception(StorageUnavailable(
                    f"cassandra {name}: no answer in {self._timeout:g} s (the write may still land)"))
        if waiting:
            self.loop.call_later(self.SWEEP_S, self._sweep)
        else:
            self._sweeping = False

    def put(self, fut: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None) -> None:
        with self._lock:
            self._pending.append((fut, rows, exc))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _hand_over(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for fut, rows, exc in pending:
            _settle(fut, rows, exc)


class _FanOutFailed(Exception):
    """Some members' inbox entries of a message were not written: the first failure, and the
    members whose entry was."""

    def __init__(self, error: BaseException, written: frozenset[str]) -> None:
        super().__init__(str(error))
        self.error, self.written = error, written


# Cassandra's answers that the request itself is wrong (syntax, unauthorized, invalid,
# configuration, already exists) or the client is (protocol, credentials): no retry changes them
_FINAL_CODES = frozenset({0x000A, 0x0100, 0x2000, 0x2100, 0x2200, 0x2300, 0x2400})


def _worth_writing_again(exc: BaseException) -> bool:
    """Whether a write that failed may land if written again: Cassandra or the connection did
    not answer, or answered that it could not now (unavailable, overloaded, timed out). Not a
    write Cassandra refused as wrong, nor one whose values could not be bound."""
    from cassandra import AuthenticationFailed, RequestValidationException
    from cassandra.protocol import ErrorMessage

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (CqlError, ErrorMessage)):  # (the driver's, for codes it has no exception of)
            return cause.code not in _FINAL_CODES
        if isinstance(cause, (RequestValidationException, AuthenticationFailed)):
            return False
        if isinstance(cause, (TypeError, ValueError, OverflowError, struct.error)):  # binding
            return False
        cause = cause.__cause__
    return True


def _wire_failure(name: str, exc: BaseException, *, read: bool) -> StorageError | None:
    """What a statement's failure on the loop's own connection means for its caller: None when
    the driver is to run it instead (the server had forgotten the prepared statement, or a read
    lost its connection: a read changes nothing), else the error to give."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, CqlError):
        return None if exc.code == ERROR_UNPREPARED else StorageUnavailable(f"cassandra {name}: {exc}")
    if isinstance(exc, ConnectionError):
        return None if read else StorageUnavailable(f"cassandra {name}: {exc} (the write may still land)")
    return StorageUnavailable(f"cassandra {name}: {type(exc).__name__}: {exc}")


def _log_write_failure(name: str, exc: BaseException) -> BaseException:
    """What a key log's write that failed on the loop's own connection tells the log: the error
    for its callers, or WriteAgain when the ordinary way is to run it (None from _wire_failure)."""
    return _wire_failure(name, exc, read=False) or WriteAgain(f"cassandra {name}: {exc}")


def _settle(fut: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(rows or [])
