"""Admission control and the per-device strikes: the bound, what is shed first, what is refused,
and who is disconnected (bridge/admission.py, bridge/ratelimit.py, bridge/router.py). No network."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from bridge.admission import MAX_RETRY_AFTER_MS, Admission
from bridge.clock import ManualClock
from bridge.config import Settings
from bridge.errors import ConfigError, RateLimited
from bridge.metrics import Metrics
from bridge.protocol import Watch
from bridge.ratelimit import RateLimiter, Strikes
from bridge.router import DeviceRouter
from bridge.wire import encode_v1, topic_of
from tests.fakes import until
from tests.test_handlers import World, world  # noqa: F401 - the handler tests' fixture

TOPIC = "up/u1/d1"


def device(n: int) -> str:
    """The up topic of one of many devices (a standing queue is one that several devices' requests wait in)."""
    return f"up/u{n}/d{n}"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_below_the_limit_every_publish_is_taken_in_and_counted_until_released() -> None:
    adm = Admission(limit=3)
    assert [adm.admit(TOPIC, body(type="send", id=f"m{i}", to="u2", body="x")) for i in range(3)] == [None] * 3
    assert adm.held == 3
    adm.release()
    assert adm.held == 2
    assert adm.admit(TOPIC, body(type="send", id="m3", to="u2", body="x")) is None
    assert adm.held == 3


def test_past_the_limit_a_send_is_answered_rate_limited_at_once_and_not_taken_in() -> None:
    metrics = Metrics()
    adm = Admission(limit=2, retry_after_ms=750, metrics=metrics)
    for i in range(2):
        assert adm.admit(TOPIC, body(type="send", id=f"m{i}", to="u2", body="x")) is None
    outs = adm.admit(TOPIC, body(type="send", id="late", to="u2", body="x"))
    assert outs is not None and len(outs) == 1
    assert topic_of(outs[0].to) == "down/u1/d1"
    reply = json.loads(encode_v1(outs[0].event))
    assert reply == {"type": "error", "id": "late", "code": "rate_limited", "message": reply["message"],
                     "retry_after_ms": 750}
    assert adm.held == 2  # not counted: nothing of it is held
    for kind, extra in (("sync", {"after": 0}), ("read", {"chat": "c1", "up_to": 1}),
                        ("watch", {"users": ["u2"]})):
        refused = adm.admit(TOPIC, body(type=kind, id=f"r-{kind}", **extra))
        assert refused is not None and json.loads(encode_v1(refused[0].event))["code"] == "rate_limited"
    assert sample(metrics, "pigeon_overload_refused_total", type="send") == 1
    assert sample(metrics, "pigeon_errors_total", code="rate_limited", edge="mqtt") == 4
    assert adm.held == 2


def test_past_the_limit_a_payload_nested_too_deeply_is_taken_in_for_the_router_to_answer() -> None:
    """Admission control reads a publish only to refuse it; one no reader can take (nested past
    the JSON parser's depth) is taken in like any invalid request, up to the ceiling, and the
    router answers it bad_request."""
    adm = Admission(limit=4, per_device=1)
    assert adm.admit(TOPIC, body(type="sync", id="s", after=0)) is None
    assert adm.admit(TOPIC, b"[" * 5000, queued=1) is None  # past the device's own bound: read
    assert adm.held == 2
    assert adm.start(TOPIC, b"[" * 5000, adm.clock() - 60) is None  # waited past any bound: handled all the same


def test_past_the_limit_typing_is_dropped_while_acks_and_presence_are_still_taken_in_up_to_a_ceiling() -> None:
    metrics = Metrics()
    adm = Admission(limit=4, metrics=metrics)
    assert adm.ceiling == 5
    for i in range(4):
        assert adm.admit(TOPIC, body(type="send", id=f"m{i}", to="u2", body="x")) is None
    assert adm.admit(TOPIC, body(type="typing", chat="c1")) == []
    assert sample(metrics, "pigeon_overload_shed_total", what="typing") == 1
    assert adm.admit(TOPIC, body(type="ack", up_to=5)) is None
    assert adm.held == 5  # counted, and released once handled like any other
    # at the ceiling even these are dropped (a later ack covers a dropped one)
    assert adm.admit(TOPIC, body(type="ack", up_to=6)) == []
    assert adm.admit(TOPIC, body(type="presence", state="offline")) == []
    assert adm.admit(TOPIC, b"not json") == []
    assert adm.held == 5
    assert sample(metrics, "pigeon_overload_shed_total", what="ack") == 1
    assert sample(metrics, "pigeon_overload_shed_total", what="presence") == 1
    adm.release()
    assert adm.admit(TOPIC, body(type="presence", state="offline")) is None
    adm.release()
    adm.release()
    assert adm.admit(TOPIC, b"not json") is None  # the router answers it, with no store call
    assert adm.admit("elsewhere", b"{}") is None


def test_a_device_with_its_own_queue_full_is_refused_while_others_are_taken_in() -> None:
    adm = Admission(limit=100, per_device=2)
    send = body(type="send", id="m", to="u2", body="x")
    assert adm.admit(TOPIC, send, queued=1) is None
    refused = adm.admit(TOPIC, send, queued=2)
    assert refused is not None and json.loads(encode_v1(refused[0].event))["code"] == "rate_limited"
    assert "2 requests of this device" in json.loads(encode_v1(refused[0].event))["message"]
    assert adm.admit("up/u3/d3", send, queued=0) is None  # another device is not held up
    assert adm.admit(TOPIC, body(type="ack", up_to=1), queued=5) is None  # acks still go in
    assert adm.held == 3
    with pytest.raises(ValueError):
        Admission(limit=4, per_device=0)


def test_shedding_starts_at_half_the_limit_unless_told_and_before_any_refusal() -> None:
    adm = Admission(limit=4)
    assert adm.shed_at == 2 and not adm.shedding
    adm.admit(TOPIC, b"{}")
    adm.admit(TOPIC, b"{}")
    assert adm.shedding and adm.held < adm.limit  # shedding, nothing refused yet
    assert Admission(limit=4, shed_at=0).shedding  # 0: always shed
    with pytest.raises(ValueError):
        Admission(limit=0)
    with pytest.raises(ValueError):
        Admission(limit=4, shed_at=5)
    with pytest.raises(ValueError):
        Admission(limit=4, retry_after_ms=0)


def test_an_http_send_is_refused_past_the_limit_too() -> None:
    adm = Admission(limit=1)
    adm.check_http()
    adm.admit(TOPIC, b"{}")
    with pytest.raises(RateLimited) as got:
        adm.check_http()
    assert got.value.retry_after_ms == adm.retry_after_ms


@pytest.mark.parametrize("values", [
    {"max_pending": 0}, {"max_pending": 10, "shed_pending": 11}, {"shed_pending": -1},
    {"overload_retry_ms": 0}, {"kick_after": -1}, {"max_pending_device": 0},
])
def test_bad_admission_settings_are_refused_by_name(values: dict[str, int]) -> None:
    with pytest.raises(ConfigError) as got:
        Settings(secret=b"s" * 32, **values).validated()  # type: ignore[arg-type]
    assert next(iter(values)) in str(got.value)


async def test_while_shedding_typing_is_dropped_before_any_store_call(world: World) -> None:  # noqa: F811
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    sent = await world.router.handle(f"up/{a.user_id}/{a.device_id}",
                                     body(type="send", id="m1", to=b.user_id, body="hi"))
    chat = json.loads(encode_v1(sent[-1].event))["chat"]
    await world.presence.device_online(b.user_id, b.device_id, explicit=True)
    metrics = Metrics()
    adm = Admission(limit=10, shed_at=1, metrics=metrics)
    router = DeviceRouter(world.messenger, world.presence, world.media, RateLimiter(world.clock, 100, 100),
                          metrics, 64 * 1024, admission=adm)
    typing = body(type="typing", chat=chat)
    outs = await router.handle(f"up/{a.user_id}/{a.device_id}", typing)
    assert [topic_of(o.to) for o in outs] == [f"down/{b.user_id}"]  # nothing held: relayed
    adm.admit(TOPIC, b"{}")  # one held: shedding
    world.store.failing = {"get_chat", "user_chats", "chat_members"}  # any store call would fail
    assert await router.handle(f"up/{a.user_id}/{a.device_id}", typing) == []
    assert sample(metrics, "pigeon_overload_shed_total", what="typing") == 1


async def test_while_shedding_presence_is_recorded_but_not_fanned_out(world: World) -> None:  # noqa: F811
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    await world.router.handle(f"up/{a.user_id}/{a.device_id}", body(type="send", id="m1", to=b.user_id, body="x"))
    await world.presence.watch(a.user_id, a.device_id, Watch(id="w", users=(b.user_id,), ttl=60))
    metrics = Metrics()
    adm = Admission(limit=10, shed_at=1, metrics=metrics)
    world.presence.admission = adm
    outs = await world.presence.device_online(b.user_id, b.device_id, explicit=True)
    assert [topic_of(o.to) for o in outs] == [f"down/{a.user_id}/{a.device_id}"]  # not shedding: a watcher is told
    adm.admit(TOPIC, b"{}")
    assert await world.presence.device_offline(b.user_id, b.device_id) == []
    assert not await world.presence.is_online(b.user_id)  # recorded all the same
    assert sample(metrics, "pigeon_overload_shed_total", what="presence") == 1


def test_strikes_count_refusals_within_a_window_and_start_over() -> None:
    clock = ManualClock()
    strikes = Strikes(clock, limit=3, window_s=10.0)
    assert [strikes.add("d") for _ in range(3)] == [False, False, True]
    assert len(strikes) == 0  # counting starts over once a device is out
    assert [strikes.add("d") for _ in range(2)] == [False, False]
    clock.advance(10.0)  # a new window: the two old refusals no longer count
    assert [strikes.add("d") for _ in range(2)] == [False, False]
    assert strikes.add("other") is False  # per device


def test_strikes_memory_is_bounded_and_forgets_stale_windows_first() -> None:
    clock = ManualClock()
    strikes = Strikes(clock, limit=5, window_s=1.0, max_keys=10)
    for i in range(10):
        strikes.add(f"d{i}")
    clock.advance(0.5)
    strikes.add("d0")  # still in its window
    clock.advance(0.6)  # the others' windows are over; d0's too, by now
    strikes.add("d10")
    assert len(strikes) == 1
    for i in range(20):
        strikes.add(f"e{i}")
    assert len(strikes) <= 10


async def test_a_device_that_keeps_pushing_past_its_limit_is_disconnected_and_still_answered(
        world: World) -> None:  # noqa: F811
    a, b = await world.user("+15550000001"), await world.user("+15550000002")
    dropped: list[str] = []

    async def disconnect(device_id: str) -> None:
        dropped.append(device_id)

    metrics = Metrics()
    router = DeviceRouter(world.messenger, world.presence, world.media, RateLimiter(world.clock, 1, 2), metrics,
                          64 * 1024, strikes=Strikes(world.clock, limit=4), disconnect=disconnect)
    codes = []
    for i in range(6):
        outs = await router.handle(f"up/{a.user_id}/{a.device_id}", body(type="send", id=f"m{i}", to=b.user_id,
                                                                         body="x"))
        reply = next(json.loads(encode_v1(o.event)) for o in outs
                     if topic_of(o.to) == f"down/{a.user_id}/{a.device_id}")
        codes.append(reply.get("code", reply["type"]))
    assert codes == ["sent", "sent"] + ["rate_limited"] * 4
    assert dropped == [a.device_id]  # at the fourth refusal, once
    assert sample(metrics, "pigeon_devices_disconnected_total") == 1
    # a device that waits as told is refused now and then, never disconnected
    for _ in range(10):
        world.clock.advance(1.0)
        outs = await router.handle(f"up/{b.user_id}/{b.device_id}", body(type="send", id=f"b{_}", to=a.user_id,
                                                                         body="y"))
        replies = [json.loads(encode_v1(o.event)) for o in outs if topic_of(o.to).endswith(b.device_id)]
        assert [r["type"] for r in replies] == ["sent"]
    assert dropped == [a.device_id]


def test_replies_waiting_to_go_out_count_against_the_bound_too() -> None:
    waiting = [0]
    adm = Admission(limit=10)
    adm.backlog = lambda: waiting[0]
    send = body(type="send", id="m", to="u2", body="x")
    assert adm.admit(TOPIC, send) is None and not adm.shedding
    waiting[0] = 5
    assert adm.shedding and adm.held == 1  # half the bound waiting to go out: shedding
    waiting[0] = 10
    refused = adm.admit(TOPIC, send)
    assert refused is not None and json.loads(encode_v1(refused[0].event))["code"] == "rate_limited"
    assert adm.held == 1



class Clock:
    """Time as the admission control's callers read it (time.monotonic), set by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


SEND = body(type="send", id="m", to="u2", body="x")
ACK = body(type="ack", up_to=3)
OTHER = "up/u9/d9"  # another device


def outgoing(adm: Admission) -> tuple[list[int], list[int]]:
    """The embedded broker's outgoing queue, set by hand: what waits in it, and what it has sent."""
    waiting, sent = [0], [0]
    adm.backlog = lambda: waiting[0]
    adm.sent_out = lambda: sent[0]
    return waiting, sent


def refusal(outs: list[Any] | None) -> dict[str, Any] | None:
    return None if outs is None else dict(json.loads(encode_v1(outs[0].event)))


def test_a_send_that_waited_past_the_bound_is_answered_instead_of_handled() -> None:
    clock = Clock()
    metrics = Metrics()
    adm = Admission(limit=1000, max_delay_ms=300, retry_after_ms=100, clock=clock, metrics=metrics)
    taken = clock()
    for _ in range(3):
        assert adm.admit(TOPIC, SEND) is None
    clock.t += 0.25
    assert adm.start(TOPIC, SEND, taken) is None  # 250 ms: handled
    clock.t += 0.1
    outs = adm.start(TOPIC, SEND, taken)  # 350 ms: answered instead
    reply = refusal(outs)
    assert reply is not None and reply["code"] == "rate_limited" and reply["id"] == "m", reply
    assert "waited 350 ms" in reply["message"] and reply["retry_after_ms"] >= 100
    assert outs is not None and topic_of(outs[0].to) == "down/u1/d1" and outs[0].qos == 0
    assert adm.start(TOPIC, ACK, taken) is None  # an ack is handled however long it waited
    assert adm.start(TOPIC, body(type="typing", chat="c1"), taken) == []  # typing dropped
    assert adm.held == 3  # each is released by the caller, handled or not
    for _ in range(3):
        adm.release()
    assert adm.held == 0
    assert sample(metrics, "pigeon_overload_refused_total", type="send") == 1


def test_while_most_requests_wait_past_the_bound_new_ones_are_refused_far_below_the_count_bound() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=300, clock=clock)
    taken = clock()
    for _ in range(50):
        assert adm.admit(TOPIC, SEND) is None
    clock.t += 0.4
    for k in range(11):  # the first ends the interval; then an interval's worth, every one past the bound
        adm.start(device(k), ACK, taken)
        adm.release()
        clock.t += 0.011
    assert adm.late and adm.held == 39 and adm.held < adm.limit
    reply = refusal(adm.admit(TOPIC, SEND))
    assert reply is not None and reply["code"] == "rate_limited" and "requests wait 4" in reply["message"], reply
    assert adm.held == 39  # not taken in
    with pytest.raises(RateLimited):
        adm.check_http()
    # once most of an interval's requests started within the bound, new ones come in again
    fresh = clock()
    for k in range(12):  # the first ends the interval; of the next interval's 11, 4 past the bound
        adm.start(device(k), ACK, taken if k <= 4 else fresh)
        adm.release()
        clock.t += 0.0099
    assert not adm.late
    assert adm.admit(TOPIC, SEND) is None
    adm.check_http()


