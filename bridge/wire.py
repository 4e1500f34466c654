"""The MQTT edge's half of the way out: where an addressed event is published and as what.

Handlers return :class:`bridge.outbox.Out` (an event and whom it is for); this module gives
the topic and the payload. Protocol v1 (compact JSON, the exact bytes the protocol documents)
goes to ``down/{user}`` for every device of a user and ``down/{user}/{device}`` for one.

Protocol v2 (``bridge.wire_v2``) is per device: a device speaks v2 by sending its requests in
v2, and :class:`DeviceKinds` remembers which devices did. An event for one device is encoded as
that device speaks; an event for a user goes as v1 to ``down/{user}`` (a v1 client may listen
without ever publishing: always on an external broker; on the embedded broker, which knows its
subscriptions, when anyone subscribes to it) and, when the user has a v2 device or is not known to this
process (their devices may talk to another bridge), as v2 to ``down/{user}/v2``, which only v2
devices subscribe to. Live events (not replies) go to v2 devices at QoS 0: their
inbox positions and ``sync`` recover a lost one. A message's copy for its sender is not sent
to the sending device when it speaks v2: its ``sent`` reply carries the inbox position instead.

An external broker does not tell the bridge who subscribes, so there :class:`V1Readers` asks
the store instead: a device that says ``proto`` 2 at login never reads ``down/{user}``, and a
user all of whose devices said so gets no v1 copy at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from storage.timed import TimedMap

from . import wire_v2
from .outbox import Address, Out, ToDevice, ToUser
from .protocol import ChatMessage, Event, MsgEvent

log = logging.getLogger(__name__)
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def topic_of(to: Address) -> str:
    if isinstance(to, ToDevice):
        return f"down/{to.user}/{to.device}"
    return f"down/{to.user}"


def encode_v1(event: Event) -> bytes:
    """The event's v1 payload: its JSON object, compact, UTF-8."""
    return _dumps(event.to_json()).encode()


def _msg_tail(message: ChatMessage) -> bytes:
    """A ``msg`` payload after its inbox position: the message's keys, the same for every recipient."""
    return _dumps(message.fields_json({})).encode()[1:]


