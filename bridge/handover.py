"""What a bridge's requests left unfinished, handed to the next holder of the users' partitions.

When the store fails part way through a read or an ack, the receipt may have moved already
while its notice was not appended (or, for an ack, some chats' receipts were not moved): the
request's retry finds nothing left to move, and only the bridge that failed knows what is still
to be told (``Messenger._untold`` and ``_acks_unfinished``). With several bridges the retry
may reach another one, because the user's partition moved (a rebalance, a takeover) or the
bridge died. So each such entry is also recorded in the shared state under the user's
partition (under a field of the writing process's own), before the request is answered
``unavailable``, forgotten there once a retry has finished it (only the records of what that
retry took on: one another bridge wrote stays), and adopted by a bridge each time it connects
that partition's broker session, before it takes in any of its publishes (as the devices'
refusal windows are, ``bridge/admission.py``).

A record can also be written for a partition another bridge holds already: by a bridge still
handling the request when its lease ended (given back, or run out while it was paused). That
holder read the partition's records when it took it, perhaps before this one landed, so the
bridge that wrote it asks the holder to read them again before the request is answered: the
device's retry, which reaches the holder (device traffic follows the partitions), finds what
is left to tell there. The holder reads a partition's records once per ask at most, and asks
that come while it reads share the next read. An ask that fails is made again in the
background (``ASK_AGAIN_S``) until a holder answers, for about 80 s; past that the records
wait for the partition's next move.

One process writes a field's records one write at a time, each of the newest record made by
then (the later holds what is left to do then): two writes in flight at once could land in
either order, the earlier last. A record's write waits for the one before it, and each has its
own bound, so a request waits for two at most (a write that held its record and failed is not
made again for it).

A write can still land late: one given up on here (its bound ran out, Redis slow or paused) may
reach Redis after the next one, or after a retry forgot the record. So the records of a field
carry times that grow, Redis keeps a write only if it is later than what the field holds, and
forgetting a writer's own record leaves its time in the field (a mark) rather than nothing: what
lands later with an earlier time changes nothing (``SharedState.put_unfinished``,
``forget_unfinished``). Marks and records more than UNFINISHED_KEPT_MS old are dropped when a
partition is adopted, and by the holder's sweep of the partitions it holds (``sweep``, about
every SWEEP_S once it has adopted one), which takes nothing on: a partition held for long does
not pile them up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from string import hexdigits
from typing import TYPE_CHECKING

from cachetools import LRUCache

from storage.state import UNFINISHED_KEPT_MS, is_mark, record_time
from storage.stopping import stop_tasks

from .admission import HANDOVER_WAIT_S
from .messaging import UNTOLD_KEPT

if TYPE_CHECKING:
    from storage.state import SharedState

    from .messaging import Covered, Messenger, Record
    from .mqtt_ingest import AskHolder, Partitions

# Each process writes its records under its own field, the record's name, WRITER_MARK and the
# process's writer: two bridges failing the same request (one whose lease was ending) do not
# overwrite each other, and the holder adopts both. They go in a partition's records of their own
# (the scope with WRITER_MARK after it): bridges from before 2026-12-07 evening wrote the name alone,
# in the scope's, and drop a field they do not understand; a bridge now reads (and forgets) both.
WRITER_MARK, WRITER_LEN = "~", 8
ADOPT = "adopt_unfinished"  # the request asking a partition's holder to read its records again
# After an ask that failed (the holder slow, Redis and the direct connection failing), it is made
# again in the background after each of these pauses (about 80 s in all), until a holder answers
ASK_AGAIN_S = (1.0, 4.0, 15.0, 60.0)
# The holder of a partition drops its old records and marks about this often (``sweep``)
SWEEP_S = 3600.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Writes:
    """The records of one field this process made and is writing (``ReceiptHandover.keep``)."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # held by the write under way
    made: int = 0  # records made so far
    newest: str = ""  # the latest of them (its stored value)
    tried: int = 0  # the latest of them a write was started for (it held the ones before it too)
    written: int = 0  # the latest of them a write has landed
    users: int = 0  # the keeps waiting or writing


