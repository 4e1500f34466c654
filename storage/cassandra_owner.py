"""One writer per key on Cassandra: partition leases with epochs, and each key's numbers kept in
memory by the process that holds its partition.

A chat's ``seq`` and a user's ``inbox`` position are numbered by one process at a time: the
holder of the key's partition (``partition_of(key)``, one of ``PARTITIONS``). The holder keeps
the key's head in memory, gives the next numbers out itself and writes the numbered rows with
plain (not conditional) writes. Consensus is paid once per partition and lease period, not per
message.

* **Leases.** A partition's lease is a row of ``leases`` (all in one Cassandra partition),
  written with ``IF NOT EXISTS`` and a TTL, renewed with a conditional update by its holder (all
  of a holder's leases in one conditional batch). Each grant carries an epoch, taken from
  ``owner_epochs`` by compare-and-set before the lease is claimed, so epochs only grow and are
  never handed out twice. The holder trusts its lease until ``sent + TTL - SAFETY_S`` on its own
  monotonic clock, where ``sent`` is when it *sent* the request that granted or renewed it: the
  replica's TTL starts later than that, so the holder's deadline always comes before the row
  can vanish. A paused holder wakes up past its deadline and writes nothing more.
* **Fences.** The first time a holder numbers a key under a new epoch, it writes a fence
  ``(key, epoch, after=-1)`` that hides every row of older epochs, reads the key's tail as it
  was (the highest rows and their senders' ids), and moves the fence to ``after=head``, all
  before any row of its own. Every row carries the epoch that wrote it. A reader drops rows of
  an older epoch numbered past the newest fence: a write a stale holder sent before its lease
  ran out but which landed late is either part of the tail read (and kept) or never seen by
  anyone, and the new holder's own row at that number replaces it (the first ``FULL_ROWS``
  numbers after a fence are written with every column, so nothing of the late row survives).
* **Order and failures.** A key's rows are written in number order, one batch at a time: a batch
  is every append that arrived while the previous batch was being written, numbered in arrival
  order and written as one unlogged batch per Cassandra partition. A failed write keeps its
  numbers and content: it is retried until it lands (or the lease is lost), and nothing is
  numbered past it before it does, so numbers never have a gap. Callers whose write failed are
  told the store is unavailable; their retries find the row once it has landed. Appends that
  come behind it wait ``QUEUED_WAIT_S`` at most, timed from their own arrival; then they are told
  the same: one still queued is dropped, unnumbered, one numbered into a retry keeps its number.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import StorageUnavailable
from .stopping import stop_tasks

log = logging.getLogger(__name__)

PARTITIONS = 16
LEASE_TTL_S = 6
RENEW_EVERY_S = 1.5
# TTLs count whole seconds on the replica's clock, from when the write reaches it.
SAFETY_S = 2.0
# How often a process looks for partitions without a holder (and for an unfair share).
SCAN_EVERY_S = 1.0
# Numbers right after a fence are written with every column set (see the module docstring).
FULL_ROWS = 1024
BATCH_MAX = 64
RECENT_IDS = 256  # per key: the latest (device, request id) -> seq, or (chat, seq) -> pos
RETRY_CAP_S = 1.0
# Once a write has failed, and until one lands, an append behind it waits at most this long from
# its arrival, then it is told the store is unavailable: one not yet numbered is dropped (nothing
# of it was numbered or stored); one numbered into a retry keeps its number, and the retry goes on.
# (Before this timer, one that arrived while a write was timing out was numbered into the retry
# and told only when that failed too: about 10 s, as long as a device waits for a reply.) A
# repeat that joins an append already numbered, and what waits behind a first attempt that has
# not failed yet, are told when that attempt ends (a statement times out after 5 s; a chat's write
# is its records, then its rows).
QUEUED_WAIT_S = 5.0
RELEASE_WAIT_S = 3.0

Run = Callable[..., Awaitable[list[Any]]]
RunTogether = Callable[[str, Sequence[Sequence[Any]]], Awaitable[list[Any]]]


def _trusted_until(sent: float) -> float:
    """Until when a lease granted or renewed by a request sent at ``sent`` is trusted (monotonic)."""
    return sent + LEASE_TTL_S - SAFETY_S


def partition_of(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


def chat_id_near(user_id: str, new_id: Callable[[], str], tries: int = 64 * PARTITIONS) -> str:
    """A new chat id whose numbering falls in ``user_id``'s partition (``c:{id}`` with ``u:{id}``):
    the bridge that takes that user's traffic numbers the chat too, so their sends to it are
    numbered without a request to another bridge. Any id is as valid as another; this only
    chooses among random ones (after ``tries`` misses, one of another partition)."""
    want = partition_of(f"u:{user_id}")
    cid = new_id()
    for _ in range(tries):
        if partition_of(f"c:{cid}") == want:
            return cid
        cid = new_id()
    return cid


class NotOwner(StorageUnavailable):
    """This process does not hold the partition of the key it was asked to number."""


@dataclass(slots=True)
class _Lease:
    epoch: int
    deadline: float  # monotonic


class Leases:
    """The partitions this process holds, kept, renewed and balanced with the other holders."""

    def __init__(self, run: Run, holder: str, *, clock: Callable[[], float] = time.monotonic,
                 on_lost: Callable[[int], None] | None = None,
                 quiesce: Callable[[int], Awaitable[None]] | None = None,
                 run_together: RunTogether | None = None) -> None:
        self._run = run
        self._run_together = run_together
        self._quiesce = quiesce
        self.holder = holder
        self._clock = clock
        self._held: dict[int, _Lease] = {}
        self._on_lost = on_lost or (lambda part: None)
        self._task: asyncio.Task[None] | None = None
        self._releasing: set[int] = set()
        self._release_tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()  # set whenever the held set changes

    # -- what callers ask -------------------------------------------------------------------------
    def epoch(self, part: int) -> int | None:
        """The epoch of a lease this process may still write under, or None."""
        lease = self._held.get(part)
        if lease is None or self._clock() >= lease.deadline or part in self._releasing:
            return None
        return lease.epoch

    def valid(self, part: int, epoch: int) -> bool:
        lease = self._held.get(part)
        return lease is not None and lease.epoch == epoch and self._clock() < lease.deadline

    def held(self) -> list[int]:
        return sorted(p for p in self._held if self.epoch(p) is not None)

    def leased(self, part: int) -> bool:
        """Whether this process's lease on ``part`` still stands, on its own clock: held, or
        being given back (no other process can take it before that ends)."""
        lease = self._held.get(part)
        return lease is not None and self._clock() < lease.deadline

    # -- running ----------------------------------------------------------------------------------
    async def start(self, wait_s: float = 10.0) -> None:
        """Take what is free, then keep leases in the background. Returns once the first round is
        done (a lone process holds every partition then)."""
        await self._round()
        self._task = asyncio.create_task(self._loop(), name="partition-leases")

    async def stop(self) -> None:
        await stop_tasks([*self._release_tasks, *([self._task] if self._task is not None else [])],
                         "stopping the partition leases")
        self._task = None
        # let the others take over at once; each lease counts as gone here before it is dropped
        held, self._held = self._held, {}
        for part, lease in held.items():
            try:
                await self._run("lease_drop", part, self.holder, lease.epoch)
            except StorageUnavailable:
                pass
        try:
            await self._run("gone", self.holder)
        except StorageUnavailable:
            pass  # it expires by itself

    async def _loop(self) -> None:
        next_scan = self._clock() + SCAN_EVERY_S * random.uniform(0.5, 1.5)
        while True:
            await asyncio.sleep(min(RENEW_EVERY_S, SCAN_EVERY_S) / 2)
            try:
                await self._renew_due()
                if self._clock() >= next_scan:
                    # Jittered: two processes taking the same free partitions in step can both miss
                    # them (each advanced an epoch, one took the lease, then found the other's newer
                    # epoch and gave it back); out of step, the next round settles it.
                    next_scan = self._clock() + SCAN_EVERY_S * random.uniform(0.5, 1.5)
                    await self._round()
            except StorageUnavailable as exc:
                log.warning("partition leases: %s", exc)
            except Exception:  # the lease loop must outlive any one failure
                log.exception("partition lease round failed")

    async def _renew_due(self) -> None:
        now = self._clock()
        due = [(p, lease) for p, lease in self._held.items()
               if lease.deadline - now <= LEASE_TTL_S - SAFETY_S - RENEW_EVERY_S]
        if len(due) > 1 and self._run_together is not None:
            # all of them in one conditional batch (the leases share one Cassandra partition): one
            # consensus round; if any was lost meanwhile nothing is applied, and each is tried alone
            sent = self._clock()
            try:
                rows = await self._run_together("lease_renew", [
                    (LEASE_TTL_S, self.holder, lease.epoch, p, self.holder, lease.epoch) for p, lease in due])
            except StorageUnavailable as exc:
                log.warning("renewing %d partitions at once failed: %s", len(due), exc)
                rows = []
            if rows and rows[0][0]:
                await asyncio.gather(*(self._renewed(p, lease, sent) for p, lease in due))
                return
        await asyncio.gather(*(self._renew(p, lease) for p, lease in due))

    async def _renew(self, part: int, lease: _Lease) -> None:
        sent = self._clock()
        try:
            rows = await self._run("lease_renew", LEASE_TTL_S, self.holder, lease.epoch, part, self.holder,
                                   lease.epoch)
        except StorageUnavailable as exc:
            log.warning("renewing partition %d failed: %s", part, exc)
            if self._clock() >= lease.deadline:
                self._lose(part)
            return
        if rows and rows[0][0]:
            await self._renewed(part, lease, sent)
        else:
            log.warning("partition %d was taken by another holder", part)
            self._lose(part)

    async def _renewed(self, part: int, lease: _Lease, sent: float) -> None:
        """The renewal sent at ``sent`` was granted. If the lease ran out while it was on its
        way, it is not taken up again under the same epoch: the key logs found it invalid
        meanwhile and gave up their writes, and one of those may still land. The partition is
        given back instead, and whoever takes it next (this process too) does so under a new
        epoch, whose fence hides such a write."""
        if self._clock() < lease.deadline:
            lease.deadline = _trusted_until(sent)
            return
        log.warning("partition %d: its lease ran out before its renewal was granted; giving it back", part)
        self._lose(part)
        try:
            await self._run("lease_drop", part, self.holder, lease.epoch)
        except StorageUnavailable:
            pass  # it expires by itself

    def _lose(self, part: int) -> None:
        if self._held.pop(part, None) is not None:
            self._on_lost(part)
            self.changed.set()

    async def _round(self) -> None:
        """Drop expired leases, take free partitions up to a fair share, give back extra ones."""
        for part in [p for p, lease in self._held.items() if self._clock() >= lease.deadline]:
            log.warning("lease of partition %d ran out", part)
            self._lose(part)
        # every live process says so (a row that expires with it), so a newcomer holding nothing
        # yet is counted in the fair share
        await self._run("alive", self.holder, LEASE_TTL_S)
        rows, alive = await asyncio.gather(self._run("leases"), self._run("bridges"))
        holders = {r[1] for r in rows if r[1]} | {r[0] for r in alive} | {self.holder}
        taken = {r[0]: r[1] for r in rows}
        share = -(-PARTITIONS // len(holders))
        free = [p for p in range(PARTITIONS) if p not in taken and p not in self._held]
        # Up to the share at once (one taken by another process meanwhile is replaced by the next)
        while free and len(self._held) < share:
            want = share - len(self._held)
            await self._take(free[:want])
            free = free[want:]
        extra = len(self._held) - share
        others_short = any(sum(1 for h in taken.values() if h == other) < share - 1
                           for other in holders - {self.holder})
        if extra > 0 and others_short:
            for part in sorted(self._held, reverse=True)[:extra]:
                self._release_soon(part)

    def _release_soon(self, part: int) -> None:
        """Give ``part`` back beside the lease loop: a release waits up to RELEASE_WAIT_S for the
        partition's work to finish (longer than the leases kept may go unrenewed: awaited in the
        round, one slow release once let every other lease run out)."""
        if part in self._releasing:
            return
        self._releasing.add(part)  # (at once: epoch() answers None from now on)
        self.changed.set()  # (the ingest gives up the partition's broker session now, not within 1 s)

        async def release() -> None:
            try:
                await self.release(part)
            except StorageUnavailable as exc:
                log.warning("giving back partition %d: %s", part, exc)  # its lease expires by itself
            finally:
                self._releasing.discard(part)

        task = asyncio.create_task(release(), name=f"release-p{part}")
        self._release_tasks.add(task)
        task.add_done_callback(self._release_tasks.discard)

    async def _take(self, parts: list[int]) -> None:
        """Take these free partitions. Each one's epoch is advanced first, all at once (each in a
        Cassandra partition of its own); then the leases of those whose epoch this process
        advanced are taken in one conditional batch (the leases share one Cassandra partition: one
        consensus round), or one by one if that batch did not apply (another process took one of
        them meanwhile). Taken one by one, three round trips each, a dead process's 8 partitions
        took 0.45 s on a loaded 2-core box (BENCHMARKS.md, 2026-12-05). A failure ends the takes
        of the round (the renewals wait behind it; the next round goes on): an insert without an
        answer may have applied, so a lease row naming this process and its epoch is then taken
        as its own, timed from when the insert was sent, and given back if that time has run out.

        A lease is kept only if its epoch is still the partition's newest once it is taken. The
        lease's insert checks only that no lease row stands: had another process advanced the
        epoch after this one did, taken the lease, written fences under its newer epoch and then
        died (its row expired) or given the partition back, this lease would carry an older epoch
        than those fences, and what was numbered under it would be hidden by them. The longer the
        wait between advancing an epoch and taking its lease, the likelier that is, and taking
        partitions together makes each wait for the slowest."""
        epochs = await asyncio.gather(*(self._next_epoch(p) for p in parts), return_exceptions=True)
        won = {p: e for p, e in zip(parts, epochs, strict=True) if isinstance(e, int)}
        failed: BaseException | None = next((e for e in epochs if isinstance(e, BaseException)), None)
        taken: dict[int, tuple[int, float]] = {}  # part -> (epoch, when its lease's insert was sent)
        unanswered: dict[int, float] = {}  # part -> when an insert that may have applied was sent
        batch = len(won) > 1 and self._run_together is not None
        if batch:
            assert self._run_together is not None
            sent = self._clock()
            try:
                rows = await self._run_together("lease_take", [(p, self.holder, e, LEASE_TTL_S)
                                                               for p, e in won.items()])
                if rows and rows[0][0]:
                    taken = {p: (e, sent) for p, e in won.items()}
            except StorageUnavailable as exc:
                failed = exc
                unanswered = dict.fromkeys(won, sent)
        if not batch or (not taken and failed is None):  # no batch, or one that did not apply
            for part, epoch in won.items():  # one by one, until one fails (the next round goes on)
                sent = self._clock()
                try:
                    rows = await self._run("lease_take", part, self.holder, epoch, LEASE_TTL_S)
                except StorageUnavailable as exc:
                    failed, unanswered[part] = exc, sent
                    break
                if rows and rows[0][0]:
                    taken[part] = (epoch, sent)
        if unanswered:
            # an insert without an answer may have applied: a row naming this holder and epoch is
            # this process's, its time counted from when the insert was sent
            try:
                standing = {int(r[0]): (r[1], int(r[2])) for r in await self._run("leases")}
            except StorageUnavailable:
                standing = {}  # such rows expire by themselves
            for part, sent in unanswered.items():
                if standing.get(part) == (self.holder, won[part]):
                    taken[part] = (won[part], sent)
        newest = await asyncio.gather(*(self._run("epoch_get", p) for p in taken), return_exceptions=True)
        for (part, (epoch, sent)), got in zip(taken.items(), newest, strict=True):
            if isinstance(got, BaseException):
                why = str(got)
            elif not got or got[0][0] is None or int(got[0][0]) != epoch:
                why = "its epoch moved on meanwhile"
            elif self._clock() >= _trusted_until(sent):
                why = "it ran out before it was confirmed"
            else:
                self._taken(part, epoch, sent)
                continue
            log.warning("partition %d: its lease at epoch %d is given back (%s)", part, epoch, why)
            try:
                await self._run("lease_drop", part, self.holder, epoch)
            except StorageUnavailable:
                pass  # it expires by itself
        if failed is not None:
            raise failed

    async def _next_epoch(self, part: int) -> int | None:
        """Advance the partition's epoch by compare-and-set: the new epoch, or None if another
        process advanced it first."""
        rows = await self._run("epoch_get", part)
        current = int(rows[0][0]) if rows and rows[0][0] is not None else 0
        cas = await self._run("epoch_next", current + 1, part, current) if current else \
            await self._run("epoch_first", part, 1)
        return current + 1 if cas and cas[0][0] else None

    def _taken(self, part: int, epoch: int, sent: float) -> None:
        self._held[part] = _Lease(epoch, _trusted_until(sent))
        log.info("holding partition %d at epoch %d", part, epoch)
        self.changed.set()

    async def release(self, part: int) -> None:
        """Give a partition back (to balance). New work for it goes to the partition's queue at
        once (``epoch`` answers None), which the next holder serves; what was already taken here
        is finished first, then the lease is dropped so the next holder can take it."""
        lease = self._held.get(part)
        if lease is None:
            return
        self._releasing.add(part)
        self.changed.set()
        try:
            if self._quiesce is not None:
                try:
                    async with asyncio.timeout(RELEASE_WAIT_S):
                        await self._quiesce(part)
                except TimeoutError:
                    log.warning("partition %d still busy after %.0f s; giving it back anyway", part,
                                RELEASE_WAIT_S)
            self._lose(part)
            await self._run("lease_drop", part, self.holder, lease.epoch)
            log.info("gave back partition %d", part)
        finally:
            self._releasing.discard(part)


@dataclass(slots=True)
class _Append:
    values: tuple[Any, ...]
    ident: Hashable | None
    waiters: list[asyncio.Future[tuple[int, bool]]] = field(default_factory=list)
    n: int = 0
    since: float = 0.0  # when it was queued (the loop's clock)


Write = Callable[[str, int, Sequence[tuple[int, tuple[Any, ...]]], bool], Awaitable[None]]
# The same write sent at once, its outcome given to the callback (None when it is stored) in the
# connection's own read of the answer; False when it cannot go that way (then ``Write`` does it).
WriteNow = Callable[[str, int, Sequence[tuple[int, tuple[Any, ...]]], bool,
                     Callable[[BaseException | None], None]], bool]


class WriteAgain(Exception):
    """A write sent at once did not go through that way (the server had forgotten the prepared
    statement): nothing failed, it is to be written again the ordinary way, now."""


class KeyLog:
    """The numbers of one key, given out by this process under one epoch of its partition.

    A write goes out at once when the log is idle and ``write_now`` can send it (on the store's
    own connection: a chat's records, then its rows from the records' answers): no task, and its
    answer settles the callers in the same turn of the loop that reads it. Everything else (a
    retry, a write the connection cannot take) is written by a task, one batch at a time; either
    way at most one write is in flight."""

    def __init__(self, key: str, part: int, epoch: int, head: int, fence: int,
                 recent: dict[Hashable, int], write: Write, leases: Leases,
                 write_now: WriteNow | None = None) -> None:
        self.key, self.part, self.epoch = key, part, epoch
        self.head = head  # highest number durably written (and every number below it)
        self._fence = fence
        self._recent: OrderedDict[Hashable, int] = OrderedDict(recent)
        self._write, self._leases, self._write_now = write, leases, write_now
        self._queue: list[_Append] = []
        self._stuck: list[_Append] = []  # numbered, not yet known to be written
        # ident -> its append until it is written: a repeat joins it rather than being told a
        # number that is not yet stored
        self._unwritten: dict[Hashable, _Append] = {}
        self._task: asyncio.Task[None] | None = None
        self._sending: list[_Append] | None = None  # the batch written at once, until its answer
        # from a failed write until one lands: the appends numbered into the retry being written,
        # and the timer that tells those (and the queued ones) that waited QUEUED_WAIT_S
        self._failing = False
        self._retrying: list[_Append] = []
        self._overdue: asyncio.TimerHandle | None = None
        self._idle: list[asyncio.Future[None]] = []  # settled() callers waiting for it
        self.dead = False

    async def settled(self) -> None:
        """Return once everything appended so far is written (or failed for good)."""
        while self.busy() and not self.dead:
            if self._sending is not None:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._idle.append(fut)
                await fut
            elif self._task is not None and not self._task.done():
                await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)
            else:
                return

    def remembers(self, ident: Hashable) -> bool:
        """Whether an append under ``ident`` is stored: written here or read back when the log
        opened (among the latest RECENT_IDS), and not still being written."""
        return ident in self._recent and ident not in self._unwritten

    def writing(self, ident: Hashable) -> bool:
        """Whether an append under ``ident`` is queued or being written here (not yet stored)."""
        return ident in self._unwritten

    def busy(self) -> bool:
        return bool(self._queue or self._stuck or self._sending is not None
                    or (self._task is not None and not self._task.done()))

    def append(self, values: tuple[Any, ...], ident: Hashable | None = None,
               fut: asyncio.Future[tuple[int, bool]] | None = None) -> asyncio.Future[tuple[int, bool]]:
        """Number ``values`` and write them; the future (``fut``, or a new one) gives (number,
        duplicate). An append whose ident was numbered before returns that number with
        duplicate=True once it is written."""
        loop = asyncio.get_running_loop()
        if fut is None:
            fut = loop.create_future()
        if self.dead:
            if not fut.done():
                fut.set_exception(NotOwner(f"{self.key}: partition {self.part} changed hands"))
            return fut
        if ident is not None:
            pending = self._unwritten.get(ident)
            if pending is not None:  # queued, being written or stuck: answered once it is written
                pending.waiters.append(fut)
                return fut
            n = self._recent.get(ident)
            if n is not None:
                if not fut.done():
                    fut.set_result((n, True))
                return fut
        item = _Append(values, ident, [fut], 0, loop.time())
        if ident is not None:
            self._unwritten[ident] = item
        self._queue.append(item)
        self._next()
        if self._failing and self._overdue is None:  # behind a failing write
            self._watch_overdue()
        return fut

    def _next(self) -> None:
        """Start the next write if none is in flight: at once when it can go that way, else in a task."""
        if self._sending is not None or (self._task is not None and not self._task.done()):
            return
        if not self._queue and not self._stuck:
            return
        if self._write_now is not None and not self._stuck:
            batch = self._take()
            if batch is None:
                return
            self._sending = batch  # before sending: the answer may come before write_now returns
            try:
                sent = self._write_now(self.key, self.epoch, *self._rows(batch),
                                       lambda exc: self._answered(batch, exc))
            except Exception:  # nothing is lost: the task writes it (twice at worst, the same rows)
                log.exception("writing %s at once failed; writing it the ordinary way", self.key)
                sent = False
            if sent:
                return
            self._sending = None
            self._stuck = batch  # numbered: the task writes them first
        self._task = asyncio.create_task(self._drain(), name=f"log-{self.key}")

    def _answered(self, batch: list[_Append], exc: BaseException | None) -> None:
        if batch is not self._sending:  # a write given up on (its send failed): the task wrote it
            return
        self._sending = None
        idle, self._idle = self._idle, []
        for fut in idle:
            if not fut.done():
                fut.set_result(None)
        if self.dead:  # its callers were failed when the partition went (kill)
            return
        if exc is None:
            if self._written(batch):
                self._next()
            return
        self._stuck = batch
        if isinstance(exc, WriteAgain):
            self._task = asyncio.create_task(self._drain(), name=f"log-{self.key}")
            return
        self._failed(batch, exc if isinstance(exc, Exception) else StorageUnavailable(str(exc)))
        self._task = asyncio.create_task(self._drain(first_wait=0.05), name=f"log-{self.key}")

    def _fail(self, items: Sequence[_Append], exc: Exception) -> None:
        for item in items:
            for w in item.waiters:
                if not w.done():
                    w.set_exception(exc)
            item.waiters = []

    def kill(self, reason: str) -> None:
        """The partition is gone: fail everything waiting here; the key is numbered elsewhere now."""
        self.dead = True
        # what is left to the task (stuck) has live callers when the connection could not take it
        # or asked for it again; numbers not yet written are given again by the next holder
        self._fail(list(self._unwritten.values()) + self._stuck + self._queue + (self._sending or []),
                   NotOwner(f"{self.key}: {reason}"))
        self._queue = []
        self._stuck = []
        self._failing = False
        self._retrying = []
        self._unwritten.clear()
        self._stop_overdue()

    def _take(self) -> list[_Append] | None:
        """The next batch to write: what is stuck (keeping its numbers), then new appends, numbered
        now. None when the lease has ended (everything waiting is failed)."""
        if not self._leases.valid(self.part, self.epoch):
            self.kill(f"lease of partition {self.part} ended")
            return None
        if self._stuck:
            self._expire_queued()
        # a failed batch is written again as it was, with new appends only up to the same bound:
        # it would grow at every retry (and a write past Cassandra's largest mutation would fail
        # every time)
        room = max(0, BATCH_MAX - len(self._stuck))
        fresh = self._queue[:room]
        del self._queue[:room]
        batch = self._stuck + fresh
        if self._failing:
            self._retrying = fresh
        n = self.head + len(self._stuck)
        for item in fresh:
            n += 1
            item.n = n
            if item.ident is not None:
                self._recent[item.ident] = n
                while len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
        return batch

    def _rows(self, batch: list[_Append]) -> tuple[list[tuple[int, tuple[Any, ...]]], bool]:
        """The batch's rows as the store writes them, and whether every column is written (the
        first FULL_ROWS numbers after the fence, where a late row of an old epoch may lie)."""
        return [(item.n, item.values) for item in batch], batch[0].n <= self._fence + FULL_ROWS

    def _failed(self, batch: list[_Append], exc: Exception) -> None:
        # the numbers stay bound to this content until it lands; nothing goes past them
        self._fail(batch, exc)
        self._failing = True
        self._retrying = []
        self._expire_queued()
        if self._overdue is None:
            self._watch_overdue()
        log.warning("writing %s %d..%d failed (%s); retrying", self.key, batch[0].n, batch[-1].n, exc)

    def _watch_overdue(self) -> None:
        """Time the next append to have waited QUEUED_WAIT_S behind the failing write: the oldest
        queued one, or the oldest of those numbered into the retry being written."""
        waiting = [item.since for item in (self._retrying[:1] + self._queue[:1]) if item.waiters]
        if not waiting:  # (an append that comes later times itself)
            return
        loop = asyncio.get_running_loop()
        self._overdue = loop.call_at(min(waiting) + QUEUED_WAIT_S, self._tell_overdue)

    def _stop_overdue(self) -> None:
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None

    def _tell_overdue(self) -> None:
        """Tell the callers who waited QUEUED_WAIT_S behind the failing write that the store is
        unavailable: a queued append is dropped, one numbered into the retry keeps its number (its
        row is written when the retry lands, and a repeat joins it)."""
        self._overdue = None
        if self.dead or not self._failing:  # written meanwhile: everyone was answered
            return
        self._expire_queued()
        cutoff = asyncio.get_running_loop().time() - QUEUED_WAIT_S
        i = 0
        while i < len(self._retrying) and self._retrying[i].since <= cutoff:  # numbered in arrival order
            i += 1
        overdue, self._retrying = self._retrying[:i], self._retrying[i:]
        self._fail(overdue, StorageUnavailable(f"{self.key}: waited {QUEUED_WAIT_S:g} s behind a failing write"))
        self._watch_overdue()

    def _expire_queued(self) -> None:
        """Appends that have waited QUEUED_WAIT_S behind a failing write are told the store is
        unavailable and dropped: they have no number yet, so nothing is left out of the order (a
        retry under the same ident appends anew)."""
        cutoff = asyncio.get_running_loop().time() - QUEUED_WAIT_S
        i = 0
        while i < len(self._queue) and self._queue[i].since <= cutoff:  # arrival order: the oldest first
            i += 1
        if not i:
            return
        gone, self._queue = self._queue[:i], self._queue[i:]
        for item in gone:
            if item.ident is not None:
                self._unwritten.pop(item.ident, None)
        self._fail(gone, StorageUnavailable(f"{self.key}: waited {QUEUED_WAIT_S:g} s behind a failing write"))

    def _written(self, batch: list[_Append]) -> bool:
        """The batch is stored: tell its callers. False if the lease ended meanwhile."""
        self._stuck = []
        if self._failing:
            self._failing = False
            self._retrying = []
        if self._overdue is not None:
            self._stop_overdue()
        self.head = batch[-1].n
        for item in batch:
            if item.ident is not None:
                self._unwritten.pop(item.ident, None)
        if not self._leases.valid(self.part, self.epoch):
            # written, but perhaps after a new holder read the tail: only a retry may tell
            self.kill(f"lease of partition {self.part} ended while writing")
            self._fail(batch, NotOwner(f"{self.key}: lease ended while writing"))
            return False
        for item in batch:
            for w in item.waiters:
                if not w.done():
                    w.set_result((item.n, False) if w is item.waiters[0] else (item.n, True))
        return True

    async def _drain(self, first_wait: float = 0.0) -> None:
        delay = 0.05
        if first_wait:
            await asyncio.sleep(first_wait)
            delay = min(RETRY_CAP_S, first_wait * 2)
        while (self._queue or self._stuck) and not self.dead:
            batch = self._take()
            if batch is None:
                return
            try:
                await self._write(self.key, self.epoch, *self._rows(batch))
            except Exception as exc:  # noqa: BLE001 - any failure keeps the numbers and tells the callers
                if not isinstance(exc, StorageUnavailable):
                    log.exception("writing %s failed unexpectedly", self.key)
                    exc = StorageUnavailable(f"{self.key}: {exc}")
                self._stuck = batch
                self._failed(batch, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_CAP_S, delay * 2)
                continue
            delay = 0.05
            if not self._written(batch):
                return


class LogCache:
    """The key logs of this process, bounded: an idle log is dropped first (its head is read
    again from the store when it is next needed)."""

    def __init__(self, limit: int = 50_000) -> None:
        self._logs: OrderedDict[str, KeyLog] = OrderedDict()
        self._limit = limit

    def get(self, key: str) -> KeyLog | None:
        """The key's log if one is open here and not dead (a dead one is replaced when next opened)."""
        got = self._logs.get(key)
        if got is None or got.dead:
            return None
        self._logs.move_to_end(key)
        return got

    def put(self, log_: KeyLog) -> None:
        self._logs[log_.key] = log_
        self._logs.move_to_end(log_.key)
        if len(self._logs) > self._limit:
            for key in list(self._logs)[: len(self._logs) - self._limit]:
                if not self._logs[key].busy():
                    del self._logs[key]

    def drop(self, key: str) -> None:
        self._logs.pop(key, None)

    def of_partition(self, part: int) -> list[KeyLog]:
        return [g for g in self._logs.values() if g.part == part]

    def __len__(self) -> int:
        return len(self._logs)
