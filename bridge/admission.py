"""Admission control: a bound on the device requests this bridge holds, and what happens past it.

*Held* is every device publish taken in and not yet handled to the end: waiting in its
device's lane of the ingest (``bridge.mqtt_ingest``, external broker), or in a device's queue of the
embedded broker (in-process ingest), or being handled (store calls in flight). Each path counts
a publish with :meth:`Admission.admit` when it takes it in and gives it back with
:meth:`Admission.release` once handled, so the check per publish is a few integer compares
(on the embedded broker, and the length of its broadcast queue): no await, no allocation.

Three levels, by what is held:

- below ``shed_at``: everything is taken in;
- from ``shed_at``: typing relays are dropped and presence changes are not fanned out to
  watchers (presence itself is still recorded): work no one stores and no one misses for long
  goes first, before any send is refused;
- from ``limit`` held in all, or ``per_device`` of the sending device's own (both ways in handle a
  device's requests one at a time, so its own queue is its wait):
  a new publish is not queued. It is read at once and, if it is a request with
  a reply (``send``, ``sync``, ``read``, ``watch``, ``media_*``), answered at once with
  ``rate_limited`` and ``retry_after_ms``; nothing of it is stored, so a retry is safe and the
  same ``id`` later stores it once. ``typing`` is dropped. ``ack`` and ``presence`` are still
  taken in: an ack is folded per device (``bridge.router.AckLane``) and a presence change is one
  small write, and refusing them would leave receipts and online state wrong until the device's
  next one. They too stop at a ceiling, a quarter above ``limit``: past it they are dropped
  (a later ack covers a dropped one), so what is held never exceeds the ceiling.

On the embedded broker the replies and events waiting to go out (amqtt's one broadcast queue,
which every publication passes through one at a time) are bounded by the same ``limit``, and
by the delay bound too: when what waits there would take longer than ``max_delay_s`` to go at
the rate publications went out recently (smoothed over about half a second), new requests
are refused as while most requests wait too long (below). ``backlog`` reads its length and
``sent_out`` how many it has sent. Otherwise
requests taken in would be answered in time and their replies would queue there instead, out
of any bound (the trial run before this check: nothing held, and sends answered 6 to 9 s late).

**Bound by delay, too.** A count bounds the wait only as well as the bridge's speed is known:
2,048 held at ~400 requests/s is 5 s. So each path also notes when it took a publish in, and
calls :meth:`Admission.start` when its handling starts. Like CoDel, which drops at the head of
its queue what waited past its target, a request with a reply that waited longer than
``max_delay_s`` is not handled then but answered as above (acks and presence changes are
handled all the same): no request answered ``sent`` waited longer than the bound before its
handling started. And so that requests are refused as they come rather than after they waited
for nothing, ``start`` also keeps, per interval of ``INTERVAL_S``, how many were started and how
many of them had waited past the bound: while most of the last interval's had (its median wait
was past the bound; a median, so a few slow ones do not count, and the many devices whose own
queues are short do not hide the ones whose are long), new requests are refused at once, until
an interval's median is below the bound again or nothing is held any more. A queue that stands
is one several devices wait in: when all of an interval's requests that waited past the bound
were one device's, and no other device's request waited past it within a bound before them,
they waited behind that device's own (a request that hung on a store until
its timeout, while the embedded broker handles the device's next ones after it), and they are
left out of the interval's figures. Each is answered as above all the same. An interval in which
nothing started while requests were held keeps the last verdict. On an external broker a
publish can also wait before the bridge reads it (in the MQTT client's queue, while the event
loop is busy): its wait counts from receipt, and one that waited past the bound there is
refused as it is read, so a backlog built up in an overload is answered at once instead of
handled seconds late. Per publish this is a flag and a compare in ``admit`` and a clock read,
two additions and a compare in ``start``; the take-in time rides in what each path already
keeps per publish. From half the bound (the last interval's mean wait), typing and presence
fan-out are shed, as from ``shed_at`` held.

A refusal's ``retry_after_ms`` reflects the backlog: how long what is held takes to drain at the
rate the last interval started requests, never less than ``retry_after_ms`` (the setting) and at
most ``MAX_RETRY_AFTER_MS``. An interval only ends when a request starts, so one that lasted
longer than ``MAX_RATE_SPAN_S`` spans a stretch in which nothing started at all (nothing came,
or the store stalled: a takeover, a paused Cassandra) and says nothing about the rate once
requests flow again: it leaves the rate unknown, and refusals ask for the least wait until an
interval measures it. (Measured over such a stretch, the rate made the refusals right after a
bridge's takeover in tests/test_e2e_failover.py ask for 59.3 to 60 s, the bound then, and its
devices gave up before they were due back.)

**One device's order through a refusal.** A device may have many sends on their way, and
they wait in one queue: without more, the oldest could be refused (it waited past the bound)
and a later one handled (the verdict changed in between), so the refused one, sent again,
would be numbered after it. So when a device's send is refused, the device's sends that left
it after that one and before the device can have heard of the refusal are refused with it,
wherever they wait (behind it in a queue, or still in the broker); those that left before it
are not. "Left" is when the bridge took it in, on an external broker its receipt less the
broker queue's lag as the probe measured it (without the probe, the lag is taken as 0 and
what waited in the broker is not caught). "Heard" is taken as the refusal's ``retry_after_ms``
or the delay bound, whichever is shorter, after it, or as soon as the refused send's own
``id`` comes back (the device is sending the refused ones again: what left before that and
still waits behind a slow request of the device is refused all the same). A send answered
``unavailable`` (:meth:`Admission.failed`) opens the same window. A device that sends the
refused ones again in its order keeps its order (``tests/test_e2e_mqtt_ingest.py``), as the
Python SDK does (``tests/test_sdk_order.py``). Refusals made
this way do not extend the window, and only sends are held: other requests keep no order
among themselves. Without a bound by delay the window is dropped after ``HOLD_KEPT_S``. The
check costs nothing while no device has a window open. With several bridges a window moves with
the device's partition (:class:`HeldBackHandover`): the next holder refuses the device's sends
until the refused one comes back or the window ends.

A device that keeps pushing past its own per-device limit is a different matter, decided in
``bridge.ratelimit.Strikes`` and ``bridge.router``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ProtocolError, RateLimited
from .metrics import Metrics
from .outbox import Out, ToDevice
from .protocol import Ack, ErrorReply, PresenceReq, Request, Send, Typing
from .wire_v2 import parse_any

if TYPE_CHECKING:
    from storage.state import SharedState

    from .mqtt_ingest import Partitions

log = logging.getLogger(__name__)

# Devices' requests held at once by default. A held request waits for those ahead of it, so the
# bound is also a bound on queueing delay: about 5 s at the ~400 sends/s of one embedded bridge.
# It must stay above what well-behaved clients keep in flight together, acks included: the p2p
# benchmark's 100 pairs with 4 sends each in flight, and their devices' acks, held over 512 at
# full speed on the production profile and were refused. Lower it to bound the delay tighter
# (about sends/s × the delay accepted), keeping it above that.
DEFAULT_LIMIT = 2048
DEFAULT_RETRY_AFTER_MS = 1000
# A device's own requests held at once (embedded broker), the same as the per-device burst the
# protocol promises (200): a device may hand over that many at once and have them all taken, in
# its order (tests/test_e2e_messaging.py sends 60 at once and checks their order; a bound of 16
# refused some, which the SDK sent again later, out of order). Past it, a device floods only
# its own queue, which is handled one request at a time.
DEFAULT_PER_DEVICE = 200
# The longest a request may wait before its handling starts (see the module's docstring). Chosen
# by measurement (BENCHMARKS.md, "admission bounded by delay"): 500 ms kept accepted sends under
# about 1.7 s at p99 through a flood, but it also refused thousands of sends of a p2p full-speed
# run (400 in flight: a standing queue of about a second) and the tail of one device's burst of
# 60 on a loaded machine, which the device then sent again out of order; at 2000 ms a p2p run
# had 21 refused. Lower it where a bridge never runs a standing queue that long on purpose.
DEFAULT_MAX_DELAY_MS = 2000
# CoDel's interval: each such stretch's share of requests that waited past the bound decides
# whether a queue stands.
INTERVAL_S = 0.1
# The longest wait a refusal asks for. Past a few seconds the backlog a refusal measured has
# changed before the device is back; a device that returns too soon is refused again, cheaply.
MAX_RETRY_AFTER_MS = 10_000
# An interval longer than this had a stretch with nothing started: not a measure of the rate.
MAX_RATE_SPAN_S = 10 * INTERVAL_S
# the weight of each interval in the smoothed rate publications go out at (embedded broker)
OUT_RATE_WEIGHT = 0.2
# without a bound by delay, how long a device's window of held sends is kept at most
HOLD_KEPT_S = 60.0


class HeldBack:
    """A device's sends that left in ``[since, until)`` are refused, until ``first`` comes back."""

    __slots__ = ("first", "since", "until")

    def __init__(self, since: float, until: float, first: str) -> None:
        self.since, self.until, self.first = since, until, first