def test_a_few_slow_ones_or_a_pause_in_handling_refuse_nobody() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=300, clock=clock)
    for _ in range(3):
        adm.admit(TOPIC, SEND)
    taken = clock()
    clock.t += 0.5
    adm.start(TOPIC, ACK, taken)  # one past the bound
    for _ in range(3):
        adm.start(TOPIC, ACK, clock.t - 0.01)
    clock.t += 0.11
    adm.start(TOPIC, ACK, clock.t - 0.01)  # ends the interval: 1 of 4 past the bound
    assert not adm.late
    clock.t += 5.0  # nothing started while one is held: the verdict stands
    assert adm.admit(TOPIC, SEND) is None


def test_one_device_waiting_behind_its_own_hung_request_refuses_no_one_else() -> None:
    # a media request hangs on the object store until its timeout; the device's next publishes
    # wait behind it (the embedded broker handles a device's requests one at a time)
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    media = body(type="media_url", id="u", key="k", chat="c1")
    assert adm.admit(TOPIC, media) is None
    assert adm.start(TOPIC, media, clock()) is None
    behind = clock()
    assert adm.admit(TOPIC, ACK) is None and adm.admit(TOPIC, SEND) is None
    clock.t += 5.0
    adm.release()  # the media request is answered (unavailable)
    assert adm.start(TOPIC, ACK, behind) is None  # the ack waited 5 s: handled all the same
    reply = refusal(adm.start(TOPIC, SEND, behind))  # the send waited past the bound itself: refused
    assert reply is not None and reply["code"] == "rate_limited" and "waited 5000 ms" in reply["message"], reply
    # the ack is still being handled; that wait was this device's own, not a queue others share
    adm.release()
    assert adm.held == 1 and not adm.late and adm.wait_s == 0.0
    assert adm.admit(OTHER, SEND) is None  # another device's request is taken in
    assert adm.admit(TOPIC, media) is None  # and so is this device's next one
    assert adm.admit(TOPIC, SEND) is None  # its refused send, sent again, too
    # the same waits in two devices' requests are a queue both wait in: new requests are refused
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    behind = clock()
    for topic in (TOPIC, OTHER, TOPIC):
        assert adm.admit(topic, ACK) is None
    clock.t += 5.0
    for topic in (TOPIC, OTHER):  # the first ends the first interval; the second waits in the next
        assert adm.start(topic, ACK, behind) is None
        adm.release()
    clock.t += 0.1
    assert adm.start(TOPIC, ACK, behind) is None  # ends that interval: two devices' past the bound
    assert adm.late
    assert refusal(adm.admit(device(3), SEND)) is not None


