"""The SDK keeps the order of a device's sends through refusals (docs/protocol.md section 4).

A fake server on the real embedded broker numbers sends as they arrive and, like the bridge's
admission control, refuses with a refused send every send of the device that arrives after it
until the refused one comes back. The device makes several sends at once; each may be refused
and sent again after its own randomised wait, and the numbers must still follow the order the
application made them in.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from broker.embedded import PigeonBroker
from clients import sdk
from clients.sdk import Device, PigeonClientError
from tests.test_sdk_request import DEVICE, USER, device_on, on_broker, request_object, synced


@dataclass
class RefusingServer:
    """Numbers sends in arrival order. The sends it sees for the first time are counted 1, 2, ...;
    those whose count is in ``refuse`` are refused, and with each of them every later arrival of
    another send, until the refused one comes back (the bridge's window, bridge/admission.py)."""

    broker: PigeonBroker
    port: int
    refuse: set[int] = field(default_factory=set)
    firsts: list[str] = field(default_factory=list)  # send ids in the order first seen
    numbered: dict[str, int] = field(default_factory=dict)  # send id -> its seq
    window: str | None = None  # the refused send whose return ends the window
    windowed: bool = True  # False: refuse only the sends counted in ``refuse``, no window
    arrivals: list[str] = field(default_factory=list)

    async def ingest(self, topic: str, payload: bytes) -> None:
        msg = request_object(payload)
        if await synced(self.broker, msg) or msg.get("type") != "send":
            return  # presence, acks: nothing to answer
        rid = str(msg["id"])
        self.arrivals.append(rid)
        if rid not in self.firsts:
            self.firsts.append(rid)
            if self.window is None and len(self.firsts) in self.refuse:
                self.window = rid if self.windowed else None
                await self.answer(rid, None)
                return
        if rid not in self.numbered:
            if self.window is not None and rid != self.window:
                await self.answer(rid, None)
                return
            if rid == self.window:
                self.window = None
            self.numbered[rid] = len(self.numbered) + 1
        await self.answer(rid, self.numbered[rid])

    async def answer(self, rid: str, seq: int | None) -> None:
        reply = ({"type": "sent", "chat": "c1", "seq": seq, "ts": 1} if seq is not None else
                 {"type": "error", "code": "rate_limited", "message": "refused", "retry_after_ms": 50})
        await self.broker.publish(f"down/{USER}/{DEVICE}", json.dumps({**reply, "id": rid}).encode(), 1)

    def device(self) -> Device:
        return device_on(self.port, 5.0)


@pytest.fixture
async def server() -> AsyncIterator[RefusingServer]:
    async with on_broker(lambda broker, port: RefusingServer(broker=broker, port=port)) as fake:
        yield fake


@pytest.fixture
def later_ones_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random part of each retry's wait made shorter the later the send was made (its body
    ``m{k}``): without the SDK's order, the sends made later would always go again first."""

    def draw() -> float:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        payload = caller.f_locals.get("payload", {}) if caller is not None else {}
        body = str(payload.get("body", "m0"))
        return max(0.0, 1.0 - int(body[1:] or 0) / 5) if body[:1] == "m" and body[1:].isdigit() else 0.5

    monkeypatch.setattr(sdk.random, "random", draw)


@pytest.mark.usefixtures("later_ones_first")
@pytest.mark.parametrize("refuse", [{1}, {2}, {1, 4}], ids=["the first", "the second", "two of them"])
async def test_sends_made_at_once_are_numbered_in_their_order_through_refusals(server: RefusingServer,
                                                                               refuse: set[int]) -> None:
    server.refuse = refuse
    async with server.device() as dev:
        replies = await asyncio.wait_for(asyncio.gather(*(dev.send(f"m{k}", chat="c1") for k in range(6))), 20)
    assert [r["seq"] for r in replies] == [1, 2, 3, 4, 5, 6]
    assert len(server.arrivals) > 6  # some were refused and went again


@pytest.mark.usefixtures("later_ones_first")
async def test_a_send_made_while_an_earlier_one_waits_to_go_again_goes_after_it(server: RefusingServer) -> None:
    """Even where the server would take it (no window: a refusal it does not tie to later sends)."""
    server.refuse, server.windowed = {1}, False
    async with server.device() as dev:
        first = asyncio.create_task(dev.send("m0", chat="c1"))
        async with asyncio.timeout(5):
            while not dev._sends_again:  # noqa: ASYNC110 - the SDK's own state, no event to wait on
                await asyncio.sleep(0.005)  # the first was refused and waits to go again
        second = await asyncio.wait_for(dev.send("m5", chat="c1"), 10)
        assert (await first)["seq"] == 1 and second["seq"] == 2


async def test_a_send_that_fails_for_good_lets_the_later_ones_go(server: RefusingServer) -> None:
    server.refuse = {1}
    async with server.device() as dev:
        with pytest.raises(PigeonClientError) as failed:
            await dev.send("gives up", chat="c1", retries=0)
        assert failed.value.code == "rate_limited"
        server.window = None  # the server's window ends too
        assert (await asyncio.wait_for(dev.send("next", chat="c1"), 5))["seq"] == 1
        assert dev._sends_again == {}
