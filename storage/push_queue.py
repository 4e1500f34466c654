"""The durable queue of push wakes, one per device at most.

A *wake* is the promise to push one device: it is added when an inbox event reaches a user none
of whose devices is connected, and it covers every later event of that user until it is sent
(a burst of messages makes one wake, not one each). A device woken less than the coalescing
window ago gets its next wake only when that window has passed.

Chosen like the other backends: with a Redis URL the queue is a sorted set and a hash per wake
in Redis (:mod:`storage.push_queue_redis`, shared by every bridge of a deployment); without,
it is a table in a SQLite file of its own in the data directory (:class:`SqlitePushQueue`).
Either survives a restart of the bridge. Errors are :class:`storage.base.StorageUnavailable`.

Every method takes the time from its caller (milliseconds), so expiry is tested with a clock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from .base import StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PushJob:
    """A wake as claimed by a worker."""

    device_id: str
    user_id: str
    event_ms: int  # when the first inbox event it covers happened
    events: int  # how many inbox events it covers
    messages: int  # how many of them are messages (a wake covering none is not urgent)
    attempts: int  # failed attempts so far
    give_up_ms: int  # when it is dropped if still not accepted
    claim: str  # this claim's token: ``retry`` and ``done`` act only while it is the wake's latest


class PushQueue(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def schedule(self, user_id: str, device_ids: Sequence[str], *, event_ms: int, events: int,
                       messages: int, now_ms: int, window_ms: int, give_up_ms: int) -> int:
        """A wake for each device, covering ``events`` inbox events of which ``messages`` are
        messages. Where one is pending, it covers these events as well and
        keeps its due time; otherwise one is added, due now, or when the window of the device's
        last push has passed. Returns the earliest due time among these devices' wakes."""

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[PushJob]:
        """Up to ``limit`` wakes due by ``now_ms``, oldest first, each with a new claim token.
        Each is hidden for ``lease_ms``: a worker that dies holding one hands it on to whoever
        claims after that (and its claim is void from then on)."""

    async def retry(self, job: PushJob, due_ms: int) -> None:
        """The attempt failed; try again at ``due_ms`` (one attempt more is counted). Does
        nothing unless ``job.claim`` is still the wake's claim (it was not claimed again)."""

    async def done(self, job: PushJob, *, pushed: bool, now_ms: int, window_ms: int, give_up_ms: int) -> None:
        """The wake was accepted by the push service (``pushed``: the device's window starts
        now) or given up. Events that joined it after it was claimed stay pending in a new
        wake, due when the window has passed. Does nothing unless ``job.claim`` is still the
        wake's claim: a worker whose lease ran out must not finish the wake another one holds,
        or a newer wake of the device."""

    async def depth(self) -> int:
        """Wakes pending (in flight included)."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS push_wakes(
  device_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, pending INTEGER NOT NULL, event_ms INTEGER NOT NULL,
  events INTEGER NOT NULL, messages INTEGER NOT NULL DEFAULT 0,
  due_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, give_up_ms INTEGER NOT NULL,
  sent_ms INTEGER NOT NULL DEFAULT 0, claim TEXT);
CREATE INDEX IF NOT EXISTS push_wakes_due ON push_wakes(pending, due_ms);
"""