def _named(field: str) -> tuple[str, bool] | None:
    """A record's name from its field, and whether the field is a writer's own (the name, then
    WRITER_MARK and the writer) rather than the name alone; None when it is neither."""
    name, mark, writer = field.rpartition(WRITER_MARK)
    if not mark:
        return field, False
    if len(writer) == WRITER_LEN and all(c in hexdigits for c in writer):
        return name, True
    return None


class ReceiptHandover:
    """The ``Keeper`` of a bridge's Messenger, and what adopts a partition's records into it.

    Each record carries when it was written (ms since the epoch, then a space, then what the
    Messenger kept), or is the mark of a forgotten one (its time alone). One older than
    UNFINISHED_KEPT_MS, or one the Messenger cannot read, is dropped from the shared state when a
    partition is adopted (or swept), not adopted again each time."""

    def __init__(self, state: SharedState, partitions: Partitions, messenger: Messenger,
                 clock: Callable[[], float] = time.time, ask_holder: AskHolder | None = None) -> None:
        self._state, self._partitions, self._messenger = state, partitions, messenger
        self._clock, self._ask_holder = clock, ask_holder
        messenger.keeper = self
        # a partition's asks so far, and how many of them the latest read covers (it began after them)
        self._asked: dict[int, int] = {}
        self._read_through: dict[int, tuple[int, bool]] = {}
        self._reading: dict[int, asyncio.Lock] = {}
        # a partition's task asking its holder again, and how many failed asks it is to cover
        self._asking_again: dict[int, asyncio.Task[None]] = {}
        self._failed_asks: dict[int, int] = {}
        self._closed = False
        self._writer = secrets.token_hex(WRITER_LEN // 2)  # (this process's own records' mark)
        self._writing: dict[str, _Writes] = {}  # by field, while records of it are being written
        # the time of the latest record made here of a field (ms since the epoch), by its name, for
        # twice as many as the Messenger keeps entries of both kinds; a name pushed out starts from
        # the clock again, so its next record could be no later than its last (and refused) only
        # with a clock stepped back since, or with several of its records made within one ms
        self._stamps: LRUCache[str, int] = LRUCache(4 * UNTOLD_KEPT)
        self._sweeper: asyncio.Task[None] | None = None

    def record(self, name: str, value: str) -> Record:
        # (each of a field later than the one before: of two writes of it, the later one's stays)
        stamp = max(int(self._clock() * 1000), self._stamps.get(name, 0) + 1)
        self._stamps[name] = stamp
        return f"{name}{WRITER_MARK}{self._writer}", f"{stamp} {value}"

    def _scope_of(self, field: str) -> str:
        """The scope of the partition's records a field is in (a writer's own, or as before)."""
        named = _named(field)
        return self._partitions.partition_scope + (WRITER_MARK if named is not None and named[1] else "")

    async def forget(self, user_id: str, covered: Covered) -> None:
        part = -1
        try:
            part = self._partitions.partition_of_user(user_id)
            async with asyncio.timeout(HANDOVER_WAIT_S):
                for field, value in covered:  # (each compared, then forgotten, in Redis)
                    scope = self._scope_of(field)
                    if scope.endswith(WRITER_MARK):  # (a writer's own: marked, a write landing late is refused)
                        await self._state.forget_unfinished(scope, part, {field: value})
                    else:  # (written as before, by any process: only as it is)
                        await self._state.drop_unfinished(scope, part, {field: value})
        except Exception as exc:  # noqa: BLE001 - adopted again at a partition's move, and told as things stand
            log.warning("forgetting %d records of partition %d failed: %r", len(covered), part, exc)

    async def keep(self, user_id: str, record: Record) -> None:
        (name, stamped), part, landed = record, -1, False
        writes = self._writing.get(name)
        if writes is None:
            writes = self._writing[name] = _Writes()
        writes.users += 1
        loop = asyncio.get_running_loop()
        latest = loop.time() + 2 * HANDOVER_WAIT_S  # (the write before this one's, then this one's)
        try:
            part = self._partitions.partition_of_user(user_id)
            writes.made += 1
            mine, writes.newest = writes.made, stamped
            # One write of a field at a time, each of the newest record made by then (the later
            # holds what is left to do then): two in flight at once could land in either order,
            # the earlier last. So this waits for the write before it (bounded as this one is),
            # and is done when a write of this record or a later one has landed; one that held it
            # and failed is not made again for it (the request is answered all the same).
            async with writes.lock:
                deadline = min(loop.time() + HANDOVER_WAIT_S, latest)
                if writes.written < mine:
                    if writes.tried >= mine:
                        raise RuntimeError("the write that held it failed")
                    took, value = writes.made, writes.newest
                    writes.tried = took
                    async with asyncio.timeout(HANDOVER_WAIT_S):
                        await self._state.put_unfinished(self._scope_of(name), part, {name: value})
                    writes.written = took
            landed = True
            # Leased here now that it has landed (held, or being given back): a next holder
            # takes the partition only after that, and reads it then. Otherwise the holder
            # (if any: the next one reads it anyway) is asked.
            if self._ask_holder is not None and not self._partitions.leased_here(part):
                async with asyncio.timeout_at(deadline):
                    await self._ask_to_read(part)
        except Exception as exc:  # noqa: BLE001 - it is kept here all the same
            if landed:
                log.warning("asking the holder of partition %d to read %.200s failed: %r%s", part, name, exc,
                            "" if self._closed else " (asked again later)")
                self._ask_again(part)
            else:
                log.warning("recording %.200s of partition %d failed: %r", name, part, exc)
        finally:
            writes.users -= 1
            if not writes.users:
                del self._writing[name]

    async def _ask_to_read(self, part: int) -> None:
        """Ask the partition's holder to read its records again; raises if it refuses."""
        assert self._ask_holder is not None
        reply = await self._ask_holder(part, {"kind": ADOPT, "part": part}, HANDOVER_WAIT_S)
        if "error" in reply:
            raise RuntimeError(f"the holder answered: {reply['error']}")

    def _ask_again(self, part: int) -> None:
        """Ask the partition's holder again in the background: one task per partition, which asks
        until an ask made after this failed one is answered (a holder's read covers every record
        that landed before the ask reached it)."""
        if self._closed:
            return
        self._failed_asks[part] = self._failed_asks.get(part, 0) + 1
        task = self._asking_again.get(part)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._asking(part), name=f"ask-holder-p{part}")
            self._asking_again[part] = task
            task.add_done_callback(functools.partial(self._ask_done, part))

    def _ask_done(self, part: int, task: asyncio.Task[None]) -> None:
        if self._asking_again.get(part) is task:
            del self._asking_again[part]

    async def _asking(self, part: int) -> None:
        step = 0
        while step < len(ASK_AGAIN_S):
            await asyncio.sleep(ASK_AGAIN_S[step])
            step += 1
            failed = self._failed_asks.get(part, 0)
            try:
                if self._partitions.leased_here(part):
                    return  # (taken here since: its records were read when its session connected)
                async with asyncio.timeout(HANDOVER_WAIT_S):
                    await self._ask_to_read(part)
            except Exception:  # noqa: BLE001 - asked again after the next pause (a refusal too)
                continue
            if self._failed_asks.get(part, 0) == failed:
                return
            step = 0  # (another ask failed meanwhile, perhaps for a record this one did not cover)
        log.warning("the holder of partition %d could not be asked to read its records again: they are "
                    "adopted when the partition next moves", part)

    async def close(self) -> None:
        """Stop asking holders (what was not asked waits for the partitions' next moves), and
        sweeping."""
        self._closed = True
        await stop_tasks(list(self._asking_again.values()), "stopping the asks of partitions' holders")
        if self._sweeper is not None:
            await stop_tasks([self._sweeper], "stopping the sweep of partitions' records")

    async def serve_adopt(self, request: dict[str, object]) -> dict[str, object]:
        """Another bridge recorded something for a partition held here (see the module's text)."""
        part = request.get("part")
        if not isinstance(part, int) or isinstance(part, bool) or part not in self._partitions.held_partitions():
            return {"error": f"partition {part!r:.100} is not held here"}
        asked = self._asked[part] = self._asked.get(part, 0) + 1
        async with self._reading.setdefault(part, asyncio.Lock()):
            through, read = self._read_through.get(part, (0, False))
            if through < asked:  # (else a read that began after this ask came has been made)
                through = self._asked[part]
                read = await self.adopt(part)
                self._read_through[part] = (through, read)
        return {"ok": True} if read else {"error": f"partition {part}'s records could not be read"}

    async def adopt(self, part: int) -> bool:
        """Adopt what was recorded for a partition (its session is being connected here, or
        another bridge asked); False when the records could not be read."""
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweeping(), name="sweep-handover-records")
        read = await self._read(part)
        if read is None:
            return False
        current, dropped = read
        for field in self._messenger.adopt_unfinished(current):
            dropped.setdefault(self._scope_of(field), {})[field] = current[field][2]
        await self._drop(part, dropped)
        return True

    async def sweep(self, part: int) -> None:
        """Drop what adopting the partition would drop without reading it (records and marks more
        than a day old, or ahead), and adopt nothing: a partition held for long (marks and
        records whose retry never came would otherwise stay until it moves)."""
        read = await self._read(part)
        if read is not None:
            await self._drop(part, read[1])

    async def _sweeping(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S * random.uniform(0.75, 1.25))  # noqa: S311 - (spread, not secret)
            try:
                for part in sorted(self._partitions.held_partitions()):
                    await self.sweep(part)
            except Exception:  # noqa: BLE001 - swept again the next time
                log.exception("sweeping the partitions' records failed")

    async def _read(self, part: int) -> tuple[dict[str, tuple[str, str, str]], dict[str, dict[str, str]]] | None:
        """A partition's records: those to adopt, by field (name, what was kept, value as stored),
        and those to drop, by scope (the value as read); None when they could not be read."""
        scope = self._partitions.partition_scope
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                # (the writers' own records, and those written as before: see WRITER_MARK)
                recorded = {s: await self._state.unfinished(s, part) for s in (scope + WRITER_MARK, scope)}
        except Exception as exc:  # noqa: BLE001 - taken over without them (or swept the next time)
            log.warning("reading the unfinished requests of partition %d failed: %r", part, exc)
            return None
        now = int(self._clock() * 1000)
        current: dict[str, tuple[str, str, str]] = {}
        dropped: dict[str, dict[str, str]] = {}
        for in_scope, records in recorded.items():
            for field, stamped in records.items():
                # (a time of ASCII digits, as written: int() takes others, and one far ahead would never age)
                written, named = record_time(stamped), _named(field)
                young = written is not None and abs(int(written) - now) <= UNFINISHED_KEPT_MS
                if young and is_mark(stamped):
                    continue  # (what a forgotten record left: kept while a late write of it could land)
                if young and named is not None and in_scope == self._scope_of(field):
                    current[field] = (named[0], stamped.partition(" ")[2], stamped)
                else:
                    dropped.setdefault(in_scope, {})[field] = stamped
        return current, dropped

    async def _drop(self, part: int, dropped: dict[str, dict[str, str]]) -> None:
        for in_scope, fields in dropped.items():
            try:
                async with asyncio.timeout(HANDOVER_WAIT_S):
                    # (only as they were read: one another bridge has written again since stays)
                    await self._state.drop_unfinished(in_scope, part, fields)
            except Exception as exc:  # noqa: BLE001 - dropped the next time
                log.warning("dropping %d old or unreadable records of partition %d failed: %r", len(fields),
                            part, exc)
