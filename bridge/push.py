"""Push notifications (protocol section 7): who is woken, when, and what becomes of a wake.

The message path only *notes* inbox events (:meth:`Pusher.note`, a dictionary update: no
I/O). Everything else happens here, apart from it, in two loops of one task group:

- **decide**: as soon as the message path yields, the users noted since the last decision are
  looked up in the shared presence state in one step (one Redis round trip for all of them, or
  none in-process; notes that arrive meanwhile wait for the next step, so under load one round
  trip covers many events), which is as close to the event as presence can be read; for
  each user with no device online, each of their devices with a push target gets a wake in the
  durable queue (:mod:`storage.push_queue`), which coalesces: a device has at most one wake
  pending, covering every event until it is sent, and a device woken less than the window ago
  gets its next wake when the window has passed. Users online cost nothing more.
- **deliver**: due wakes are claimed (a lease: a bridge that dies holding one hands it on),
  the user's presence is checked again (a user who came back meanwhile is not pushed), and
  each is sent by its device's provider (:mod:`bridge.push_providers`), a bounded number at a
  time (no more are claimed than can be sent at once), each within ``SEND_TIMEOUT_S``.
  Accepted: done. Gone (as the provider's service says it): the device's target is deleted.
  429/5xx/network failures and timeouts: retried with capped, jittered exponential backoff,
  never sooner than ``Retry-After``, and dropped once ``push_max_age_s`` has passed since the
  first event it covers. Anything else, an unexpected exception included: dropped, logged.

A user whose last device goes offline (:meth:`Pusher.went_offline`, told by presence) is
decided like a noted one, for every inbox event no device of theirs acknowledged: events that
reached a dead connection presence still counted as online are woken for then.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cachetools import TTLCache

from storage.base import Device, Message, StorageUnavailable, Store
from storage.push_queue import PushJob, PushQueue
from storage.state import SharedState

from .clock import Clock
from .errors import BadRequest, Forbidden
from .handling import Caller, storage_errors
from .metrics import Metrics
from .push_providers import SEND_TIMEOUT_S, Outcome, Provider, Wake

log = logging.getLogger(__name__)
POLL_S = 0.5  # the queue is looked at this often when nothing was scheduled here (retries, other bridges)
LEASE_S = 60.0  # a claimed wake stays hidden this long (longer than any send may take: SEND_TIMEOUT_S)
CLAIM_BATCH = 64
DECIDE_PARALLEL = 32  # offline users whose targets are read and wakes queued at the same time
# Decisions are taken at most this often: the notes of every message in between are decided
# together, with one presence read. Deciding after every turn of the loop that carried a message
# read presence from Redis several hundred times a second at a few hundred messages a second
# (BENCHMARKS.md, 2026-12-02, mid-morning). The pause after a decision grows with the users it
# read, up to DECIDE_MAX_S: every 20 ms, a group of 100 under load had its members' presence read
# 50 times a second, 7.5 % of the bridge's samples (2026-12-05, later). A pause keeps short where
# decisions are small, since a message to a user whose last device leaves within it is pushed.
DECIDE_EVERY_S = 0.02
DECIDE_PER_USER_S = 0.0004  # 200 users (two busy groups of 100): the longest pause
DECIDE_MAX_S = 0.1


def decide_pause_s(users: int) -> float:
    """How long the decide loop waits after a decision that read ``users`` users' presence."""
    return min(DECIDE_MAX_S, DECIDE_EVERY_S + DECIDE_PER_USER_S * users)
PARALLEL_SENDS = 64
RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
UNACKED_READ = 200  # inbox entries read, at most, when a user goes offline with some unacknowledged
TARGETS_TTL_S = 5.0  # a user's devices with targets, as read, are trusted this long by this process
PROVIDERS = ("webpush", "fcm", "apns", "webhook")


def backoff_s(attempts: int, rng: random.Random) -> float:
    """Exponential from RETRY_BASE_S, capped at RETRY_CAP_S, with the upper half jittered."""
    full = min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(attempts, 20))
    return float(full / 2 + rng.random() * full / 2)


@dataclass(frozen=True, slots=True)
class Note:
    """Inbox events noted for a user and not yet decided."""

    first_ms: int  # when the first of them happened
    events: int
    messages: int  # how many of them are messages (the rest are receipts)

    def plus(self, other: Note) -> Note:
        return Note(min(self.first_ms, other.first_ms), self.events + other.events, self.messages + other.messages)