class SqlitePushQueue:
    """The queue as a table in its own SQLite file (WAL, synchronous=FULL), on one thread."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-queue")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            assert self._conn is not None, "push queue is not open"
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return out

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, job)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"push queue sqlite: {exc}") from exc

    async def open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)

        def setup() -> None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(push_wakes)")}
            if "claim" not in columns:  # a push.db made before claims had tokens
                conn.execute("ALTER TABLE push_wakes ADD COLUMN claim TEXT")
            if "messages" not in columns:  # ... or before wakes told messages from receipts: all urgent
                conn.execute("ALTER TABLE push_wakes ADD COLUMN messages INTEGER NOT NULL DEFAULT 0")
                conn.execute("UPDATE push_wakes SET messages=events")
            self._conn = conn

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, setup)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"push queue sqlite {self._path}: {exc}") from exc

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)

    async def schedule(self, user_id: str, device_ids: Sequence[str], *, event_ms: int, events: int,
                       messages: int, now_ms: int, window_ms: int, give_up_ms: int) -> int:
        def q(c: sqlite3.Connection) -> int:
            earliest: int | None = None
            for device in device_ids:
                row = c.execute("SELECT pending, due_ms, sent_ms FROM push_wakes WHERE device_id=?",
                                (device,)).fetchone()
                if row is not None and row[0]:
                    c.execute("UPDATE push_wakes SET events=events+?, messages=messages+? WHERE device_id=?",
                              (events, messages, device))
                    due = int(row[1])
                else:
                    sent = int(row[2]) if row is not None else 0
                    due = max(now_ms, sent + window_ms) if sent else now_ms
                    c.execute("INSERT OR REPLACE INTO push_wakes(device_id, user_id, pending, event_ms, events, "
                              "messages, due_ms, attempts, give_up_ms, sent_ms, claim) "
                              "VALUES(?,?,1,?,?,?,?,0,?,?,NULL)",
                              (device, user_id, event_ms, events, messages, due, give_up_ms, sent))
                earliest = due if earliest is None else min(earliest, due)
            return now_ms if earliest is None else earliest

        return await self._run(q)

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[PushJob]:
        def q(c: sqlite3.Connection) -> list[PushJob]:
            rows = c.execute("SELECT device_id, user_id, event_ms, events, messages, attempts, give_up_ms "
                             "FROM push_wakes WHERE pending=1 AND due_ms<=? ORDER BY due_ms LIMIT ?",
                             (now_ms, limit)).fetchall()
            jobs = [PushJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], uuid.uuid4().hex) for r in rows]
            c.executemany("UPDATE push_wakes SET due_ms=?, claim=? WHERE device_id=?",
                          [(now_ms + lease_ms, j.claim, j.device_id) for j in jobs])
            return jobs

        return await self._run(q)

    async def retry(self, job: PushJob, due_ms: int) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute("UPDATE push_wakes SET due_ms=?, attempts=attempts+1, claim=NULL "
                      "WHERE device_id=? AND pending=1 AND claim=?", (due_ms, job.device_id, job.claim))

        await self._run(q)

    async def done(self, job: PushJob, *, pushed: bool, now_ms: int, window_ms: int, give_up_ms: int) -> None:
        def q(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT events, sent_ms, messages FROM push_wakes "
                            "WHERE device_id=? AND pending=1 AND claim=?", (job.device_id, job.claim)).fetchone()
            if row is None:  # claimed again since (its lease ran out), or finished by whoever did
                return
            sent = now_ms if pushed else int(row[1])
            later = int(row[0]) - job.events
            if later > 0:  # events that came while it was in flight: a wake of their own
                due = max(now_ms, sent + window_ms) if sent else now_ms
                c.execute("UPDATE push_wakes SET events=?, messages=?, event_ms=?, due_ms=?, attempts=0, give_up_ms=?, "
                          "sent_ms=?, claim=NULL WHERE device_id=?",
                          (later, max(0, int(row[2]) - job.messages), now_ms, due, give_up_ms, sent, job.device_id))
            elif sent and now_ms - sent < window_ms:  # the window is still remembered
                c.execute("UPDATE push_wakes SET pending=0, events=0, sent_ms=?, claim=NULL WHERE device_id=?",
                          (sent, job.device_id))
            else:
                c.execute("DELETE FROM push_wakes WHERE device_id=?", (job.device_id,))
            # windows long past need no row
            c.execute("DELETE FROM push_wakes WHERE pending=0 AND sent_ms<?", (now_ms - window_ms,))

        await self._run(q)

    async def depth(self) -> int:
        def q(c: sqlite3.Connection) -> int:
            return int(c.execute("SELECT count(*) FROM push_wakes WHERE pending=1").fetchone()[0])

        return await self._run(q)


def open_push_queue(redis_url: str | None, data_dir: Path, namespace: str) -> PushQueue:
    """Redis when the deployment shares one (keys under ``namespace``: one per deployment),
    otherwise ``push.db`` in the data directory."""
    if redis_url:
        from .push_queue_redis import RedisPushQueue

        return RedisPushQueue(redis_url, namespace)
    return SqlitePushQueue(data_dir / "push.db")


__all__ = ["PushJob", "PushQueue", "SqlitePushQueue", "open_push_queue"]
