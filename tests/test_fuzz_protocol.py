"""Fuzzing the request envelopes over MQTT against a real server (tests/fuzz.py draws them).

For every drawn request, published by a real device on its ``up`` topic:
- a request the protocol's parsing must refuse gets an ``error`` reply with a protocol code
  (echoing its id when it had a readable one), and never an internal error;
- a request with an id whose kind always answers gets that answer or an error with a protocol code;
- at the end, the chats hold exactly the messages whose ``send`` was answered ``sent``, numbered
  1, 2, 3, … with no gaps: nothing refused changed anything.

Each case is followed by a marker request (a ``sync``), and the device's requests are handled
in order, so everything the case caused has arrived once the marker's reply has.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from hypothesis import given

from bridge.protocol import parse_request
from clients.launch import ServerProc
from clients.sdk import Profile, login
from tests.conftest import broker_flags, fresh_phone, production_flags
from tests.fuzz import ANSWERED, ERROR_CODES, TIMEOUT_S, Case, Ids, examples, request_case

MAX_PAYLOAD = 64 * 1024


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def fuzz_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server of its own with a rate limit no fuzz run reaches: refusals are then the
    protocol's, not the limiter's."""
    extra = ["--rate", "100000", "--burst", "100000"]
    if request.param == "mosquitto":
        extra += production_flags() + broker_flags()
    srv = ServerProc.start(tmp_path_factory.mktemp(f"fuzz-{request.param}"), *extra)
    srv.profile = request.param
    yield srv
    srv.stop()


class FuzzDevice:
    """A device on a paho client: publishes a payload, then a marker, and returns every reply
    and event that came on its topics in between."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.up = f"up/{profile.user_id}/{profile.device_id}"
        self._lock = threading.Condition()
        self._got: list[dict[str, Any]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=profile.device_id,
                                  clean_session=True, protocol=paho.MQTTv311)
        self.client.username_pw_set(profile.device_id, profile.token)
        self.client.on_message = self._on_message
        self.client.connect(profile.mqtt_host, profile.mqtt_port, keepalive=60)
        self.client.loop_start()
        done = [self.client.subscribe(t, qos=1) for t in (f"down/{profile.user_id}",
                                                           f"down/{profile.user_id}/{profile.device_id}")]
        assert all(rc == paho.MQTT_ERR_SUCCESS for rc, _ in done)
        self.roundtrip(b'{"type":"presence","state":"online"}')  # subscribed and heard

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self._got.append(json.loads(message.payload))
            self._lock.notify_all()

    def roundtrip(self, payload: bytes, timeout: float = 20.0) -> list[dict[str, Any]]:
        marker = f"marker-{secrets.token_hex(6)}"
        with self._lock:
            self._got.clear()
        self.client.publish(self.up, payload, qos=1)
        self.client.publish(self.up, json.dumps({"type": "sync", "id": marker, "limit": 1}).encode(), qos=1)
        with self._lock:
            if not self._lock.wait_for(lambda: any(m.get("id") == marker for m in self._got), timeout):
                raise AssertionError(f"no reply to the marker within {timeout} s after {payload[:200]!r}")
            got = [m for m in self._got if m.get("id") != marker]
            self._got.clear()
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _expected(case: Case) -> tuple[str | None, str | None]:
    """(the error code the protocol's parsing gives, the id it reads) for the payload."""
    try:
        req = parse_request(case.payload, MAX_PAYLOAD)
    except Exception as exc:  # ProtocolError: what the server must answer
        return getattr(exc, "code", "?"), getattr(exc, "request_id", None)
    return None, getattr(req, "id", None)


def check_case(dev: FuzzDevice, case: Case, sent: set[tuple[str, int]], tally: dict[str, int]) -> None:
    got = dev.roundtrip(case.payload)
    errors = [m for m in got if m.get("type") == "error"]
    for m in got:
        key = f"error {m.get('code')}" if m.get("type") == "error" else str(m.get("type"))
        tally[key] = tally.get(key, 0) + 1
    for e in errors:
        assert e.get("code") in ERROR_CODES - {"unavailable"}, (case, e)
    code, rid = _expected(case)
    if case.invalid:
        assert code is not None, f"the protocol's parsing accepted a payload meant to be invalid: {case}"
    if code is not None:  # refused by parsing: exactly one error, with that code and the id read
        assert [(e["code"], e.get("id")) for e in errors] == [(code, rid)], (case, got)
        assert not [m for m in got if m.get("type") not in ("error", "presence")], (case, got)
        return
    kinds = ANSWERED.get(json.loads(case.payload)["type"])
    if rid is not None and kinds is not None:
        answers = [m for m in got if m.get("id") == rid and (m.get("type") in kinds or m.get("type") == "error")]
        assert answers, f"no answer to {case} (got {got})"
    for m in got:
        if m.get("type") == "sent" and m.get("id") == rid:
            sent.add((m["chat"], m["seq"]))


@pytest.mark.timeout(TIMEOUT_S)
def test_fuzzed_requests_are_answered_and_refusals_change_nothing(fuzz_server: ServerProc) -> None:
    async def setup() -> tuple[Profile, Profile, str]:
        # ``me`` reads v1 on down/{user}: it says so at login
        me, peer = await login(fuzz_server.http, fresh_phone(), proto=1), await login(fuzz_server.http, fresh_phone())
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {me.token}"}) as http:
            reply = await http.post(f"{fuzz_server.http}/v1/chats", json={"kind": "direct", "peer": peer.user_id})
            reply.raise_for_status()
        return me, peer, reply.json()["chat"]

    me, peer, chat = asyncio.run(setup())
    ids = Ids(chat=chat, peer=peer.user_id, me=me.user_id)
    dev = FuzzDevice(me)
    sent: set[tuple[str, int]] = set()
    tally: dict[str, int] = {}
    cases = 0
    try:
        @examples(600 if fuzz_server.profile == "embedded" else 300)
        @given(case=request_case(ids))
        def run(case: Case) -> None:
            nonlocal cases
            cases += 1
            check_case(dev, case, sent, tally)

        run()
    finally:
        dev.close()
    print(f"{fuzz_server.profile}: {cases} requests, answers {sorted(tally.items())}, {len(sent)} messages stored")

    async def chats() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {me.token}"}) as http:
            reply = await http.get(f"{fuzz_server.http}/v1/chats")
            reply.raise_for_status()
            found: list[dict[str, Any]] = reply.json()["chats"]
            for c in found:
                hist = await http.get(f"{fuzz_server.http}/v1/chats/{c['chat']}/messages", params={"limit": 200})
                hist.raise_for_status()
                c["seqs"] = sorted(m["seq"] for m in hist.json()["messages"])
            return found

    for c in asyncio.run(chats()):
        mine = sorted(seq for ch, seq in sent if ch == c["chat"])
        # every stored message was answered 'sent', and the numbering has no gaps
        assert c["last_seq"] == len(mine) and mine == list(range(1, len(mine) + 1)), (c["chat"], c["last_seq"], mine)
        assert c["seqs"][-min(len(mine), 200):] == mine[-200:] if mine else c["seqs"] == []
