"""Admission control end to end, on a real server with small bounds set by its options.

- Past ``--max-pending`` a burst of sends is answered ``rate_limited`` with ``retry_after_ms``
  at once, never queued; every send answered ``sent`` is stored, no refused one is, and a
  refused send tried again later is stored once.
- While shedding (``--shed-pending 0``: always), typing and presence changes are not relayed,
  and sends still are.
- Past ``--max-pending-device`` one device's burst is refused, and another device's send is not.
- A device that keeps pushing past its rate limit (``--kick-after``) is disconnected; its will
  is published, and what it was told was ``sent`` is stored.
- Bounded by delay (``--max-queue-delay-ms``), with the count bounds out of reach: under a
  flood the accepted sends are answered within a small multiple of the bound, the rest are
  refused at once, and every send answered ``sent`` is stored.

Each runs on the embedded profile, and on Mosquitto when scripts/services is up.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.bench.mqtt import MqttConn, connect
from clients.launch import ServerProc
from clients.sdk import Device, Profile, login
from tests.conftest import broker_flags, fresh_phone, metric, production_flags
from tests.test_e2e_messaging import next_of

PROFILES = ["embedded", "mosquitto"]
BURST = 60


def start(tmp: Path, profile: str, *flags: str) -> ServerProc:
    extra = [*production_flags(), *broker_flags()] if profile == "mosquitto" else []
    return ServerProc.start(tmp, *extra, *flags)


@pytest.fixture(scope="module", params=PROFILES)
def bounded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """At most 4 requests held; the per-device limit far away."""
    srv = start(tmp_path_factory.mktemp(f"bounded-{request.param}"), request.param,
                "--max-pending", "4", "--shed-pending", "2", "--overload-retry-ms", "300",
                "--rate", "1000", "--burst", "1000")
    srv.profile = request.param
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=PROFILES)
def per_device(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """At most 3 requests of one device held; the bound on all far away."""
    srv = start(tmp_path_factory.mktemp(f"per-device-{request.param}"), request.param,
                "--max-pending-device", "3", "--max-pending", "100000", "--rate", "1000", "--burst", "1000")
    srv.profile = request.param
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=PROFILES)
def strict(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """Always shedding; 5 requests of burst per device, disconnected after 10 refusals."""
    srv = start(tmp_path_factory.mktemp(f"strict-{request.param}"), request.param,
                "--shed-pending", "0", "--rate", "1", "--burst", "5", "--kick-after", "10")
    srv.profile = request.param
    yield srv
    srv.stop()


# the delay bound of the flood test, and its flood: sends offered at a steady rate, several times
# what one bridge handles on any machine this runs on, so that without the bound they queue and
# the later ones wait seconds (a rate rather than one burst: a burst waits in the kernel's socket
# buffers before the bridge reads it, where no server can see how long it waited). 1,200 a
# second stopped being enough once the embedded broker wrote QoS 0 publishes at once: all 7,200
# were answered within the bound on this 2-core box; at 2,000 a second 40-60 % were refused,
# until a full run on a fast hour of the box (2026-12-06) saw none of the 12,000 refused, the
# embedded default having reached 2,756-2,990 msgs/s in the bench meanwhile. Now 4,800 a
# second, for half as long.
MAX_DELAY_MS = 200
FLOODERS, FLOOD_RATE, FLOOD_S = 8, 600, 3.0


@pytest.fixture(scope="module", params=PROFILES)
def delayed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """Bounded by delay only: the count bounds and the rate limit far out of reach."""
    srv = start(tmp_path_factory.mktemp(f"delayed-{request.param}"), request.param,
                "--max-queue-delay-ms", str(MAX_DELAY_MS), "--max-pending", "100000",
                "--max-pending-device", "100000", "--rate", "100000", "--burst", "100000", "--kick-after", "0")
    srv.profile = request.param
    yield srv
    srv.stop()


class Raw:
    """A device on a bare MQTT connection that publishes without waiting for anything."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.up = f"up/{profile.user_id}/{profile.device_id}"
        self.replies: dict[str, tuple[dict[str, Any], float]] = {}  # id -> (reply, when it came)
        self.got = asyncio.Event()
        self.conn: MqttConn | None = None
        self.sent_at: dict[str, float] = {}

    def on_message(self, topic: str, payload: bytes) -> None:
        ev = json.loads(payload)
        if isinstance(ev.get("id"), str) and ev.get("type") in ("sent", "error"):
            self.replies[ev["id"]] = (ev, time.monotonic())
            self.got.set()

    async def open(self, srv: ServerProc) -> Raw:
        p = self.profile
        self.conn = await connect(srv.mqtt_host, srv.mqtt_port, p.device_id, p.device_id, p.token, self.on_message,
                                  will=(self.up, b'{"type":"presence","state":"offline"}'))
        await self.conn.subscribe([f"down/{p.user_id}/{p.device_id}"], timeout=10)
        return self

    async def flood(self, to: str, rate: float, seconds: float) -> list[str]:
        """Sends at ``rate`` a second for ``seconds``, open loop, each sent at its own time
        (``self.sent_at``)."""
        assert self.conn is not None
        ids: list[str] = []
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + 1
            while len(ids) < due:
                rid = uuid.uuid4().hex
                self.sent_at[rid] = time.monotonic()
                self.conn.publish(self.up, json.dumps({"type": "send", "id": rid, "to": to,
                                                       "body": f"b{len(ids)}"}).encode())
                ids.append(rid)
            await asyncio.sleep(0.01)
        return ids

    def burst(self, to: str, n: int) -> list[str]:
        assert self.conn is not None
        ids = [uuid.uuid4().hex for _ in range(n)]
        for i, rid in enumerate(ids):
            self.conn.publish(self.up, json.dumps({"type": "send", "id": rid, "to": to, "body": f"b{i}"}).encode())
        return ids

    async def answers(self, ids: list[str], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(i in self.replies for i in ids):
                self.got.clear()
                await self.got.wait()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.abort()


async def stored_bodies(dev: Device, chat: str) -> list[str]:
    page = await dev.api.history(chat, limit=200)
    return [m.get("body", "") for m in page["messages"]]


async def test_past_the_bound_sends_are_refused_at_once_and_nothing_answered_sent_is_lost(
        bounded: ServerProc) -> None:
    a = await login(bounded.http, fresh_phone())
    b = await login(bounded.http, fresh_phone())
    raw = await Raw(a).open(bounded)
    try:
        t0 = time.monotonic()
        ids = raw.burst(b.user_id, BURST)
        await raw.answers(ids)  # every send answered: sent or refused, none left waiting
        sent = [i for i in ids if raw.replies[i][0]["type"] == "sent"]
        refused = [i for i in ids if raw.replies[i][0]["type"] == "error"]
        assert len(sent) + len(refused) == BURST
        assert refused, f"nothing refused with 4 held at most ({bounded.profile})"
        assert sent, "nothing stored at all"
        for i in refused:
            reply = raw.replies[i][0]
            # at least the setting; more when the backlog takes longer to drain
            assert reply["code"] == "rate_limited" and reply["retry_after_ms"] >= 300, reply
        # at once: the first refusal came before the last send was answered 'sent'
        assert min(raw.replies[i][1] for i in refused) <= max(raw.replies[i][1] for i in sent)
        assert min(raw.replies[i][1] for i in refused) - t0 < 5.0
        async with Device(b) as db:
            chat = raw.replies[sent[0]][0]["chat"]
            bodies = await stored_bodies(db, chat)
            by_id = {rid: f"b{n}" for n, rid in enumerate(ids)}
            assert sorted(bodies) == sorted(by_id[i] for i in sent)  # each 'sent' stored, no refused one
            # the refused ones, sent again after the wait they were told, are stored once each
            await asyncio.sleep(0.3)
            assert raw.conn is not None
            raw.replies = {k: v for k, v in raw.replies.items() if k not in refused}
            for i in refused:
                raw.conn.publish(raw.up, json.dumps({"type": "send", "id": i, "to": b.user_id,
                                                     "body": by_id[i]}).encode())
                await asyncio.sleep(0.01)
            await raw.answers(refused)
            again = [i for i in refused if raw.replies[i][0]["type"] == "sent"]
            assert again, "nothing accepted once the load was gone"
            bodies = await stored_bodies(db, chat)
            assert sorted(bodies) == sorted(by_id[i] for i in sent + again)
        assert await metric(bounded, 'pigeon_overload_refused_total{type="send"}') >= len(refused)
        assert await metric(bounded, "pigeon_requests_held") == 0  # every count given back
    finally:
        raw.close()


async def test_past_a_devices_own_bound_its_sends_are_refused_and_another_devices_are_not(
        per_device: ServerProc) -> None:
    """Each way in counts a device's own requests held (its queue, handled one at a time): past
    ``--max-pending-device`` its burst is refused, while a device sending one at a time meanwhile
    is not."""
    a, b, c = [await login(per_device.http, fresh_phone()) for _ in range(3)]
    raw, calm = await Raw(a).open(per_device), await Raw(c).open(per_device)
    try:
        ids = raw.burst(b.user_id, BURST)
        calm_ids = calm.burst(b.user_id, 1)
        await raw.answers(ids)
        await calm.answers(calm_ids)
        refused = [raw.replies[i][0] for i in ids if raw.replies[i][0]["type"] == "error"]
        assert refused, f"nothing of a burst of {BURST} refused with 3 of a device held at most ({per_device.profile})"
        assert all(r["code"] == "rate_limited" and "of this device" in r["message"] for r in refused), refused[0]
        assert calm.replies[calm_ids[0]][0]["type"] == "sent"
        assert await metric(per_device, "pigeon_requests_held") == 0  # every count given back
    finally:
        raw.close()
        calm.close()


async def test_while_shedding_typing_and_presence_are_not_relayed_but_sends_are(strict: ServerProc) -> None:
    a = await login(strict.http, fresh_phone())
    b = await login(strict.http, fresh_phone())
    async with Device(a) as da, Device(b) as db:
        sent = await da.send("hi", to=b.user_id)
        await next_of(db, "msg", timeout=10, id=sent["id"])
        await db.watch([a.user_id], ttl=60)
        await da.typing(sent["chat"])
        marker = await da.send("after typing", to=b.user_id)
        # the marker arrives; nothing typed or presence-related came before it
        async with asyncio.timeout(10):
            while True:
                ev = await db.next_event()
                assert ev["type"] not in ("typing",), ev
                if ev["type"] == "msg" and ev["id"] == marker["id"]:
                    break
    assert await metric(strict, 'pigeon_overload_shed_total{what="typing"}') >= 1


async def test_a_device_that_keeps_pushing_past_its_limit_is_disconnected(strict: ServerProc) -> None:
    a = await login(strict.http, fresh_phone())
    b = await login(strict.http, fresh_phone())
    raw = await Raw(a).open(strict)
    try:
        assert raw.conn is not None
        ids = raw.burst(b.user_id, 40)
        async with asyncio.timeout(30):  # a loaded machine may be slow; the server must close it
            await raw.conn.closed
        sent = [i for i in ids if i in raw.replies and raw.replies[i][0]["type"] == "sent"]
        codes = {raw.replies[i][0].get("code") for i in ids if i in raw.replies} - {None}
        # refusals still on their way when it was cut off may not reach it (on Mosquitto the kick
        # overtakes them); none of those was stored, and nothing else was answered
        assert codes <= {"rate_limited"}, codes
        assert 1 <= len(sent) <= 6  # its burst of 5 (and a token refilled meanwhile)
        async with Device(b) as db:
            chat = raw.replies[sent[0]][0]["chat"]
            assert len(await stored_bodies(db, chat)) >= len(sent)  # what it was told 'sent' is kept
        assert await metric(strict, "pigeon_devices_disconnected_total") >= 1
        # it may connect again, and is served once it keeps to its limit
        await asyncio.sleep(1.5)
        raw2 = await Raw(a).open(strict)
        try:
            again = raw2.burst(b.user_id, 1)
            await raw2.answers(again, timeout=10)
            assert raw2.replies[again[0]][0]["type"] == "sent"
        finally:
            raw2.close()
    finally:
        raw.close()


async def test_bounded_by_delay_accepted_sends_are_answered_within_a_small_multiple_of_the_bound(
        delayed: ServerProc) -> None:
    recipient = await login(delayed.http, fresh_phone())
    raws = [await Raw(await login(delayed.http, fresh_phone())).open(delayed) for _ in range(FLOODERS)]
    try:
        bursts = await asyncio.gather(*(raw.flood(recipient.user_id, FLOOD_RATE, FLOOD_S) for raw in raws))
        for raw, ids in zip(raws, bursts, strict=True):
            await raw.answers(ids, timeout=120)  # every send answered, none left waiting
        accepted = sorted(raw.replies[i][1] - raw.sent_at[i] for raw, ids in zip(raws, bursts, strict=True)
                          for i in ids if raw.replies[i][0]["type"] == "sent")
        refused = sorted(raw.replies[i][1] - raw.sent_at[i] for raw, ids in zip(raws, bursts, strict=True)
                         for i in ids if raw.replies[i][0]["type"] == "error")
        # a refusal is answered as its send is read: its time is the way there and back, which
        # on a loaded machine includes this process's own delay in reading the answers
        way = refused[len(refused) // 2] if refused else 0.0
        codes = {raw.replies[i][0].get("code") for raw, ids in zip(raws, bursts, strict=True) for i in ids} - {None}
        total = sum(len(ids) for ids in bursts)
        assert len(accepted) >= 5, f"only {len(accepted)} of {total} accepted ({delayed.profile})"
        # Held to the bound, an accepted send waits about the bound more than a refused one (plus
        # an interval and its own handling): 95 % within 15 times it leaves room for a loaded
        # machine. Without it, the sends queue behind each other and the later ones wait seconds.
        p95 = accepted[int(0.95 * (len(accepted) - 1))]
        assert p95 <= way + 15 * MAX_DELAY_MS / 1000, (
            f"{delayed.profile}: accepted sends p95 {p95:.2f} s, refused ones' median {way:.2f} s, "
            f"{len(accepted)} of {total} accepted")
        assert codes == {"rate_limited"}, f"nothing refused, or refused otherwise: {codes} ({delayed.profile})"
        # nothing answered 'sent' is lost: each flooder's chat with the recipient holds exactly those
        async with Device(recipient) as db:
            for raw, ids in list(zip(raws, bursts, strict=True))[:2]:
                sent = [i for i in ids if raw.replies[i][0]["type"] == "sent"]
                if not sent:
                    continue
                chat = raw.replies[sent[0]][0]["chat"]
                history: list[str] = []
                after = None
                while True:
                    page = await db.api.history(chat, before=after, limit=200)
                    history.extend(m.get("body", "") for m in page["messages"])
                    if len(page["messages"]) < 200:
                        break
                    after = min(m["seq"] for m in page["messages"])
                by_id = {rid: f"b{n}" for n, rid in enumerate(ids)}
                assert sorted(history) == sorted(by_id[i] for i in sent)
        assert await metric(delayed, "pigeon_requests_held") == 0
    finally:
        for raw in raws:
            raw.close()