class PushTargets:
    """The HTTP routes' handler: a device registers or removes where it is woken."""

    def __init__(self, store: Store, providers: Mapping[str, Provider], vapid_public_key: str, *, dev: bool,
                 on_change: Callable[[str], None] | None = None) -> None:
        self._store = store
        self._providers = providers
        self._dev = dev
        self.vapid_public_key = vapid_public_key
        self._on_change = on_change  # called with the user id when a target changes here

    def _own(self, caller: Caller, device_id: str) -> None:
        if device_id != caller.device_id:
            raise Forbidden("a device may only set its own push target")

    async def set(self, caller: Caller, device_id: str, provider: object, token: object) -> Device:
        self._own(caller, device_id)
        if not isinstance(provider, str) or provider not in PROVIDERS:
            raise BadRequest(f"'provider' must be one of {', '.join(PROVIDERS)}")
        chosen = self._providers.get(provider)
        if chosen is None:
            flag = {"fcm": "--fcm-credentials-file", "apns": "--apns-key-file"}.get(provider, "")
            raise BadRequest(f"this server has no {provider} credentials ({flag}); it cannot wake {provider} devices")
        stored = chosen.check(token, self._dev)
        async with storage_errors():
            device = await self._store.set_push_target(device_id, provider, stored)
        if self._on_change is not None:
            self._on_change(caller.user_id)
        log.info("device %s will be woken by %s", device_id, provider)
        return device

    async def clear(self, caller: Caller, device_id: str) -> bool:
        self._own(caller, device_id)
        async with storage_errors():
            removed = await self._store.clear_push_target(device_id)
        if self._on_change is not None:
            self._on_change(caller.user_id)
        return removed

    async def devices(self, caller: Caller) -> list[Device]:
        async with storage_errors():
            return await self._store.user_devices(caller.user_id)


