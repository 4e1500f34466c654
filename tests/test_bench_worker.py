"""The bench's simulated devices sending refused sends again (the failover scenario), as the SDK
does: in the order they were made, new sends held while an earlier one goes again."""

from __future__ import annotations

import asyncio

import pytest

from clients.bench import worker as bench_worker
from clients.bench.worker import RESEND_ATTEMPTS, Dev, Track, Worker, now_ns


@pytest.fixture(autouse=True)
def quick_resends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_worker, "RESEND_AFTER_S", 0.01)


def device(resend: bool = True) -> tuple[Worker, Dev, list[str], object]:
    """A worker in a resending phase and one of its devices, whose publishes are recorded."""
    w = Worker(0, [0])
    w.resend = resend
    dev = Dev(w, "u1", "d1", "token")
    w.active = [dev]
    published: list[str] = []

    def send(msg_id: str) -> None:
        published.append(msg_id)

    go = w._resending(dev, send) if resend else send

    def make(msg_id: str) -> None:
        w.tracks[msg_id] = Track(1, now_ns(), True, None)
        go(msg_id)
    return w, dev, published, make


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def test_a_refused_send_goes_again_first_and_the_later_ones_keep_their_order() -> None:
    w, dev, published, make = device()
    make("a")
    make("b")
    assert published == ["a", "b"]
    w.failed("a", "rate_limited", dev, 20)
    make("c")  # made while a goes again: held
    w.failed("b", "rate_limited", dev, 1)  # refused with a (the server's window): waits for a
    assert published == ["a", "b"]
    await settle()
    assert published == ["a", "b", "a"]  # b's wait is over too, but a is not through
    w.confirmed("a")
    assert published == ["a", "b", "a", "b"]
    w.confirmed("b")
    assert published == ["a", "b", "a", "b", "c"]
    w.confirmed("c")
    assert w.tally.resent == {"rate_limited": 2} and not w.tally.errors
    assert not dev.again and not dev.held and not w._again_of


async def test_a_resend_waits_for_the_retry_after_the_server_asked_for() -> None:
    w, dev, published, make = device()
    make("a")
    w.failed("a", "unavailable", dev, 200)
    await settle(0.1)
    assert published == ["a"]
    await settle(0.25)
    assert published == ["a", "a"]


async def test_a_send_refused_every_time_is_given_up_and_the_later_ones_go() -> None:
    w, dev, published, make = device()
    make("a")
    make("b")
    w.confirmed("b")
    make("c")
    for _ in range(RESEND_ATTEMPTS - 1):
        w.failed("a", "rate_limited", dev, 1)
        await settle(0.2)
    assert published == ["a", "b", "c", *["a"] * (RESEND_ATTEMPTS - 1)]
    make("d")
    assert published[-1] == "a"  # held behind a
    w.failed("a", "rate_limited", dev, 1)  # the last attempt: given up
    assert w.tally.errors == {"rate_limited": 1} and "a" not in w.tracks
    assert published[-1] == "d"


async def test_other_errors_and_phases_without_resending_count_the_send_as_failed() -> None:
    w, dev, published, make = device()
    make("a")
    w.failed("a", "forbidden", dev, None)
    make("b")
    assert published == ["a", "b"] and w.tally.errors == {"forbidden": 1}

    w, dev, published, make = device(resend=False)
    make("a")
    w.failed("a", "rate_limited", dev, 1)
    await settle()
    assert published == ["a"] and w.tally.errors == {"rate_limited": 1} and not w.tally.resent
