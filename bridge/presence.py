"""Who is online, when they were last seen, and who is watching.

A user is online while at least one of their devices is. Device state comes from the device's
own ``presence`` messages, any other request it sends, and its will (published by the broker
when the connection is lost). Last-seen is stored when a user goes offline, so it survives a
restart.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from storage.base import Store

from .clock import Clock
from .errors import BadRequest
from .outbox import Out, device_topic
from .protocol import Watch, presence_event

log = logging.getLogger(__name__)


class PresenceTracker:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._devices: dict[str, set[str]] = defaultdict(set)
        self._last_seen: dict[str, int] = {}
        # watched user -> {(watcher user, watcher device): expiry ms}
        self._watchers: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)

    def is_online(self, user_id: str) -> bool:
        return bool(self._devices.get(user_id))

    def online_devices(self) -> int:
        return sum(len(d) for d in self._devices.values())

    async def last_seen(self, user_id: str) -> int:
        if self.is_online(user_id):
            return self._clock.now_ms()
        if user_id not in self._last_seen:
            user = await self._store.get_user(user_id)
            self._last_seen[user_id] = user.last_seen if user else 0
        return self._last_seen[user_id]

    async def device_online(self, user_id: str, device_id: str) -> list[Out]:
        devices = self._devices[user_id]
        if device_id in devices:
            return []
        was_online = bool(devices)
        devices.add(device_id)
        if was_online:
            return []
        log.debug("user %s online", user_id)
        return self._notify(user_id, True, self._clock.now_ms())

    async def device_offline(self, user_id: str, device_id: str) -> list[Out]:
        devices = self._devices.get(user_id)
        if not devices or device_id not in devices:
            return []
        devices.discard(device_id)
        if devices:
            return []
        del self._devices[user_id]
        now = self._clock.now_ms()
        self._last_seen[user_id] = now
        await self._store.set_last_seen(user_id, now)
        log.debug("user %s offline", user_id)
        return self._notify(user_id, False, now)

    def _notify(self, user_id: str, online: bool, last_seen: int) -> list[Out]:
        watchers = self._watchers.get(user_id)
        if not watchers:
            return []
        now = self._clock.now_ms()
        outs: list[Out] = []
        for (wu, wd), expiry in list(watchers.items()):
            if expiry <= now:
                del watchers[(wu, wd)]
                continue
            outs.append(Out.event(device_topic(wu, wd), presence_event(user_id, online, last_seen)))
        if not watchers:
            del self._watchers[user_id]
        return outs

    async def watch(self, watcher_user: str, watcher_device: str, req: Watch) -> list[Out]:
        """One presence event per visible user now; changes pushed for ``req.ttl`` seconds."""
        if req.ttl <= 0:
            raise BadRequest("'ttl' must be positive")
        expiry = self._clock.now_ms() + req.ttl * 1000
        outs: list[Out] = []
        for uid in req.users:
            if uid != watcher_user and not await self._store.share_chat(watcher_user, uid):
                continue
            self._watchers[uid][(watcher_user, watcher_device)] = expiry
            online = self.is_online(uid)
            event = presence_event(uid, online, await self.last_seen(uid))
            event["id"] = req.id
            outs.append(Out.event(device_topic(watcher_user, watcher_device), event))
        return outs

    def expire_watches(self) -> int:
        """Drop expired watches; return how many remain."""
        now = self._clock.now_ms()
        for uid in list(self._watchers):
            w = self._watchers[uid]
            for key in [k for k, exp in w.items() if exp <= now]:
                del w[key]
            if not w:
                del self._watchers[uid]
        return sum(len(w) for w in self._watchers.values())
