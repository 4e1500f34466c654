"""The push worker on its own: a real SQLite store behind a wrapper that fails on demand, the
in-process presence state, the SQLite push queue, and the loopback webhook receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.clock import SystemClock
from bridge.metrics import Metrics
from bridge.push import Pusher
from bridge.push_providers import Webhook
from storage.base import Device
from storage.push_queue import SqlitePushQueue
from storage.sqlite import SqliteStore
from storage.state import MemoryState
from tests.fakes import FlakyStore, until
from tests.push_services import Drip, PushServices

SEND_TIMEOUT_S = 1.5  # the worker's bound on one send, short here


@dataclass
class Rig:
    store: SqliteStore
    flaky: FlakyStore
    state: MemoryState
    pusher: Pusher
    services: PushServices
    device: Device
    queue: SqlitePushQueue
    metrics: Metrics

    async def another(self, phone: str) -> Device:
        """One more user with one device woken by the webhook receiver."""
        user = await self.store.create_user(phone, 0)
        device = await self.store.add_device(user.user_id, "phone", "android", 0)
        await self.store.set_push_target(device.device_id, "webhook", self.services.webhook.url(device.device_id))
        return device

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """The worker; ``indirect`` parameters are more arguments of its ``Pusher``."""
    services = PushServices()
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    queue = SqlitePushQueue(tmp_path / "push.db")
    await queue.open()
    client = httpx.AsyncClient()
    flaky = FlakyStore(store)
    state = MemoryState()
    metrics = Metrics()
    pusher = Pusher(flaky, state, queue, {"webhook": Webhook(client, dev=True)}, SystemClock(), metrics,  # type: ignore[arg-type]
                    window_s=1.0, max_age_s=60, send_timeout_s=SEND_TIMEOUT_S, **getattr(request, "param", {}))
    user = await store.create_user("+15550009999", 0)
    device = await store.add_device(user.user_id, "phone", "android", 0)
    await store.set_push_target(device.device_id, "webhook", services.webhook.url(device.device_id))
    stopping = asyncio.Event()
    task = asyncio.create_task(pusher.run(stopping))
    try:
        yield Rig(store, flaky, state, pusher, services, device, queue, metrics)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 20)
        await client.aclose()
        await queue.close()
        await store.close()
        services.close()


async def test_a_store_outage_postpones_a_wake_and_loses_none(rig: Rig) -> None:
    rig.flaky.failing.add("user_devices")
    rig.pusher.note([rig.device.user_id], SystemClock().now_ms(), message=True)
    await until(lambda: rig.flaky.calls["user_devices"] >= 2)  # tried, and tried again
    assert rig.services.webhook.recorder.pushed(rig.device.device_id) == []
    rig.flaky.failing.clear()
    [pushed] = await rig.services.webhook.recorder.wait(rig.device.device_id, 1)
    assert pushed.body == {"type": "wake", "events": 1}


async def test_a_user_who_came_back_before_the_wake_was_due_is_not_pushed(rig: Rig) -> None:
    user, device = rig.device.user_id, rig.device.device_id
    rig.pusher.note([user], SystemClock().now_ms(), message=True)
    await rig.services.webhook.recorder.wait(device, 1)
    rig.pusher.note([user], SystemClock().now_ms(), message=True)  # within the window: due when it ends
    await rig.state.device_online(user, device)  # back before then
    await until(lambda: rig.pusher.depth(), want=0)  # the wake is taken when due, and not sent
    assert len(rig.services.webhook.recorder.pushed(device)) == 1


@pytest.mark.parametrize("body", [Drip(b".", 0.2), Drip(b"x" * 65536, 0.005)], ids=["drip", "flood"])
async def test_an_endless_answer_ends_the_send_in_time_and_other_devices_are_woken(rig: Rig, body: Drip) -> None:
    slow, hooks = rig.device, rig.services.webhook.recorder
    other = await rig.another("+15550009998")
    status = 503 if body.every_s > 0.1 else 200  # a slow drip of an error; a flood after an acceptance
    hooks.script(slow.device_id, (status, {}, body))
    now = SystemClock().now_ms()
    rig.pusher.note([slow.user_id], now, message=True)
    [first] = await hooks.wait(slow.device_id, 1)
    rig.pusher.note([other.user_id], now, message=True)
    [woken] = await hooks.wait(other.device_id, 1)  # not held up by the endless answer
    assert woken.at - first.at < SEND_TIMEOUT_S
    if status == 200:  # the status was read; what followed it was not waited for
        await until(lambda: rig.sample("pigeon_push_sent_total", provider="webhook"), want=2.0)
        await until(lambda: rig.pusher.depth(), want=0)
        assert len(hooks.pushed(slow.device_id)) == 1
        return
    # the drip was cut at the send timeout, counted as a failure and retried after a backoff
    _, again = await hooks.wait(slow.device_id, 2, timeout=SEND_TIMEOUT_S + 5)
    assert SEND_TIMEOUT_S <= again.at - first.at <= SEND_TIMEOUT_S + 2.0
    assert again.status == 200 and again.body == {"type": "wake", "events": 1}
    assert rig.sample("pigeon_push_failed_total", provider="webhook", reason="network") == 1.0


async def test_an_unexpected_failure_drops_the_wake_instead_of_leasing_it_forever(rig: Rig) -> None:
    user, device, hooks = rig.device.user_id, rig.device.device_id, rig.services.webhook.recorder
    # a target an older server accepted, on which the HTTP client raises (the port is out of range)
    await rig.store.set_push_target(device, "webhook", "http://127.0.0.1:99999/hook")
    rig.pusher.note([user], SystemClock().now_ms(), message=True)
    await until(lambda: rig.sample("pigeon_push_dropped_total", provider="webhook", reason="rejected"), want=1.0)
    assert rig.sample("pigeon_push_failed_total", provider="webhook", reason="error") == 1.0
    await until(lambda: rig.pusher.depth(), want=0)
    # nothing is left holding the device's next wake back
    await rig.store.set_push_target(device, "webhook", rig.services.webhook.url(device))
    rig.pusher.forget_targets(user)
    rig.pusher.note([user], SystemClock().now_ms(), message=True)
    [pushed] = await hooks.wait(device, 1)
    assert pushed.body == {"type": "wake", "events": 1}


async def test_a_wake_claimed_past_its_max_age_is_dropped_unsent(rig: Rig) -> None:
    user, device = rig.device.user_id, rig.device.device_id
    now = SystemClock().now_ms()
    await rig.queue.schedule(user, [device], event_ms=now - 120_000, events=1, messages=1, now_ms=now, window_ms=1000,
                             give_up_ms=now - 60_000)
    await until(lambda: rig.sample("pigeon_push_dropped_total", provider="webhook", reason="expired"), want=1.0)
    assert await rig.pusher.depth() == 0
    rig.pusher.note([user], SystemClock().now_ms(), message=True)  # a marker: the next wake is the first push
    [pushed] = await rig.services.webhook.recorder.wait(device, 1)
    assert pushed.body == {"type": "wake", "events": 1}


@pytest.mark.parametrize("rig", [{"parallel_sends": 1}], indirect=True)
async def test_a_wake_is_not_claimed_to_wait_for_a_send_slot(rig: Rig) -> None:
    """A wake claimed only to wait behind slow sends would run down its lease meanwhile (and be
    claimed again by another bridge, and pushed twice): while every slot is taken, due wakes
    stay in the queue for whoever has a free one."""
    slow, hooks = rig.device, rig.services.webhook.recorder
    other = await rig.another("+15550009997")
    hooks.script(slow.device_id, (503, {}, Drip(b".", 0.2)))  # holds the only slot until the send timeout
    rig.pusher.note([slow.user_id], SystemClock().now_ms(), message=True)
    await hooks.wait(slow.device_id, 1)
    rig.pusher.note([other.user_id], SystemClock().now_ms(), message=True)
    await until(lambda: rig.pusher.depth(), want=2)
    now = SystemClock().now_ms()
    [free] = await rig.queue.claim(now, 60_000, 10)  # another bridge's claim finds it unclaimed
    assert free.device_id == other.device_id
    await rig.queue.done(free, pushed=False, now_ms=now, window_ms=1000, give_up_ms=now + 60_000)
    await hooks.wait(slow.device_id, 2, timeout=SEND_TIMEOUT_S + 5)  # the slow one, retried in time
    assert hooks.pushed(other.device_id) == []


async def test_notes_of_many_turns_are_decided_together(rig: Rig) -> None:
    # each decision reads presence (Redis in production): not once per turn that carried a message
    steps: list[int] = []
    own = rig.pusher._decide

    async def counted(notes: Any, gone: set[str]) -> Any:
        steps.append(len(notes))
        return await own(notes, gone)

    rig.pusher._decide = counted  # type: ignore[method-assign]
    others = [await rig.another(f"+1555000{i:04d}") for i in range(10)]
    for d in others:
        rig.pusher.note([d.user_id], SystemClock().now_ms(), message=True)
        await asyncio.sleep(0.002)  # as messages come, 2 ms apart
    for d in others:
        await rig.services.webhook.recorder.wait(d.device_id, 1)
    assert sum(steps) == 10
    assert len(steps) <= 3, steps  # at most one decision per 20 ms (DECIDE_EVERY_S)


def test_the_pause_between_decisions_grows_with_the_users_read() -> None:
    """A decision over a few users is followed soon by the next (a user whose last device leaves
    in the pause is pushed for what it had already received); one over two busy groups waits
    longer, so their members' presence is not read fifty times a second."""
    from bridge.push import DECIDE_EVERY_S, DECIDE_MAX_S, decide_pause_s

    assert decide_pause_s(1) < 0.021
    assert DECIDE_EVERY_S < decide_pause_s(10) < decide_pause_s(100) < DECIDE_MAX_S
    assert decide_pause_s(200) == decide_pause_s(5_000) == DECIDE_MAX_S == 0.1