def test_devices_taking_turns_past_the_bound_are_a_standing_queue_one_start_per_interval() -> None:
    # a stalled store: each interval ends with the one request that starts in it, each of
    # another device, each past the bound
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    for k in range(100):
        assert adm.admit(device(k % 5), SEND) is None
    taken = clock()
    clock.t += 5.0
    assert adm.start(device(0), ACK, taken) is None  # one device's so far: left out
    adm.release()
    assert not adm.late
    clock.t += 0.11
    assert adm.start(device(1), ACK, taken) is None  # another's within a bound: a queue they share
    adm.release()
    assert adm.late and adm.wait_s > 2.0 and adm.shedding
    assert refusal(adm.admit(device(7), SEND)) is not None


def test_one_device_past_the_bound_now_and_another_long_before_are_not_a_queue() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    for _ in range(3):
        adm.admit(TOPIC, ACK)
    adm.start(OTHER, ACK, clock.t - 3.0)  # one device's, past the bound
    adm.release()
    clock.t += 2.5  # more than a bound later
    adm.start(TOPIC, ACK, clock.t - 3.0)  # another's, ending the interval: not a queue they share
    assert not adm.late and adm.admit(device(3), SEND) is None


def test_one_device_s_requests_past_the_bound_together_are_its_own_queue() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    for _ in range(5):
        adm.admit(TOPIC, ACK)
    taken = clock()
    clock.t += 5.0
    for _ in range(3):  # the first ends the first interval
        adm.start(TOPIC, ACK, taken)
        adm.release()
    clock.t += 0.1
    adm.start(TOPIC, ACK, taken)  # ends the next: three of one device's, all past the bound
    assert not adm.late and adm.wait_s == 0.0 and adm.held == 2