class Admission:
    def __init__(self, limit: int = DEFAULT_LIMIT, shed_at: int | None = None,
                 retry_after_ms: int = DEFAULT_RETRY_AFTER_MS, max_payload: int = 64 * 1024,
                 metrics: Metrics | None = None, per_device: int = DEFAULT_PER_DEVICE,
                 max_delay_ms: int = DEFAULT_MAX_DELAY_MS, clock: Callable[[], float] = time.monotonic) -> None:
        """``max_delay_ms`` 0: no bound by delay. ``clock`` must be the one the callers of
        :meth:`start` read their take-in times from (``time.monotonic``)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        shed = limit // 2 if shed_at is None else shed_at
        if not 0 <= shed <= limit:
            raise ValueError(f"shed_at must be between 0 and the limit ({limit}), got {shed}")
        if retry_after_ms < 1:
            raise ValueError(f"retry_after_ms must be at least 1, got {retry_after_ms}")
        if per_device < 1:
            raise ValueError(f"per_device must be at least 1, got {per_device}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be 0 (no bound by delay) or more, got {max_delay_ms}")
        self.limit = limit
        self.ceiling = limit + limit // 4
        self.per_device = per_device
        self.shed_at = shed
        self.retry_after_ms = retry_after_ms
        self._max_payload = max_payload
        self._metrics = metrics
        self.held = 0
        # publications waiting to go out, where the broker queues them (the embedded broker), and
        # how many it has sent so far (for the rate it sends them at)
        self.backlog: Callable[[], int] | None = None
        self.sent_out: Callable[[], int] | None = None
        # the bound by delay (see the module's docstring); times in the clock's seconds
        self.clock = clock
        self.max_delay_s = max_delay_ms / 1000
        # a publish that waited longer than this is refused, as it is read or as it is started
        self._stale_after = self.max_delay_s if max_delay_ms else math.inf
        self.wait_s = 0.0  # the mean wait before handling in the last interval that started any
        self.late = False  # most of those waited past the bound: new requests are refused
        self.drain_per_s = 0.0  # requests started per second in that interval (0: not known)
        self._started = 0  # requests started so far in this interval
        self._past = 0  # of which waited past the bound
        self._waited = 0.0  # their waits added up
        self._past_waited = 0.0  # the waits of those past the bound added up
        self._past_devices = False  # of which one of another device than the one before it
        # the device of the last request that waited past the bound (of any interval), and when
        self._past_topic: str | None = None
        self._past_at = -math.inf
        self._sent_before = 0  # sent_out() when this interval started
        self.out_wait_s = 0.0  # how long what waits to go out takes to go, at the recent rate
        self._out_rate = 0.0  # publications sent per second, smoothed
        self._interval_start = clock()
        # up topic of a device whose send was refused -> which of its sends are refused with it
        # (the module's docstring)
        self._held_back: dict[str, HeldBack] = {}
        # told of each window as it opens, grows or closes (the device's up topic, until when as
        # time.time(), the refused send's id): recorded for the next holder of the device's
        # partition, which :meth:`adopt`\ s it (bridge/app.py)
        self.on_hold: Callable[[str, float, str], None] | None = None

    @property
    def shedding(self) -> bool:
        """Typing and presence fan-out are dropped."""
        return (self.held >= self.shed_at or (self.backlog is not None and self.backlog() >= self.shed_at)
                or (self.max_delay_s > 0 and self.held > 0 and self.wait_s >= self.max_delay_s / 2))

    def admit(self, topic: str, payload: bytes | bytearray, queued: int = 0, waited: float = 0.0) -> list[Out] | None:
        """Take in one device publish, ``queued`` of its device's being held already (0 where
        that is not known), after it ``waited`` seconds to be read (external broker: in the
        client's queue): None if taken (counted: :meth:`release` it once handled, and
        :meth:`start` it when its handling starts), else what to publish instead (the refusal,
        or nothing), at once."""
        if (self.held < self.limit and queued < self.per_device and waited <= self._stale_after
                and (self.backlog is None or self.backlog() < self.limit) and not (self.late and self.held)):
            if not (self._held_back and self._holds_back(topic, self.clock() - waited)):
                self.held += 1
                return None
            refused = self._refused_send(topic, payload, self.clock() - waited)
            if refused is None:
                self.held += 1
            return refused
        return self._over(topic, payload, queued, waited)

    def start(self, topic: str, payload: bytes | bytearray, taken_at: float) -> list[Out] | None:
        """A publish taken in (at ``taken_at``, the clock's time) is about to be handled: None
        to handle it, else it waited past the bound and is a request with a reply: what answers
        it instead (the refusal; :meth:`release` it all the same, unhandled)."""
        now = self.clock()
        waited = now - taken_at
        past = waited > self._stale_after
        self._started += 1
        self._past += past
        self._waited += waited
        if past:
            self._past_waited += waited
            if topic != self._past_topic and now - self._past_at <= self._stale_after:
                self._past_devices = True  # two devices' requests waited past the bound within a bound
            self._past_topic, self._past_at = topic, now
        if now - self._interval_start >= INTERVAL_S:
            self._next_interval(now)
        if past:
            return self._expired(topic, payload, waited, taken_at)
        if self._held_back and self._holds_back(topic, taken_at):
            return self._refused_send(topic, payload, taken_at)
        return None

    def failed(self, topic: str, payload: bytes | bytearray, request_id: str) -> None:
        """A request of this device was answered ``unavailable`` (the store failed): if it was a
        send, the device's sends after it are refused as after a refusal (the module's
        docstring), until it comes back or for the least wait a refusal asks for (the setting
        ``retry_after_ms``). The device's publishes are handled one at a time, so every later one
        is still to start. Without this, a device with several sends on their way had the next one
        stored and the failed one, sent again, numbered after it."""
        if not isinstance(self._request(topic.split("/"), payload), Send):
            return
        self._hold_back(topic, -math.inf, self.retry_after_ms / 1000, request_id)
        log.debug("a send on %s failed: the device's later sends wait for it", topic)

    def release(self) -> None:
        """One publish taken in is done with (handled, refused by :meth:`start`, or given up
        with its connection)."""
        self.held -= 1
        if self.held == 0:  # nothing waits any more: no standing queue, whatever the interval says
            self.late = False

    def _next_interval(self, now: float) -> None:
        if self.backlog is not None and self.sent_out is not None:
            sent = self.sent_out()
            rate = (sent - self._sent_before) / (now - self._interval_start)
            self._sent_before = sent
            # smoothed (over about half a second): one interval in which the broker's loop sent
            # little says nothing about how long what waits will take to go
            self._out_rate += OUT_RATE_WEIGHT * (rate - self._out_rate)
            self.out_wait_s = self.backlog() / self._out_rate if self._out_rate > 0 else 0.0
        if self._started:
            span = now - self._interval_start
            self.drain_per_s = self._started / span if span <= MAX_RATE_SPAN_S else 0.0
        if self._past and not self._past_devices:
            # all that waited past the bound were one device's, and no other device's did within
            # a bound before them: they waited behind its own requests (one that hung on a store
            # until its timeout), not in a queue the others share. Each was answered on its own
            # merits (refused if it has a reply); the verdict on everyone's is left to the rest.
            self._started -= self._past
            self._waited -= self._past_waited
            self._past = 0
            if not self._started:  # none left: the verdict stands, but what waits to go out counts
                self.late = self.late or self.out_wait_s > self._stale_after
        if self._started:
            self.wait_s = self._waited / self._started
            # most waited past the bound, or the replies of those handled now would wait past it
            self.late = 2 * self._past > self._started or self.out_wait_s > self._stale_after
        elif self.held == 0:  # idle
            self.wait_s = 0.0
            self.late = False
        # else nothing started while requests were held: the last verdict stands
        if self._held_back:
            # a send that left within a window and still waits this long after it is refused anyway
            horizon = self._stale_after if self.max_delay_s else HOLD_KEPT_S
            for topic in [t for t, h in self._held_back.items() if h.until + horizon < now]:
                del self._held_back[topic]
        self._started = self._past = 0
        self._waited = self._past_waited = 0.0
        self._past_devices = False
        self._interval_start = now

    def retry_after(self) -> int:
        """A refusal's ``retry_after_ms``: about how long what is held takes to drain."""
        wait_s = self.held / self.drain_per_s if self.drain_per_s > 0 else 0.0
        return max(self.retry_after_ms, min(MAX_RETRY_AFTER_MS, math.ceil(wait_s * 1000)))

    def _request(self, parts: list[str], payload: bytes | bytearray) -> Request | None:
        """The request a device published on ``up/{user}/{device}``; None for anything else,
        or one the protocol refuses (the router answers that without any store call)."""
        try:
            return parse_any(payload, self._max_payload) if len(parts) == 3 and parts[0] == "up" else None
        except ProtocolError:
            return None
        except Exception:  # noqa: BLE001 - a payload no check foresaw must not stop the intake: the router answers it
            log.exception("admission could not read a publish on %s", "/".join(parts))
            return None

    def _holds_back(self, topic: str, left_at: float) -> bool:
        """A publish of this device that left it at ``left_at`` (the clock's time) is in the
        window of a refusal of one of its sends."""
        held = self._held_back.get(topic)
        return held is not None and held.since <= left_at < held.until

    def _refused_send(self, topic: str, payload: bytes | bytearray, left_at: float) -> list[Out] | None:
        """A publish in a device's window (it left at ``left_at``): refused if it is a send, else
        None (taken as usual); the first refused send coming back is taken, and the window ends
        where it left: a send that left before it and still waits (behind a slow request of the
        device) is refused all the same, and sent again after it."""
        parts = topic.split("/")
        req = self._request(parts, payload)
        if not isinstance(req, Send):
            return None
        held = self._held_back[topic]
        if req.id == held.first:
            held.until = min(held.until, left_at)
            self._tell_hold(topic, held)
            return None
        return [self._refusal(req, parts, "an earlier send of this device was refused")]

    def _expired(self, topic: str, payload: bytes | bytearray, waited: float, left_at: float) -> list[Out] | None:
        parts = topic.split("/")
        req = self._request(parts, payload)
        if req is None or isinstance(req, (Ack, PresenceReq)):
            return None  # no reply to wait for, or one the router gives without any store call: handled
        if isinstance(req, Typing):
            self.shed("typing")
            return []
        return [self._refusal(req, parts, f"this request waited {waited * 1000:.0f} ms", left_at)]

    def _over(self, topic: str, payload: bytes | bytearray, queued: int, waited: float = 0.0) -> list[Out] | None:
        parts = topic.split("/")
        req = self._request(parts, payload)
        if req is None or isinstance(req, (Ack, PresenceReq)):
            # not a request (the router logs and ignores it), an invalid one (answered by the
            # router without any store call), an ack or a presence change: taken in, up to the
            # ceiling
            if self.held < self.ceiling:
                self.held += 1
                return None
            self.shed("ack" if isinstance(req, Ack) else "presence" if isinstance(req, PresenceReq) else "other")
            return []
        if isinstance(req, Typing):
            self.shed("typing")
            return []
        why = (f"{queued} requests of this device are waiting already" if queued >= self.per_device
               else f"this request waited {waited * 1000:.0f} ms to be read" if waited > self._stale_after
               else f"requests wait {self.wait_s * 1000:.0f} ms" if self.late
               else f"{self.held} requests are held")
        return [self._refusal(req, parts, why, self.clock() - waited)]

    def _refusal(self, req: Request, parts: list[str], why: str, left_at: float | None = None) -> Out:
        """The refusal of ``req``; with ``left_at`` (when a send left its device), a window opens
        for the device's sends that left after it (the module's docstring)."""
        if self._metrics is not None:
            self._metrics.refused.labels(req.type).inc()
            self._metrics.errors.labels("rate_limited", "mqtt").inc()
        exc = RateLimited(f"the server is overloaded ({why}); retry later", retry_after_ms=self.retry_after())
        if left_at is not None and isinstance(req, Send):
            self._hold_back("/".join(parts), left_at, exc.retry_after_ms / 1000, req.id)
        log.debug("overloaded (%d held): refused a %s on %s: %s", self.held, req.type, "/".join(parts), why)
        body = ErrorReply(id=getattr(req, "id", None), code=exc.mqtt_code, message=exc.message,
                          retry_after_ms=exc.retry_after_ms)
        # at QoS 0: lost only with the device's connection, when it sends again anyway; at QoS 1 a
        # flood of refusals would take the outgoing connection's window from the replies
        return Out(ToDevice(parts[1], parts[2]), body, qos=0)

    def _hold_back(self, topic: str, left_at: float, retry_after_s: float, refused: str) -> None:
        until = self.clock() + (min(retry_after_s, self.max_delay_s) if self.max_delay_s else retry_after_s)
        held = self._held_back.get(topic)
        if held is None or left_at >= held.until:  # none open, or a new episode
            self._held_back[topic] = HeldBack(left_at, until, refused)
        else:  # one more refusal in the same window: it grows; its oldest send closes it on return
            if left_at < held.since:
                held.since, held.first = left_at, refused
            held.until = max(held.until, until)
        self._tell_hold(topic, self._held_back[topic])

    def _tell_hold(self, topic: str, held: HeldBack) -> None:
        if self.on_hold is not None:
            self.on_hold(topic, time.time() + (held.until - self.clock()), held.first)

    def adopt(self, topic: str, until: float, first: str) -> None:
        """A device's window as the previous holder of its partition recorded it (``until`` as
        time.time()): the device's sends taken in here before it closes are refused, until
        ``first`` comes back. (Sends the device made before that refusal and which still wait
        in the broker cannot be told from later ones here: they are refused too, and the device
        sends them again in its order.) One this bridge has of its own and still open is kept
        as it is; one of its own that has closed (the partition went and came back) is not."""
        left = until - time.time()
        now = self.clock()
        mine = self._held_back.get(topic)
        if left > 0 and (mine is None or mine.until <= now):
            self._held_back[topic] = HeldBack(-math.inf, now + left, first)

    def check_http(self) -> None:
        """An HTTP send is refused with 429 past the limit, like one over MQTT (it is not
        counted as held: it holds its own connection, not a queue slot)."""
        if self.held >= self.limit or (self.late and self.held):
            if self._metrics is not None:
                self._metrics.refused.labels("send").inc()
            raise RateLimited("the server is overloaded; retry later", retry_after_ms=self.retry_after())

    def shed(self, what: str) -> None:
        if self._metrics is not None:
            self._metrics.shed.labels(what).inc()