class Pusher:
    """Decides and sends pushes; ``run`` until ``stopping`` is set."""

    def __init__(self, store: Store, state: SharedState, queue: PushQueue, providers: Mapping[str, Provider],
                 clock: Clock, metrics: Metrics, *, window_s: float, max_age_s: int,
                 rng: random.Random | None = None, send_timeout_s: float = SEND_TIMEOUT_S,
                 parallel_sends: int = PARALLEL_SENDS) -> None:
        self._store = store
        self._state = state
        self._queue = queue
        self._providers = providers
        self._clock = clock
        self._metrics = metrics
        self._window_ms = int(window_s * 1000)
        self._max_age_ms = max_age_s * 1000
        self._rng = rng or random.Random()
        self._notes: dict[str, Note] = {}  # user -> what was noted since the last decision
        self._gone: set[str] = set()  # users whose last device went offline, not yet decided
        self._noted = asyncio.Event()
        self._due = asyncio.Event()
        self._targets: TTLCache[str, tuple[str, ...]] = TTLCache(maxsize=200_000, ttl=TARGETS_TTL_S)
        self._in_flight = 0  # sends running: no more are claimed than can start at once
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()  # the server's, once run
        self._send_timeout_s = send_timeout_s
        self._parallel = parallel_sends

    # -- from the message path -------------------------------------------------------------------------
    def note(self, user_ids: Sequence[str], ts_ms: int, *, message: bool) -> None:
        """An inbox event (a message, or a receipt) reached each of these users (no I/O: decided
        once the message path yields)."""
        for u in user_ids:
            self._notes[u] = self._notes.get(u, Note(ts_ms, 0, 0)).plus(Note(ts_ms, 1, int(message)))
        if user_ids:
            self._noted.set()

    def went_offline(self, user_id: str) -> None:
        """The user's last device went offline (its ``presence offline``, or its will: a
        connection lost or silent past 1.5 keepalives). Events that came while presence still
        counted it online were not pushed; what the user has not acknowledged is woken for
        now (no I/O here: decided with the notes)."""
        self._gone.add(user_id)
        self._noted.set()

    def forget_targets(self, user_id: str) -> None:
        """A target of the user changed here: read their devices afresh."""
        self._targets.pop(user_id, None)

    # -- loops ---------------------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._wake_on_stop(stopping), name="push-stop")
            tg.create_task(self._decide_loop(stopping), name="push-decide")
            tg.create_task(self._deliver_loop(stopping, tg), name="push-deliver")

    async def _wake_on_stop(self, stopping: asyncio.Event) -> None:
        """Once stopping, every wait of the loops ends (they look at ``stopping`` when woken)."""
        await stopping.wait()
        for event in (self._noted, self._due, self._slot_free):
            event.set()

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Until ``event`` is set, ``timeout`` passes or the pusher stops: one wait, no task (the
        decide loop waits once per step, and a step comes with every turn that carried messages)."""
        if self._stopping.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    async def _decide_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._wait(self._noted, None)
            if stopping.is_set():
                return
            self._noted.clear()
            notes, self._notes = self._notes, {}
            gone, self._gone = self._gone, set()
            try:
                postponed, gone_again = await self._decide(notes, gone)
            except StorageUnavailable as exc:  # presence unreadable: every user is decided again
                log.warning("push decision postponed: %s", exc)
                postponed, gone_again = dict(notes), gone
            except Exception:
                log.exception("push decision failed")
                continue
            if postponed or gone_again:  # nothing is lost: these users are decided again in a moment
                for u, note in postponed.items():
                    self._notes[u] = note.plus(self._notes[u]) if u in self._notes else note
                self._gone |= gone_again
                self._noted.set()
                await self._wait(stopping, 1.0)
            else:
                await self._wait(stopping, decide_pause_s(len(notes.keys() | gone)))

    async def _decide(self, notes: Mapping[str, Note], gone: set[str]) -> tuple[dict[str, Note], set[str]]:
        """Queue the wakes of the noted users who are offline, and of the users who went offline
        with events they had not acknowledged; return those whose wakes could not be queued
        (the store or the queue was unavailable)."""
        if not notes and not gone:
            return {}, set()
        online = await self._state.online_users(sorted(notes.keys() | gone))
        now = self._clock.now_ms()
        slots = asyncio.Semaphore(DECIDE_PARALLEL)
        postponed: dict[str, Note] = {}
        gone_again: set[str] = set()

        async def wake(user: str, noted: Note | None) -> None:
            note = noted
            async with slots:
                try:
                    if user in gone:  # all it has not acknowledged: the events noted just now included
                        note = await self._unacknowledged(user, now) or noted
                    if note is None:
                        return
                    devices = await self._with_targets(user)
                    if not devices:
                        return
                    due = await self._queue.schedule(user, devices, event_ms=note.first_ms, events=note.events,
                                                     messages=note.messages, now_ms=now, window_ms=self._window_ms,
                                                     give_up_ms=note.first_ms + self._max_age_ms)
                except StorageUnavailable as exc:
                    log.warning("wake for %s postponed: %s", user, exc)
                    if noted is not None:
                        postponed[user] = noted
                    if user in gone:
                        gone_again.add(user)
                    return
            log.debug("wake for %s scheduled (%d devices, due in %d ms)", user, len(devices), due - now)
            if due <= now:
                self._due.set()

        await asyncio.gather(*(wake(u, notes.get(u)) for u in notes.keys() | gone if u not in online))
        return postponed, gone_again

    async def _unacknowledged(self, user: str, now: int) -> Note | None:
        """The inbox events of the user no device has acknowledged, as a note (``None`` if there
        are none but the user's own messages). At most UNACKED_READ entries are looked at to
        tell messages from receipts; past those, every event is counted as a message."""
        acked, head = await self._store.inbox_positions(user)
        if head <= acked:
            return None
        entries = await self._store.read_inbox(user, acked, min(head - acked, UNACKED_READ))
        own = sum(1 for e in entries if isinstance(e.item, Message) and e.item.sender == user)
        receipts = sum(1 for e in entries if not isinstance(e.item, Message))
        events = head - acked - own
        return Note(now, events, events - receipts) if events > 0 else None

    async def _with_targets(self, user: str) -> tuple[str, ...]:
        hit = self._targets.get(user)
        if hit is not None:
            return hit
        devices = await self._store.user_devices(user)
        found = tuple(d.device_id for d in devices if d.push_provider)
        self._targets[user] = found
        return found

    async def _deliver_loop(self, stopping: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        while not stopping.is_set():
            free = min(CLAIM_BATCH, self._parallel - self._in_flight)
            if free <= 0:  # a claimed wake's lease runs from its claim: claim none that must wait
                self._slot_free.clear()
                await self._wait(self._slot_free, None)
                continue
            self._due.clear()
            online: set[str] = set()
            try:
                jobs = await self._queue.claim(self._clock.now_ms(), int(LEASE_S * 1000), free)
                if jobs:
                    online = await self._state.online_users(sorted({j.user_id for j in jobs}))
            except StorageUnavailable as exc:
                log.warning("push queue unavailable: %s", exc)
                await self._wait(stopping, 1.0)
                continue
            except Exception:  # pushes must never take the server down
                log.exception("claiming pushes failed; trying again shortly")
                await self._wait(stopping, 1.0)
                continue
            for job in jobs:
                if job.user_id in online:  # came back meanwhile: the connection carries everything
                    await self._finish(job, pushed=False)
                    continue
                self._in_flight += 1
                tg.create_task(self._deliver(job), name=f"push-{job.device_id}")
            if len(jobs) < free:
                await self._wait(self._due, POLL_S)

    async def _finish(self, job: PushJob, *, pushed: bool) -> None:
        now = self._clock.now_ms()
        try:
            await self._queue.done(job, pushed=pushed, now_ms=now, window_ms=self._window_ms,
                                   give_up_ms=now + self._max_age_ms)
        except StorageUnavailable as exc:  # the lease runs out and it is claimed again
            log.warning("push queue unavailable finishing %s: %s", job.device_id, exc)

    async def _deliver(self, job: PushJob) -> None:
        try:
            await self._send(job)
        except Exception:  # not left to be claimed again after the lease, and fail again, forever
            log.exception("push to %s failed unexpectedly; dropped", job.device_id)
            await self._finish(job, pushed=False)
        finally:
            self._in_flight -= 1
            self._slot_free.set()

    async def _send(self, job: PushJob) -> None:
        m = self._metrics
        try:
            device = await self._store.get_device(job.device_id)
        except StorageUnavailable as exc:
            log.warning("push to %s postponed: %s", job.device_id, exc)
            return  # claimed again when the lease runs out
        if device is None or not device.push_provider or not device.push_token:
            await self._finish(job, pushed=False)  # unlinked, or its target removed, meanwhile
            return
        name, token = device.push_provider, device.push_token
        provider = self._providers.get(name)
        if provider is None:  # registered while this server had the provider's credentials
            m.push_dropped.labels(name, "no_credentials").inc()
            await self._finish(job, pushed=False)
            return
        now = self._clock.now_ms()
        if job.give_up_ms <= now:  # claimed again and again past its age (e.g. leases that ran out)
            log.warning("push to %s dropped: older than the push max age", job.device_id)
            m.push_dropped.labels(name, "expired").inc()
            await self._finish(job, pushed=False)
            return
        wake = Wake(events=job.events, ttl_s=max(0, (job.give_up_ms - now) // 1000), urgent=job.messages > 0)
        outcome = await self._attempt(provider, token, wake)
        if outcome.kind == "accepted":
            m.push_sent.labels(name).inc()
            m.push_delay.labels(name).observe(max(0, self._clock.now_ms() - job.event_ms) / 1000)
            log.debug("woke %s by %s", job.device_id, name)
            await self._finish(job, pushed=True)
            return
        m.push_failed.labels(name, _reason(outcome)).inc()
        if outcome.kind == "gone":
            log.info("%s dropped the push target of %s (%s); deleting it", name, job.device_id, outcome.status)
            try:
                await self._store.clear_push_target(job.device_id, token)
            except StorageUnavailable as exc:
                log.warning("push target of %s not deleted: %s", job.device_id, exc)
            self._targets.pop(job.user_id, None)
            m.push_dropped.labels(name, "gone").inc()
            await self._finish(job, pushed=False)
        elif outcome.kind == "retry":
            delay = backoff_s(job.attempts, self._rng)
            if outcome.retry_after_s is not None:
                delay = max(delay, outcome.retry_after_s)
            due = now + int(delay * 1000)
            if due > job.give_up_ms:
                log.warning("push to %s dropped: still failing after %d attempts (%s)", job.device_id,
                            job.attempts + 1, outcome.detail or outcome.status)
                m.push_dropped.labels(name, "expired").inc()
                await self._finish(job, pushed=False)
                return
            log.info("push to %s by %s failed (%s); retrying in %.1f s", job.device_id, name,
                     outcome.status or outcome.detail, delay)
            try:
                await self._queue.retry(job, due)
            except StorageUnavailable as exc:
                log.warning("push retry of %s not recorded: %s", job.device_id, exc)
        else:
            log.warning("%s refused the push to %s: %s %s", name, job.device_id, outcome.status, outcome.detail)
            m.push_dropped.labels(name, "rejected").inc()
            await self._finish(job, pushed=False)

    async def _attempt(self, provider: Provider, token: str, wake: Wake) -> Outcome:
        """One send, bounded in all by the send timeout (a service that drips its answer, or a
        token endpoint that hangs, is a failed attempt like a refused connection)."""
        try:
            async with asyncio.timeout(self._send_timeout_s):
                return await provider.send(token, wake)
        except TimeoutError:
            return Outcome("retry", None, detail=f"no answer within {self._send_timeout_s:g} s")
        except Exception as exc:  # a fault of ours or a library's: trying again would fail the same way
            log.exception("push by %s failed unexpectedly", provider.name)
            return Outcome("rejected", None, detail=f"{type(exc).__name__}: {exc}")

    async def depth(self) -> int:
        try:
            return await self._queue.depth()
        except StorageUnavailable:
            return 0


def _reason(outcome: Outcome) -> str:
    if outcome.kind == "gone":
        return "gone"
    if outcome.status is None:
        return "network" if outcome.kind == "retry" else "error"
    if outcome.status == 429:
        return "throttled"
    return "server_error" if outcome.status >= 500 else "refused"
