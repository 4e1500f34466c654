"""Who is online, when they were last seen, and who is watching.

A user is online while at least one of their devices is. Device state comes from the device's
own ``presence`` messages, any other request it sends, and its will (published by the broker
when the connection is lost). Online sets and watches live in the shared state
(:mod:`storage.state`: in-process, or Redis across bridge processes); last-seen is stored when
a user goes offline, so it survives restarts.

**Keepalive held by the bridge.** A device may state its MQTT keepalive in ``presence online``
(``"keepalive": SECONDS``); it then promises to publish at least once per keepalive (any
request, or ``presence online`` again when idle, in place of a PINGREQ the bridge cannot see).
When the bridge has seen nothing from it for 1.5 × that keepalive, it marks the device offline
as the will would, at once, whatever the broker's own check does: Mosquitto 2.0 checks
keepalives only every 6 s, on a clock of whole seconds, so with a short keepalive its will comes
up to 7 s late (docs/deploy.md). The will, when it comes, finds the device already offline and
changes nothing. Devices that state no keepalive are left to the broker's check. The watch
lives in the bridge that handles the device's requests; if the device's partition moves to
another bridge meanwhile, the old one may mark it offline once, and its next request (within a
keepalive, as promised) marks it online again on the new one.

Presence never blocks messaging: if the shared state cannot be reached, the failure is logged
and the request goes on (a ``watch``, which asks for presence and nothing else, gets
``unavailable``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Sequence

from storage.base import StorageUnavailable, Store
from storage.state import SharedState

from .admission import Admission
from .clock import Clock
from .errors import Unavailable
from .outbox import Out, ToDevice
from .protocol import PresenceEvent, Watch

log = logging.getLogger(__name__)
# how long this process trusts its own note that a device is online before saying so again
REASSERT_S = 60.0
# the online count walks every online user's key in the shared state: once per this long at most
ONLINE_COUNT_TTL_S = 5.0
# a device that stated its keepalive is offline after this many keepalives without a publish
KEEPALIVE_FACTOR = 1.5
Publish = Callable[[Sequence[Out]], Awaitable[None]]


class PresenceTracker:
    def __init__(self, store: Store, state: SharedState, clock: Clock) -> None:
        self._store = store
        self._state = state
        self._clock = clock
        self._marked: dict[tuple[str, str], float] = {}
        self._online_count: tuple[float, asyncio.Future[int]] | None = None
        # told (at once, no I/O) when a user's last device goes offline: bridge.push.Pusher.went_offline
        self.on_user_offline: Callable[[str], None] | None = None
        # devices that stated their keepalive: (user, device) -> (allowed silence in s, last heard)
        self._held: dict[tuple[str, str], tuple[float, float]] = {}
        # (when it may expire, user, device): checked against _held when due (lazy deletion)
        self._deadlines: list[tuple[float, str, str]] = []
        self._deadline_added = asyncio.Event()
        # while it sheds, presence changes are recorded but not fanned out (bridge.admission)
        self.admission: Admission | None = None

    async def is_online(self, user_id: str) -> bool:
        try:
            return await self._state.is_online(user_id)
        except StorageUnavailable as exc:
            log.warning("presence unavailable: %s", exc)
            return False

    async def online_devices(self) -> int:
        """Devices marked online across all bridges, counted at most every ONLINE_COUNT_TTL_S
        (a scrape of /metrics asks twice; a count is a walk over every online user)."""
        now = self._clock.monotonic()
        cached = self._online_count
        if cached is None or now - cached[0] >= ONLINE_COUNT_TTL_S:
            cached = self._online_count = (now, asyncio.ensure_future(self._count_online()))
        return await asyncio.shield(cached[1])

    async def _count_online(self) -> int:
        try:
            return await self._state.online_devices()
        except StorageUnavailable:
            return len(self._marked)

    async def last_seen(self, user_id: str) -> int:
        """Now for an online user; otherwise as stored (any bridge process may have stored it)."""
        if await self.is_online(user_id):
            return self._clock.now_ms()
        user = await self._store.get_user(user_id)
        return user.last_seen if user else 0

    async def device_online(self, user_id: str, device_id: str, *, explicit: bool = False,
                            keepalive: int | None = None) -> list[Out]:
        """Mark the device online. Implicit marks (any request) are sent to the shared state at
        most every ``REASSERT_S`` per device; an explicit ``presence online`` always is. With
        ``keepalive``, the device is marked offline after 1.5 × that many seconds without a
        request (see the module docstring)."""
        key = (user_id, device_id)
        now = self._clock.monotonic()
        held = self._held.get(key)
        if keepalive is not None:
            held = (keepalive * KEEPALIVE_FACTOR, now)
            heapq.heappush(self._deadlines, (now + held[0], user_id, device_id))
            self._deadline_added.set()
        if held is not None:
            self._held[key] = (held[0], now)
        marked = self._marked.get(key)
        if not explicit and marked is not None and now - marked < REASSERT_S:
            return []
        try:
            became = await self._state.device_online(user_id, device_id)
        except StorageUnavailable as exc:
            log.warning("presence unavailable: %s", exc)
            return []
        if len(self._marked) > 500_000:
            self._marked.clear()
        self._marked[key] = now
        if not became:
            return []
        log.debug("user %s online", user_id)
        return await self._notify(user_id, True, self._clock.now_ms())

    async def device_offline(self, user_id: str, device_id: str) -> list[Out]:
        self._marked.pop((user_id, device_id), None)
        self._held.pop((user_id, device_id), None)
        try:
            became = await self._state.device_offline(user_id, device_id)
        except StorageUnavailable as exc:
            log.warning("presence unavailable: %s", exc)
            return []
        if not became:
            return []
        now = self._clock.now_ms()
        try:
            await self._store.set_last_seen(user_id, now)
        except StorageUnavailable as exc:
            log.warning("last-seen of %s not stored: %s", user_id, exc)
        log.debug("user %s offline", user_id)
        if self.on_user_offline is not None:
            self.on_user_offline(user_id)
        return await self._notify(user_id, False, now)

    def _due(self) -> list[tuple[str, str]]:
        """Devices silent past their allowance (no longer held once returned)."""
        now = self._clock.monotonic()
        due: list[tuple[str, str]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, user_id, device_id = heapq.heappop(self._deadlines)
            held = self._held.get((user_id, device_id))
            if held is None:
                continue  # offline already, or a deadline of an earlier keepalive
            expires = held[1] + held[0]
            if expires <= now:
                del self._held[(user_id, device_id)]
                due.append((user_id, device_id))
            else:  # heard from since: look again when the new allowance runs out
                heapq.heappush(self._deadlines, (expires, user_id, device_id))
        return due

    async def expire_silent(self) -> list[Out]:
        """Mark offline every device silent past 1.5 × the keepalive it stated; what to publish."""
        outs: list[Out] = []
        for user_id, device_id in self._due():
            log.info("device %s stated its keepalive and went silent; marking it offline", device_id)
            outs.extend(await self.device_offline(user_id, device_id))
        return outs

    async def run_keepalive_watch(self, publish: Publish) -> None:
        """Until cancelled: mark devices offline as their stated keepalives run out, and publish
        the presence changes."""
        while True:
            self._deadline_added.clear()
            try:
                outs = await self.expire_silent()
                if outs:
                    await publish(outs)
            except Exception:  # the watch must outlive a failed step
                log.exception("marking silent devices offline failed; trying again later")
            wait = self._deadlines[0][0] - self._clock.monotonic() if self._deadlines else None
            try:
                async with asyncio.timeout(None if wait is None else max(wait, 0.0)):
                    await self._deadline_added.wait()
            except TimeoutError:
                pass

    async def _notify(self, user_id: str, online: bool, last_seen: int) -> list[Out]:
        if self.admission is not None and self.admission.shedding:  # recorded, not fanned out
            self.admission.shed("presence")
            return []
        try:
            watchers = await self._state.watchers(user_id, self._clock.now_ms())
        except StorageUnavailable as exc:
            log.warning("presence watchers unavailable: %s", exc)
            return []
        event = PresenceEvent(user=user_id, online=online, last_seen=last_seen)
        outs: list[Out] = []
        for w in watchers:
            wu, _, wd = w.partition("/")
            outs.append(Out(ToDevice(wu, wd), event))
        return outs

    async def watch(self, watcher_user: str, watcher_device: str, req: Watch) -> list[Out]:
        """One presence event per visible user now; changes pushed for ``req.ttl`` seconds."""
        expiry = self._clock.now_ms() + req.ttl * 1000
        outs: list[Out] = []
        try:
            for uid in req.users:
                if uid != watcher_user and not await self._store.share_chat(watcher_user, uid):
                    continue
                await self._state.add_watch(uid, f"{watcher_user}/{watcher_device}", expiry, self._clock.now_ms())
                online = await self._state.is_online(uid)
                event = PresenceEvent(user=uid, online=online, last_seen=await self.last_seen(uid), id=req.id)
                outs.append(Out(ToDevice(watcher_user, watcher_device), event))
        except StorageUnavailable as exc:
            raise Unavailable("presence is unavailable right now; retry later") from exc
        return outs
