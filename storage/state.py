"""Hot state shared by bridge processes: presence and presence watches.

Chosen by URL like the store: absent means in-process (:class:`MemoryState`, the embedded
default), ``redis://HOST:PORT/DB`` means :class:`storage.state_redis.RedisState`. None of this is
durable data: losing it (a Redis restart) only makes users look offline until their devices
next speak, and forgets watches (devices renew them). Messages, sequence
numbers and receipts never live here. Also handed through here to a partition's next holder:
devices' refusal windows and what requests left unfinished when the store failed part way
(docs/architecture.md says what a restart loses of those). Requests one bridge process hands
another (Redis only:
``RedisState.call``/``serve``) wait here too; a restart loses those, their callers answer
``unavailable`` after a timeout, and devices retry.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

# how long after the newest window recorded for a partition an ended one is still kept (they last
# a few seconds; bridge/admission.py)
HELD_BACK_KEPT_MS = 60_000
# how long what a bridge left unfinished for a partition's users is kept after the last change
# to it (bridge/handover.py; a device's retry comes within seconds, or when it reconnects)
UNFINISHED_KEPT_MS = 86_400_000
# A record of what a request left unfinished starts with when it was written (ms since the epoch,
# in ASCII digits, at most TIME_DIGITS of them), then a space. What ``forget_unfinished`` leaves in
# its place is that time alone: a mark that refuses an earlier record of the field landing late.
TIME_DIGITS = 15
# told a user whose devices changed, or None: any user's may have (news was missed)
DevicesListener = Callable[[str | None], None]


def record_time(value: str) -> str | None:
    """The time a record (or a forgotten one's mark) carries, as written; None when it has none."""
    stamp, space, _ = value.partition(" ")
    return stamp if stamp.isascii() and stamp.isdigit() and len(stamp) <= TIME_DIGITS else None


def is_mark(value: str) -> bool:
    """Whether ``value`` is what ``forget_unfinished`` left of a record (its time alone)."""
    return record_time(value) == value


def _later_or_same(stored: str | None, value: str) -> bool:
    """Whether ``stored`` carries a time, and ``value`` one that is not later."""
    if stored is None:
        return False
    was, now = record_time(stored), record_time(value)
    return was is not None and now is not None and int(was) >= int(now)


class SharedState(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def device_online(self, user_id: str, device_id: str) -> bool:
        """Mark the device online; True when this made its user online."""

    async def device_offline(self, user_id: str, device_id: str) -> bool:
        """Mark the device offline; True when this made its user offline."""

    async def is_online(self, user_id: str) -> bool: ...

    async def online_users(self, user_ids: Sequence[str]) -> set[str]:
        """Which of these users have a device online, asked in one step (one round trip)."""

    async def online_devices(self) -> int:
        """How many devices are online (for metrics; may be approximate)."""

    async def add_watch(self, watched: str, watcher: str, expiry_ms: int, now_ms: int) -> None:
        """``watcher`` (``user/device``) wants presence changes of ``watched`` until ``expiry_ms``."""

    async def watchers(self, watched: str, now_ms: int) -> list[str]:
        """The current watchers of a user; expired ones are dropped."""

    async def devices_changed(self, user_id: str) -> None:
        """Tell every bridge process (this one too) that a device of the user was linked or
        unlinked; heard by the listeners of :meth:`listen_devices`. Not durable: a listener that
        cannot hear is told None when it can again."""

    def listen_devices(self, listener: DevicesListener) -> None:
        """Call ``listener`` with each user :meth:`devices_changed` names, here or in any
        other bridge process sharing this state."""

    def hears_devices(self) -> bool:
        """Whether the listeners hear every change now (false while a connection is down)."""

    async def put_held_back(self, scope: str, part: int, windows: Mapping[str, tuple[int, str]]) -> None:
        """Record devices' refusal windows (bridge/admission.py) for the next holder of their
        partition: ``up`` topic -> (until when, ms since the epoch; the refused send's id).
        Each replaces what was recorded for its device."""

    async def held_back(self, scope: str, part: int, now_ms: int) -> dict[str, tuple[int, str]]:
        """The windows recorded for a partition that are still open at ``now_ms``."""

    async def put_unfinished(self, scope: str, part: int, entries: Mapping[str, str | None]) -> None:
        """Record what a request of a partition's user left unfinished when the store failed
        (bridge/handover.py), for whichever bridge holds the partition next: each entry
        replaces the one of its name, unless both carry times (``record_time``) and the one
        there is not earlier (a record, or the mark of a forgotten one): a write that lands
        late, after a later one or after the forgetting of a later one, changes nothing. None
        forgets the name's entry. A partition's records are kept UNFINISHED_KEPT_MS after its
        last change (the values carry their own times: the reader drops old ones)."""

    async def unfinished(self, scope: str, part: int) -> dict[str, str]:
        """What is recorded as unfinished for a partition's users."""

    async def drop_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        """Forget each of these records that still holds the value given (as ``unfinished``
        read it): one written again since stays."""

    async def forget_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        """Forget each of these records, as a retry that finished what it holds does, and what
        its field holds that is earlier (the later records of a field hold what is left of the
        earlier ones): the field is left with the record's time alone (``is_mark``), so that a
        write of it, or of an earlier one, landing after this changes nothing. A field holding
        a later record (or mark), or a value without a time, stays; so does every field when
        the record given has no time."""


class MemoryState:
    """Everything in this process: right for one process, the embedded default."""

    def __init__(self) -> None:
        self._devices: dict[str, set[str]] = defaultdict(set)
        self._watch: dict[str, dict[str, int]] = defaultdict(dict)
        self._listeners: list[DevicesListener] = []
        self._held_back: dict[tuple[str, int], dict[str, tuple[int, str]]] = defaultdict(dict)
        self._unfinished: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def device_online(self, user_id: str, device_id: str) -> bool:
        devices = self._devices[user_id]
        before = len(devices)
        devices.add(device_id)
        return before == 0

    async def device_offline(self, user_id: str, device_id: str) -> bool:
        devices = self._devices.get(user_id)
        if not devices or device_id not in devices:
            return False
        devices.discard(device_id)
        if devices:
            return False
        del self._devices[user_id]
        return True

    async def is_online(self, user_id: str) -> bool:
        return bool(self._devices.get(user_id))

    async def online_users(self, user_ids: Sequence[str]) -> set[str]:
        return {u for u in user_ids if self._devices.get(u)}

    async def online_devices(self) -> int:
        return sum(len(d) for d in self._devices.values())

    async def add_watch(self, watched: str, watcher: str, expiry_ms: int, now_ms: int) -> None:
        self._watch[watched][watcher] = expiry_ms

    async def watchers(self, watched: str, now_ms: int) -> list[str]:
        w = self._watch.get(watched)
        if not w:
            return []
        for key in [k for k, exp in w.items() if exp <= now_ms]:
            del w[key]
        if not w:
            del self._watch[watched]
            return []
        return list(w)

    async def devices_changed(self, user_id: str) -> None:
        for listener in self._listeners:
            listener(user_id)

    def listen_devices(self, listener: DevicesListener) -> None:
        self._listeners.append(listener)

    def hears_devices(self) -> bool:
        return True

    async def put_held_back(self, scope: str, part: int, windows: Mapping[str, tuple[int, str]]) -> None:
        kept = self._held_back[(scope, part)]
        kept.update(windows)
        if len(kept) > 2 * len(windows) + 64:  # (now and then: the ended ones go)
            latest = max(until for until, _ in windows.values()) if windows else 0
            for topic in [t for t, (until, _) in kept.items() if until < latest - HELD_BACK_KEPT_MS]:
                del kept[topic]

    async def held_back(self, scope: str, part: int, now_ms: int) -> dict[str, tuple[int, str]]:
        kept = self._held_back.get((scope, part), {})
        for topic in [t for t, (until, _) in kept.items() if until <= now_ms]:
            del kept[topic]
        return dict(kept)

    async def put_unfinished(self, scope: str, part: int, entries: Mapping[str, str | None]) -> None:
        kept = self._unfinished[(scope, part)]
        for name, value in entries.items():
            if value is None:
                kept.pop(name, None)
            elif not _later_or_same(kept.get(name), value):
                kept[name] = value

    async def unfinished(self, scope: str, part: int) -> dict[str, str]:
        return dict(self._unfinished.get((scope, part), {}))

    async def drop_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        kept = self._unfinished.get((scope, part), {})
        for name, value in entries.items():
            if kept.get(name) == value:
                del kept[name]

    async def forget_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        kept = self._unfinished[(scope, part)]
        for name, value in entries.items():
            mark, stored = record_time(value), kept.get(name)
            if mark is not None and not is_mark(value) and (stored is None or stored == value or (
                    record_time(stored) is not None and not _later_or_same(stored, value))):
                kept[name] = mark


def open_state(url: str | None, peer_host: str | None = None, peer_secret: bytes | None = None) -> SharedState:
    """``peer_host`` and ``peer_secret`` (Redis only): where this process answers other bridge
    processes' requests directly (``storage/peers.py``), and the deployment's secret that lets
    them in; without them, through Redis lists only."""
    if not url:
        return MemoryState()
    if url.startswith(("redis://", "rediss://")):
        from .state_redis import RedisState

        return RedisState(url, peer_host=peer_host, peer_secret=peer_secret)
    from . import BackendConfigError

    raise BackendConfigError(f"unknown state scheme in {url!r} (expected redis:// or nothing for in-process)")
