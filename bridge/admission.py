"""Admission control: a bound on the device requests this bridge holds, and what happens past it.

*Held* is every device publish taken in and not yet handled to the end: queued for an ingest
worker (``bridge.mqtt_ingest``, external broker), or waiting in a device's queue of the
embedded broker (in-process ingest), or being handled (store calls in flight). Each path counts
a publish with :meth:`Admission.admit` when it takes it in and gives it back with
:meth:`Admission.release` once handled, so the check per publish is a few integer compares
(on the embedded broker, and the length of its broadcast queue): no await, no allocation.

Three levels, by what is held:

- below ``shed_at``: everything is taken in;
- from ``shed_at``: typing relays are dropped and presence changes are not fanned out to
  watchers (presence itself is still recorded): work no one stores and no one misses for long
  goes first, before any send is refused;
- from ``limit`` held in all, or ``per_device`` of the sending device's own (on the embedded
  broker, where a device's requests are handled one at a time, so its own queue is its wait):
  a new publish is not queued. It is read at once and, if it is a request with
  a reply (``send``, ``sync``, ``read``, ``watch``, ``media_*``), answered at once with
  ``rate_limited`` and ``retry_after_ms``; nothing of it is stored, so a retry is safe and the
  same ``id`` later stores it once. ``typing`` is dropped. ``ack`` and ``presence`` are still
  taken in: an ack is folded per device (``bridge.router.AckLane``) and a presence change is one
  small write, and refusing them would leave receipts and online state wrong until the device's
  next one. They too stop at a ceiling, a quarter above ``limit``: past it they are dropped
  (a later ack covers a dropped one), so what is held never exceeds the ceiling.

On the embedded broker the replies and events waiting to go out (amqtt's one broadcast queue,
which every publication passes through one at a time) are bounded by the same ``limit``:
``backlog`` reads its length, and past ``limit`` new requests are refused as above. Otherwise
requests taken in would be answered in time and their replies would queue there instead, out
of any bound (the trial run before this check: nothing held, and sends answered 6 to 9 s late).

A device that keeps pushing past its own per-device limit is a different matter, decided in
``bridge.ratelimit.Strikes`` and ``bridge.router``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import ProtocolError, RateLimited
from .metrics import Metrics
from .outbox import Out, ToDevice
from .protocol import Ack, ErrorReply, PresenceReq, Typing
from .wire_v2 import parse_any

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

class Admission:
    def __init__(self, limit: int = DEFAULT_LIMIT, shed_at: int | None = None,
                 retry_after_ms: int = DEFAULT_RETRY_AFTER_MS, max_payload: int = 64 * 1024,
                 metrics: Metrics | None = None, per_device: int = DEFAULT_PER_DEVICE) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        shed = limit // 2 if shed_at is None else shed_at
        if not 0 <= shed <= limit:
            raise ValueError(f"shed_at must be between 0 and the limit ({limit}), got {shed}")
        if retry_after_ms < 1:
            raise ValueError(f"retry_after_ms must be at least 1, got {retry_after_ms}")
        if per_device < 1:
            raise ValueError(f"per_device must be at least 1, got {per_device}")
        self.limit = limit
        self.ceiling = limit + limit // 4
        self.per_device = per_device
        self.shed_at = shed
        self.retry_after_ms = retry_after_ms
        self._max_payload = max_payload
        self._metrics = metrics
        self.held = 0
        # publications waiting to go out, where the broker queues them (the embedded broker)
        self.backlog: Callable[[], int] | None = None

    @property
    def shedding(self) -> bool:
        """Typing and presence fan-out are dropped."""
        return self.held >= self.shed_at or (self.backlog is not None and self.backlog() >= self.shed_at)

    def admit(self, topic: str, payload: bytes | bytearray, queued: int = 0) -> list[Out] | None:
        """Take in one device publish, ``queued`` of its device's being held already (0 where
        that is not known): None if taken (counted: :meth:`release` it once handled), else what
        to publish instead (the refusal, or nothing), at once."""
        if self.held < self.limit and queued < self.per_device and (self.backlog is None
                                                                     or self.backlog() < self.limit):
            self.held += 1
            return None
        return self._over(topic, payload, queued)

    def release(self) -> None:
        self.held -= 1

    def _over(self, topic: str, payload: bytes | bytearray, queued: int) -> list[Out] | None:
        parts = topic.split("/")
        try:
            req = parse_any(payload, self._max_payload) if len(parts) == 3 and parts[0] == "up" else None
        except ProtocolError:
            req = None
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
        if self._metrics is not None:
            self._metrics.refused.labels(req.type).inc()
            self._metrics.errors.labels("rate_limited", "mqtt").inc()
        why = (f"{queued} requests of this device are waiting already" if queued >= self.per_device
               else "the server is overloaded")
        exc = RateLimited(f"{why}; retry later", retry_after_ms=self.retry_after_ms)
        log.debug("overloaded (%d held, %d of the device): refused a %s on %s", self.held, queued, req.type, topic)
        body = ErrorReply(id=getattr(req, "id", None), code=exc.mqtt_code, message=exc.message,
                          retry_after_ms=exc.retry_after_ms)
        return [Out(ToDevice(parts[1], parts[2]), body)]

    def check_http(self) -> None:
        """An HTTP send is refused with 429 past the limit, like one over MQTT (it is not
        counted as held: it holds its own connection, not a queue slot)."""
        if self.held >= self.limit:
            if self._metrics is not None:
                self._metrics.refused.labels("send").inc()
            raise RateLimited("the server is overloaded; retry later", retry_after_ms=self.retry_after_ms)

    def shed(self, what: str) -> None:
        if self._metrics is not None:
            self._metrics.shed.labels(what).inc()