def test_each_interval_judges_afresh_which_devices_waited_past_the_bound() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    for k in range(6):
        adm.admit(device(k), ACK)
    t0 = clock()
    clock.t += 5.0
    adm.start(device(0), ACK, t0)  # ends the first interval, alone
    clock.t += 0.05
    adm.start(device(1), ACK, t0)  # another device's within a bound: a queue both wait in
    clock.t += 0.06
    adm.start(device(2), ACK, clock.t - 0.01)  # ends the interval: 1 of 2 past the bound
    assert not adm.late
    clock.t += 3.0  # longer than the bound
    adm.start(device(5), ACK, clock.t - 0.01)  # ends an interval
    clock.t += 0.01
    adm.start(device(3), ACK, clock.t - 4.0)  # past the bound, no other device's within a bound
    clock.t += 0.1
    adm.start(device(4), ACK, clock.t - 0.01)  # ends the interval: device 3's left out
    assert not adm.late and adm.wait_s == pytest.approx(0.01)


def test_what_waits_to_go_out_counts_when_only_one_device_s_requests_started() -> None:
    clock = Clock()
    adm = Admission(limit=10_000, max_delay_ms=300, clock=clock)
    waiting, sent = outgoing(adm)
    for _ in range(3):
        adm.admit(TOPIC, SEND)
    for _ in range(30):  # 1,000 publications a second go out, requests start at once
        clock.t += 0.1
        sent[0] += 100
        adm.start(OTHER, ACK, clock.t - 0.01)
    assert not adm.late
    waiting[0] = 5000  # five seconds' worth waits to go out
    clock.t += 0.1
    sent[0] += 100
    adm.start(TOPIC, ACK, clock.t - 1.0)  # the interval's only start: one device's, past the bound
    assert adm.late and refusal(adm.admit(device(3), SEND)) is not None