class DeviceKinds:
    """Which version each device spoke in its latest request to this process, by user.

    Bounded and forgetful: a user is forgotten when none of their devices was heard from for
    ``ttl_s`` (devices speak at least once per keepalive), or when more recently heard users
    need the room. A user this process does not know (one whose devices talk to another
    bridge, or are not connected) gets user events in both versions."""

    def __init__(self, max_users: int = 200_000, ttl_s: float = 600.0,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._seen: TimedMap[str, dict[str, bool]] = TimedMap(max_users, ttl_s, timer=timer)

    def saw(self, user: str, device: str, v2: bool) -> None:
        """A request of this device came in v2 (or in v1)."""
        devices = self._seen.get(user)
        if devices is None:
            devices = {}
        devices[device] = v2
        self._seen[user] = devices  # (again: heard from now)

    def is_v2(self, user: str, device: str) -> bool:
        devices = self._seen.get(user)
        return devices is not None and devices.get(device, False)

    def known_devices(self, user: str) -> int:
        """How many of the user's devices were heard from here (in either version)."""
        devices = self._seen.get(user)
        return 0 if devices is None else len(devices)

    def v2_devices(self, user: str) -> frozenset[str] | None:
        """The user's devices known to speak v2; None when the user is not known here."""
        devices = self._seen.get(user)
        return None if devices is None else frozenset(d for d, v2 in devices.items() if v2)


V1_KNOWN_S = 120.0  # how long a bridge keeps whether a user has v1 readers (bar news of a change)


class V1Readers:
    """Whether anyone may read a user's v1 events on ``down/{user}``, on an external broker.

    The store knows (:meth:`storage.base.Store.reads_v1`: some device of the user did not say
    ``proto`` 2 at login); this keeps the answer per user for ``ttl_s``. It never waits for the
    store: a user not known yet is answered True (the v1 copy goes) while the answer is read in
    the background, at most ``max_reads`` at a time. Every bridge process is told when a user's
    devices change (:meth:`changed`, from the shared state's broadcast) and drops that user; an
    answer read while such news came in is not kept. While ``trusted()`` is false (the
    broadcast cannot be heard, so news may be missed) every answer is True and nothing is kept.
    """

    def __init__(self, reads_v1: Callable[[str], Awaitable[bool]], trusted: Callable[[], bool], *,
                 ttl_s: float = V1_KNOWN_S, max_users: int = 200_000, max_reads: int = 64,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._reads_v1 = reads_v1
        self._trusted = trusted
        self._known: TimedMap[str, bool] = TimedMap(max_users, ttl_s, timer=timer)
        self._reading: set[str] = set()
        self._max_reads = max_reads
        self._news = 0  # how many changes were heard: an answer read across one is not kept
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, user: str) -> bool:
        """True unless the user is known to have no v1 reader."""
        if not self._trusted():
            return True
        known = self._known.get(user)
        if known is not None:
            return known
        if user not in self._reading and len(self._reading) < self._max_reads:
            self._reading.add(user)
            task = asyncio.get_running_loop().create_task(self._read(user, self._news))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _read(self, user: str, news: int) -> None:
        try:
            answer = await self._reads_v1(user)
        except Exception as exc:  # asked again at the user's next event
            log.debug("could not read whether %s has v1 devices: %s", user, exc)
            return
        finally:
            self._reading.discard(user)
        if news == self._news and self._trusted():
            self._known[user] = answer

    def changed(self, user: str | None) -> None:
        """A user's devices changed (a device linked or unlinked); None: any user's may have."""
        self._news += 1
        if user is None:
            self._known.clear()
        else:
            self._known.pop(user, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def publishes(outs: Sequence[Out], kinds: DeviceKinds | None = None,
              wanted: Callable[[str], bool] | None = None,
              v1_read: Callable[[str], bool] | None = None) -> list[tuple[str, bytes, int]]:
    """Topic, payload and QoS of each, in order; with ``kinds``, v2 where a device speaks it.
    With ``wanted``, only those on a topic it accepts (the embedded broker, which knows its
    subscriptions, leaves out what nobody subscribes to) and nothing is encoded for the others.
    With ``v1_read`` (and ``kinds``), an event for a user goes on ``down/{user}`` only when it
    says the user may have a v1 reader (:class:`V1Readers`), and as v2 whenever it does not.

    The hot path is a message's fan-out: one ``msg`` per recipient, all with the same
    :class:`ChatMessage` and each with its own inbox position. The message's part of the payload
    is encoded once per call and each recipient's position put in front of it, giving the same
    bytes as ``encode_v1``."""
    tails: dict[int, bytes] = {}  # id() of a ChatMessage held by one of ``outs`` -> its tail
    out: list[tuple[str, bytes, int]] = []
    for o in outs:
        ev = o.event
        if kinds is not None and _v2_copy(o, kinds, out, wanted, v1_read):
            continue
        topic = topic_of(o.to)
        if wanted is not None and not wanted(topic):
            continue
        if type(ev) is MsgEvent:
            tail = tails.get(id(ev.message))
            if tail is None:
                tail = tails[id(ev.message)] = _msg_tail(ev.message)
            payload = b'{"type":"msg","inbox":%d,%s' % (ev.inbox, tail)
        else:
            payload = encode_v1(ev)
        out.append((topic, payload, o.qos))
    return out


def _v2_copy(o: Out, kinds: DeviceKinds, out: list[tuple[str, bytes, int]],
             wanted: Callable[[str], bool] | None, v1_read: Callable[[str], bool] | None) -> bool:
    """Add the v2 publish of ``o`` (if any device is to get one); True when that is all of it
    (an event for one v2 device, or for a user with no v1 reader), False when the v1 publish
    follows."""
    to, ev = o.to, o.event
    if isinstance(to, ToDevice):
        if not kinds.is_v2(to.user, to.device):
            return False
        topic = topic_of(to)
        if wanted is None or wanted(topic):
            out.append((topic, wire_v2.encode(ev, to.user), 0))
        return True
    assert isinstance(to, ToUser)
    v1 = v1_read is None or v1_read(to.user)
    devices = kinds.v2_devices(to.user)
    if devices is None or devices or not v1:  # (not known here: a v2 device may be listening)
        if (isinstance(ev, MsgEvent) and ev.message.sender == to.user and devices is not None
                and len(devices) == 1 and ev.message.device in devices
                and (v1 or kinds.known_devices(to.user) == 1)):
            # the sending device is the user's only v2 device (with no v1 reader: their only
            # device, as one that said ``proto`` 2 but speaks v1 still reads the v2 topic):
            # its ``sent`` says it all
            return not v1
        topic = f"down/{to.user}/v2"
        if wanted is None or wanted(topic):
            out.append((topic, wire_v2.encode(ev, to.user), 0))
    return not v1