# how long recording windows, or reading a partition's before taking its session's publishes,
# may take: a shared state that does not answer is gone without (the windows are a few seconds)
HANDOVER_WAIT_S = 2.0


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _bounded_future() -> asyncio.Future[None]:
    """A future that settles by HANDOVER_WAIT_S at the latest."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.call_later(HANDOVER_WAIT_S, _settle, fut)
    return fut


class HeldBackHandover:
    """Devices' refusal windows handed to the next holder of their partition.

    A device's window lives in the admission control of the bridge that refused it. When the
    device's partition moves (a rebalance, a takeover), the sends it still had on their way
    reach the next holder, which without the window would store one of them ahead of the refused
    send: the device's order broken. Each window is recorded in the shared state as it opens,
    grows or closes (one write per partition and turn of the loop, not awaited by the refusal),
    and a bridge reads a partition's, and adopts them, each time it connects that partition's
    broker session, before taking in any of its publishes. The publish whose refusal (or failure)
    opened or moved a window is acknowledged to the broker only once the window is written
    (:meth:`recorded`, bridge/mqtt_ingest.py): had the bridge died before, the broker hands that
    publish to the next holder, ahead of the device's later ones, as if it had never come."""

    def __init__(self, state: SharedState, partitions: Partitions, admission: Admission) -> None:
        self._state, self._partitions, self._admission = state, partitions, admission
        self._noted: dict[int, dict[str, tuple[int, str]]] = {}
        self._writing: asyncio.Task[None] | None = None
        self._notes = 0  # windows noted so far (each one's number: the count when it was noted)
        self._unwritten: dict[str, int] = {}  # topic -> the number of its latest note not yet written
        # settled once the pass being written is through (it covers the notes up to its number),
        # and once the next pass is (the notes made meanwhile): one for every publish waiting
        self._writing_through: tuple[asyncio.Future[None], int] | None = None
        self._next_through: asyncio.Future[None] | None = None

    def note(self, topic: str, until: float, first: str) -> None:
        """``Admission.on_hold``: record a window (``until`` as time.time())."""
        part = self._partitions.partition_of_user(topic.split("/")[1])
        self._noted.setdefault(part, {})[topic] = (int(until * 1000), first)
        self._notes += 1
        self._unwritten[topic] = self._notes
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._write(), name="held-back-windows")

    def recorded(self, topic: str) -> asyncio.Future[None] | None:
        """None when every window of the device's noted so far is written (or given up), else
        what settles once it is, or after HANDOVER_WAIT_S at most (a Redis that is slow or
        gone must not hold the acknowledgements: the broker's window of unacknowledged
        publishes for the session would fill, and the partition stall)."""
        number = self._unwritten.get(topic)
        if number is None:
            return None
        if self._writing_through is not None and number <= self._writing_through[1]:
            return self._writing_through[0]
        if self._next_through is None:
            self._next_through = _bounded_future()
        return self._next_through

    async def _write(self) -> None:
        # (cancelled as the bridge stops: what waited for it is acknowledged only past its bound,
        # if the loop still runs; else the broker hands it to the partition's next holder)
        while self._noted:
            noted, self._noted = self._noted, {}
            through = self._notes  # (every note so far is in ``noted``)
            done, self._next_through = self._next_through or _bounded_future(), None
            self._writing_through = (done, through)
            await asyncio.gather(*(self._put(part, windows) for part, windows in noted.items()))
            self._writing_through = None
            self._unwritten = {t: n for t, n in self._unwritten.items() if n > through}
            _settle(done)

    async def _put(self, part: int, windows: dict[str, tuple[int, str]]) -> None:
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                await self._state.put_held_back(self._partitions.partition_scope, part, windows)
        except Exception as exc:  # noqa: BLE001 - the windows hold here all the same
            log.warning("recording %d refusal windows of partition %d failed: %r", len(windows), part, exc)

    async def adopt(self, part: int) -> None:
        """Adopt the windows recorded for a partition (its session is being connected here)."""
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                windows = await self._state.held_back(self._partitions.partition_scope, part,
                                                      int(time.time() * 1000))
        except Exception as exc:  # noqa: BLE001 - taken over without them
            log.warning("reading the refusal windows of partition %d failed: %r", part, exc)
            return
        for topic, (until_ms, first) in windows.items():
            self._admission.adopt(topic, until_ms / 1000, first)