def test_nothing_held_ends_a_refusal_even_without_a_new_interval() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=100, clock=clock)
    for _ in range(4):
        adm.admit(TOPIC, SEND)
    taken = clock()
    clock.t += 0.5
    for k in range(3):  # the first ends the first interval, the third the next: two devices' past the bound
        adm.start(device(k), ACK, taken)
        adm.release()
        clock.t += 0.06
    assert adm.late and refusal(adm.admit(TOPIC, SEND)) is not None
    adm.start(device(3), ACK, taken)
    adm.release()  # the last one, in the same interval
    assert adm.held == 0
    assert adm.admit(TOPIC, SEND) is None  # nothing waits: taken in
    assert adm.admit(TOPIC, SEND) is None  # and so is the next: the old verdict went with the queue


def test_a_publish_that_waited_past_the_bound_before_it_was_read_is_refused_as_it_is_read() -> None:
    adm = Admission(limit=1000, max_delay_ms=300, clock=Clock())
    assert adm.admit(TOPIC, SEND, waited=0.2) is None
    reply = refusal(adm.admit(TOPIC, SEND, waited=0.9))
    assert reply is not None and reply["code"] == "rate_limited" and "waited 900 ms to be read" in reply["message"]
    assert adm.admit(TOPIC, ACK, waited=0.9) is None  # acks still taken in, up to the ceiling
    assert adm.held == 2


def test_no_bound_by_delay_when_it_is_0() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=0, clock=clock)
    taken = clock()
    for _ in range(20):
        adm.admit(TOPIC, SEND)
    clock.t += 30
    for _ in range(10):
        assert adm.start(TOPIC, SEND, taken) is None
        clock.t += 0.05
    assert not adm.late
    assert adm.admit(TOPIC, SEND, waited=30) is None


def test_a_refusal_asks_to_retry_after_about_the_backlog_s_drain_time() -> None:
    clock = Clock()
    adm = Admission(limit=10_000, max_delay_ms=200, retry_after_ms=250, clock=clock)
    assert adm.retry_after() == 250  # nothing held: the least given
    taken = clock()
    for _ in range(1000):
        adm.admit(TOPIC, SEND)
    clock.t += 0.5
    adm.start(device(1), ACK, taken)  # ends the first interval
    adm.release()
    for k in range(100):  # 100 started in the next 0.1 s: 1,000/s
        clock.t += 0.001
        adm.start(device(k), ACK, taken)
        adm.release()
    clock.t += 0.0015
    adm.start(device(3), ACK, taken)  # ends that interval
    adm.release()
    assert adm.drain_per_s == pytest.approx(1000, rel=0.05)
    reply = refusal(adm.admit(TOPIC, SEND))
    assert reply is not None and 850 <= reply["retry_after_ms"] <= 950, reply  # 898 held at ~1,000/s


def test_a_stretch_in_which_nothing_started_is_not_taken_for_the_drain_rate() -> None:
    # a takeover, or a stalled store: requests held, none started for 5 s, then they flow again
    clock = Clock()
    adm = Admission(limit=10_000, max_delay_ms=2000, retry_after_ms=250, clock=clock)
    taken = clock()
    for _ in range(12):
        adm.admit(TOPIC, SEND)
    clock.t += 5.0
    adm.start(TOPIC, ACK, clock.t)  # ends an interval of 5 s with 1 started: 0.2/s would ask for 55 s
    adm.release()
    assert adm.drain_per_s == 0.0
    reply = refusal(adm.admit(TOPIC, SEND, waited=5.0))
    assert reply is not None and reply["retry_after_ms"] == 250, reply  # not known: the least
    for _ in range(50):  # then 50 in 0.1 s: the rate is measured again
        clock.t += 0.002
        adm.start(TOPIC, ACK, taken)
        adm.release()
    clock.t += 0.001
    adm.start(TOPIC, ACK, taken)
    assert adm.drain_per_s == pytest.approx(500, rel=0.05)


def test_a_refusal_never_asks_for_more_than_the_longest_wait() -> None:
    clock = Clock()
    adm = Admission(limit=100_000, max_delay_ms=200, clock=clock)
    taken = clock()
    for _ in range(50_000):
        adm.admit(TOPIC, SEND)
    clock.t += 0.5
    adm.start(device(1), ACK, taken)
    for k in range(2, 6, 2):  # 2 started every 0.1 s: 50,000 held would take 2,500 s
        clock.t += 0.1
        adm.start(device(k), ACK, taken)
        adm.start(device(k + 1), ACK, taken)
    assert adm.drain_per_s == pytest.approx(20, rel=0.05)
    reply = refusal(adm.admit(TOPIC, SEND))
    assert reply is not None and reply["retry_after_ms"] == MAX_RETRY_AFTER_MS == 10_000, reply


def test_shedding_starts_at_half_the_delay_bound() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=400, clock=clock)
    for _ in range(5):
        adm.admit(TOPIC, SEND)
    adm.start(TOPIC, ACK, clock.t - 0.1)
    clock.t += 0.11
    adm.start(TOPIC, ACK, clock.t - 0.1)  # mean wait 0.1 s: under half the bound
    assert not adm.shedding
    adm.start(TOPIC, ACK, clock.t - 0.25)
    clock.t += 0.11
    adm.start(TOPIC, ACK, clock.t - 0.25)  # mean 0.25 s: past half the bound, not past the bound
    assert adm.shedding and not adm.late  # typing and presence fan-out dropped (see the router tests)
    assert adm.admit(TOPIC, SEND) is None


def test_a_negative_delay_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        Admission(max_delay_ms=-1)
    with pytest.raises(ConfigError) as got:
        Settings(secret=b"s" * 32, max_queue_delay_ms=-1).validated()
    assert "max_queue_delay_ms" in str(got.value)


def test_replies_that_would_wait_past_the_bound_to_go_out_refuse_new_requests() -> None:
    clock = Clock()
    adm = Admission(limit=10_000, max_delay_ms=300, clock=clock)
    waiting, sent = outgoing(adm)
    for _ in range(5):
        adm.admit(TOPIC, SEND)

    def interval(out: int) -> None:  # 0.1 s in which ``out`` publications went out
        clock.t += 0.1
        sent[0] += out
        adm.start(TOPIC, ACK, clock.t - 0.01)  # every request started at once

    for _ in range(30):  # 1,000 a second for 3 s: the smoothed rate settles there
        interval(100)
    waiting[0] = 500  # half a second's worth waits to go out
    interval(100)
    assert adm.late and adm.out_wait_s == pytest.approx(0.5, rel=0.02)
    assert refusal(adm.admit(TOPIC, SEND)) is not None
    waiting[0] = 100
    interval(100)
    assert not adm.late and adm.admit(TOPIC, SEND) is None
    # one interval in which little went out does not refuse anyone by itself
    interval(10)
    assert not adm.late


def test_a_refused_send_takes_along_the_device_s_sends_that_left_after_it() -> None:
    """So that the device's order survives the refusal: its sends that left after the refused
    one and before it can have heard of the refusal, queued behind it or still on their way,
    are refused with it; its sends ahead of the refused one, its other requests and other
    devices go on as usual; the window closes when the refused send comes back, or after the
    refusal's retry time (at most the delay bound)."""
    clock = Clock()
    metrics = Metrics()
    adm = Admission(limit=1000, max_delay_ms=300, clock=clock, metrics=metrics)
    taken = clock()
    assert adm.admit(TOPIC, SEND) is None and adm.admit(TOPIC, SEND) is None  # both queued
    clock.t += 0.01
    first = refusal(adm.admit(TOPIC, body(type="send", id="old", to="u2", body="x"), waited=0.9))
    assert first is not None and "waited 900 ms to be read" in first["message"]  # left 0.9 s ago
    clock.t += 0.01
    for outs in (adm.start(TOPIC, SEND, taken),  # left after it, queued: refused as it starts
                 adm.admit(TOPIC, SEND, waited=0.05),  # left after it, read only now
                 adm.admit(TOPIC, SEND)):  # sent before the device can have heard
        reply = refusal(outs)
        assert reply is not None and reply["code"] == "rate_limited", reply
        assert "an earlier send of this device was refused" in reply["message"]
    assert adm.held == 2  # the queued one is released by its caller; the others were never held
    assert adm.start(TOPIC, ACK, taken) is None  # an ack is handled
    assert adm.admit(TOPIC, body(type="sync", id="s", after=0)) is None  # no order to keep
    assert adm.admit(OTHER, SEND) is None and adm.start(OTHER, SEND, taken) is None
    assert sample(metrics, "pigeon_overload_refused_total", type="send") == 4
    clock.t += 0.3  # past the window (the delay bound, shorter than the retry time): taken again
    assert adm.admit(TOPIC, SEND) is None and adm.start(TOPIC, SEND, clock.t) is None
    clock.t += 0.4  # and a new interval forgets it
    adm.start(OTHER, ACK, clock.t)
    assert adm._held_back == {}  # noqa: SLF001


def test_the_refused_send_coming_back_closes_the_window_and_is_taken() -> None:
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, clock=clock)
    old = body(type="send", id="old", to="u2", body="x")
    assert refusal(adm.admit(TOPIC, old, waited=2.5)) is not None
    assert refusal(adm.admit(TOPIC, body(type="send", id="next", to="u2", body="y"))) is not None
    clock.t += 0.2  # the device sends the refused ones again, in its order, within the window
    assert adm.admit(TOPIC, old) is None
    assert adm.admit(TOPIC, body(type="send", id="next", to="u2", body="y")) is None


def test_a_window_is_told_for_the_partitions_next_holder_which_keeps_it() -> None:
    """Each window, as it opens, grows and closes, is told (for the next holder of the
    device's partition); the next holder adopts it: the device's sends are refused there until
    the refused one comes back, or the window's end. An ended one is not adopted, and one the
    new holder has of its own is kept."""
    clock = Clock()
    told: list[tuple[str, float, str]] = []
    old = Admission(limit=1000, max_delay_ms=2000, retry_after_ms=500, clock=clock)
    old.on_hold = lambda topic, until, first: told.append((topic, until, first))
    first, second = body(type="send", id="m1", to="u2", body="x"), body(type="send", id="m2", to="u2", body="y")
    assert refusal(old.admit(TOPIC, first, waited=2.5)) is not None
    assert refusal(old.admit(TOPIC, second)) is not None  # (in the window: refused, the window as it was)
    [(topic, until, refused)] = told
    assert (topic, refused) == (TOPIC, "m1") and 0.4 < until - time.time() <= 0.5

    other_clock = Clock()
    other_clock.t += 5.0  # the new holder's own clock: another origin, the same wall clock
    new = Admission(limit=1000, max_delay_ms=2000, clock=other_clock)
    new.adopt(topic, until, refused)
    new.adopt(OTHER, time.time() - 1, "o1")  # ended
    assert refusal(new.admit(OTHER, body(type="send", id="o2", to="u2", body="z"))) is None
    reply = refusal(new.admit(TOPIC, second))
    assert reply is not None and "an earlier send of this device" in reply["message"]
    assert new.admit(TOPIC, first) is None and new.admit(TOPIC, second) is None  # the device's order

    old.admit(TOPIC, first)  # it came back to the old holder: closed, and told so
    assert len(told) == 2 and told[-1][1] <= time.time()
    new.adopt(TOPIC, time.time() + 5, "m9")  # its own window closed (m1 came back): this one is adopted
    assert new._held_back[TOPIC].first == "m9"  # noqa: SLF001
    new.adopt(TOPIC, time.time() + 5, "m10")  # one of its own still open stands
    assert new._held_back[TOPIC].first == "m9"  # noqa: SLF001


async def test_windows_recorded_by_one_bridge_are_adopted_by_the_partitions_next_holder() -> None:
    """Through the shared state: the first bridge's windows are written as they open (by
    partition), and the bridge connecting that partition's session next adopts them."""
    from types import SimpleNamespace

    from bridge.admission import HeldBackHandover
    from storage.state import MemoryState

    state = MemoryState()
    partitions = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 7 if user == "u1" else 8)
    first_bridge, next_bridge = Admission(limit=1000, max_delay_ms=2000), Admission(limit=1000, max_delay_ms=2000)
    mine = HeldBackHandover(state, partitions, first_bridge)  # type: ignore[arg-type]
    first_bridge.on_hold = mine.note
    assert refusal(first_bridge.admit(TOPIC, body(type="send", id="m1", to="u2", body="x"), waited=2.5)) is not None
    await until(lambda: bool(state._held_back.get(("ks", 7))))  # noqa: SLF001
    theirs = HeldBackHandover(state, partitions, next_bridge)  # type: ignore[arg-type]
    await theirs.adopt(8)  # another partition's: nothing
    assert next_bridge.admit(TOPIC, body(type="send", id="m2", to="u2", body="y")) is None
    next_bridge.release()
    await theirs.adopt(7)
    assert refusal(next_bridge.admit(TOPIC, body(type="send", id="m2", to="u2", body="y"))) is not None
    assert next_bridge.admit(TOPIC, body(type="send", id="m1", to="u2", body="x")) is None


async def test_a_device_s_window_is_recorded_before_what_moved_it_may_be_acknowledged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``recorded``: nothing to wait for while none of the device's windows waits to be written;
    after a refusal opened one, something that settles once the write is through, once it
    failed, or past HANDOVER_WAIT_S while it hangs (the window holds in this bridge all the same,
    and the broker's window of unacknowledged publishes must not fill)."""
    import asyncio
    from types import SimpleNamespace

    import bridge.admission
    from bridge.admission import HeldBackHandover
    from storage.base import StorageUnavailable
    from storage.state import MemoryState

    state, go_on, failing = MemoryState(), asyncio.Event(), [False]
    put = state.put_held_back

    async def slow_put(scope: str, part: int, windows: dict[str, tuple[int, str]]) -> None:
        while not go_on.is_set():
            try:
                await go_on.wait()
            except asyncio.CancelledError:  # (its timeout lost, as redis-py can lose a cancellation)
                continue
        if failing[0]:
            raise StorageUnavailable("redis: gone")
        await put(scope, part, windows)

    state.put_held_back = slow_put  # type: ignore[method-assign]
    partitions = SimpleNamespace(partition_scope="ks", partition_of_user=lambda user: 7)
    adm = Admission(limit=1000, max_delay_ms=2000)
    windows = HeldBackHandover(state, partitions, adm)  # type: ignore[arg-type]
    adm.on_hold = windows.note
    assert windows.recorded(TOPIC) is None
    assert refusal(adm.admit(TOPIC, body(type="send", id="m1", to="u2", body="x"), waited=2.5)) is not None
    waiting, other = windows.recorded(TOPIC), windows.recorded(OTHER)
    assert waiting is not None and other is None
    await asyncio.sleep(0.05)
    assert not waiting.done()
    go_on.set()
    await asyncio.wait_for(waiting, 5)
    assert ("ks", 7) in state._held_back and windows.recorded(TOPIC) is None  # noqa: SLF001
    failing[0] = True
    assert refusal(adm.admit(TOPIC, body(type="send", id="m2", to="u2", body="y"), waited=2.5)) is not None
    again = windows.recorded(TOPIC)
    assert again is not None
    await asyncio.wait_for(again, 5)  # (given up: logged, and acknowledged all the same)
    go_on.clear()  # a write that hangs past its own timeout
    monkeypatch.setattr(bridge.admission, "HANDOVER_WAIT_S", 0.3)
    assert refusal(adm.admit(OTHER, body(type="send", id="o1", to="u2", body="z"), waited=2.5)) is not None
    hanging = windows.recorded(OTHER)
    try:
        assert hanging is not None
        await asyncio.wait_for(hanging, 5)
        assert windows._writing is not None and not windows._writing.done()  # noqa: SLF001 - still writing
    finally:
        go_on.set()
    await asyncio.wait_for(windows._writing, 5)  # noqa: SLF001


def test_a_refusal_at_the_device_s_own_bound_leaves_its_earlier_sends_alone() -> None:
    clock = Clock()
    adm = Admission(limit=1000, per_device=2, max_delay_ms=2000, clock=clock)
    taken = clock()
    assert adm.admit(TOPIC, SEND, queued=0) is None and adm.admit(TOPIC, SEND, queued=1) is None
    clock.t += 0.01
    assert refusal(adm.admit(TOPIC, SEND, queued=2)) is not None  # the newest: refused
    clock.t += 0.01
    assert adm.start(TOPIC, SEND, taken) is None and adm.start(TOPIC, SEND, taken) is None  # ahead of it


def test_a_send_the_store_failed_holds_the_devices_later_sends_until_it_comes_back() -> None:
    """A device with two sends on their way: the first is answered unavailable (the store failed),
    the second waits behind it. It is refused, not stored ahead of the first: the device sends the
    first again, then the second, and their order holds. Another device is not held; a request
    other than a send that failed holds nothing."""
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, retry_after_ms=1000, clock=clock)
    first, second = body(type="send", id="m1", to="u2", body="x"), body(type="send", id="m2", to="u2", body="y")
    taken = clock()
    assert adm.admit(TOPIC, first) is None and adm.admit(TOPIC, second) is None
    assert adm.start(TOPIC, first, taken) is None
    adm.failed(TOPIC, first, "m1")
    adm.release()
    clock.t += 0.05
    reply = refusal(adm.start(TOPIC, second, taken))
    assert reply is not None and reply["code"] == "rate_limited" and reply["id"] == "m2", reply
    assert "an earlier send of this device" in reply["message"]
    adm.release()
    assert refusal(adm.admit(OTHER, body(type="send", id="o1", to="u2", body="z"))) is None
    assert refusal(adm.admit(TOPIC, second)) is not None  # sent again before the first: refused again
    clock.t += 0.5
    assert adm.admit(TOPIC, first) is None  # the first again: taken, and the device's window closed
    assert adm.admit(TOPIC, second) is None

    sync = body(type="sync", id="s1", after=0)
    adm.failed(OTHER, sync, "s1")
    assert adm.admit(OTHER, body(type="send", id="o2", to="u2", body="z")) is None


async def test_the_bridge_holds_a_devices_later_sends_when_the_store_fails_one() -> None:
    """What each publish handled on either intake goes through (``PigeonServer._ingest``): a send
    answered unavailable opens the device's window; one answered otherwise, or a failed request
    that is not a send, does not."""
    from types import SimpleNamespace

    from bridge.app import PigeonServer
    from bridge.outbox import Out, ToDevice
    from bridge.protocol import ErrorReply

    answers: dict[bytes, list[Out]] = {}
    published: list[list[Out]] = []

    async def handle(topic: str, payload: bytes) -> list[Out]:
        return answers[payload]

    async def publish(outs: list[Out]) -> None:
        published.append(outs)

    server = SimpleNamespace(router=SimpleNamespace(handle=handle), admission=Admission(limit=1000), publish=publish)
    first, second = body(type="send", id="m1", to="u2", body="x"), body(type="send", id="m2", to="u2", body="y")
    sync = body(type="sync", id="s1", after=0)
    failed = [Out(ToDevice("u1", "d1"), ErrorReply(id="m1", code="unavailable", message="the store failed"))]
    answers.update({first: failed, sync: [Out(ToDevice("u1", "d1"), ErrorReply(id="s1", code="unavailable",
                                                                                message="the store failed"))]})
    await PigeonServer._ingest(server, TOPIC, sync)  # type: ignore[arg-type]
    assert server.admission.admit(TOPIC, second) is None
    await PigeonServer._ingest(server, TOPIC, first)  # type: ignore[arg-type]
    assert published[-1] == failed
    assert refusal(server.admission.admit(TOPIC, second)) is not None


def test_the_refused_send_coming_back_early_still_refuses_a_later_one_that_waited_behind_a_slow_request() -> None:
    """A is refused after waiting past the bound; B, sent 1.5 s after A, waits behind a slow
    request of the same device. A comes back before B's turn: A is taken, and B is refused when
    its turn comes (it left before A came back), so it cannot be numbered ahead of A."""
    clock = Clock()
    adm = Admission(limit=1000, max_delay_ms=2000, retry_after_ms=1000, clock=clock)
    a, b = body(type="send", id="A", to="u2", body="x"), body(type="send", id="B", to="u2", body="y")
    slow = body(type="sync", id="s", after=0)
    ta = clock()
    assert adm.admit(TOPIC, a) is None and adm.admit(TOPIC, slow) is None
    clock.t = ta + 1.5
    tb = clock()
    assert adm.admit(TOPIC, b) is None
    clock.t = ta + 2.1
    assert refusal(adm.start(TOPIC, a, ta)) is not None  # waited past the bound
    adm.release()
    clock.t = ta + 2.3
    assert adm.admit(TOPIC, a) is None  # A again, early: taken
    clock.t = ta + 3.0
    assert refusal(adm.start(TOPIC, slow, ta)) is not None  # the slow one's turn: past the bound too
    adm.release()
    reply = refusal(adm.start(TOPIC, b, tb))
    assert reply is not None and reply["id"] == "B" and "an earlier send" in reply["message"], reply
    clock.t = ta + 3.2
    assert adm.admit(TOPIC, b) is None  # B again, after A: taken
