"""Protocol sections 1–3 end to end: CONNECT refusals, topic permissions, every error code."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import pytest

from clients.sdk import Api, Device, PigeonClientError
from tests.conftest import NewUser, ServerProc
from tests.mqtt_raw import connack_code, connect_packet, read_packet, subscribe_packet


async def raw_reply(dev: Device, payload: bytes) -> dict[str, Any]:
    """Publish raw bytes on the device's up topic and return the next reply on its device topic."""
    assert dev._client is not None  # noqa: SLF001 - raw publish for malformed payloads
    await dev._client.publish(dev.up, payload, qos=1)  # noqa: SLF001
    async with asyncio.timeout(5):
        while True:
            ev = await dev.next_event()
            if ev["type"] == "error":
                return ev


# -- section 1: CONNECT --------------------------------------------------------------------------
async def test_connect_refusals(new_user: NewUser, server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    host, port = server.mqtt_host, server.mqtt_port
    # the embedded broker says 4 for bad credentials and 5 for the wrong identity; Mosquitto says 5
    bad_token, wrong_identity = ((4,), (5,)) if server.profile != "mosquitto" else ((5,), (5,))
    assert await connack_code(host, port, connect_packet(a.device_id, a.device_id, a.token)) == 0
    assert await connack_code(host, port, connect_packet(a.device_id, a.device_id, "pg1.x.y.1.zz")) in bad_token
    forged = a.token[:-4] + ("0000" if not a.token.endswith("0000") else "1111")
    assert await connack_code(host, port, connect_packet(a.device_id, a.device_id, forged)) in bad_token
    assert await connack_code(host, port, connect_packet(a.device_id, a.device_id, None)) in (4, 5)
    # a valid token used under another device's name
    assert await connack_code(host, port, connect_packet(b.device_id, b.device_id, a.token)) in wrong_identity
    assert await connack_code(host, port, connect_packet(a.device_id, "someone", a.token)) in wrong_identity
    assert await connack_code(host, port, connect_packet("other-id", a.device_id, a.token)) in wrong_identity


async def test_a_will_cannot_speak_for_another_device(new_user: NewUser, connect: Any, server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("hi", to=b.user_id)
    await connect(b)  # b is online
    bad_will = (f"up/{b.user_id}/{b.device_id}", b'{"type":"presence","state":"offline"}')
    reader, writer = await asyncio.open_connection(server.mqtt_host, server.mqtt_port)
    writer.write(connect_packet(a.device_id, a.device_id, a.token, will=bad_will))
    await writer.drain()
    code = (await read_packet(reader))[1][1]
    writer.close()  # if the CONNECT was accepted, the broker now fires the will
    # refused at CONNECT (embedded broker) or dropped when it fires (Mosquitto's ACL)
    assert code == 5 or server.profile == "mosquitto"
    await asyncio.sleep(1.0)
    assert (await da.api.presence(b.user_id))["online"] is True


async def test_refused_connect_leaves_the_real_device_connected(new_user: NewUser, connect: Any,
                                                                server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    da, db = await connect(a), await connect(b)
    code = await connack_code(server.mqtt_host, server.mqtt_port, connect_packet(a.device_id, a.device_id, "bad"))
    assert code in (4, 5)
    await db.send("still there?", to=a.user_id)
    async with asyncio.timeout(5):
        while (await da.next_event())["type"] != "msg":
            pass


# -- section 2: topics ---------------------------------------------------------------------------
@pytest.mark.parametrize("topic", ["#", "+/+", "down/+", "$SYS/#", "up/+/+", "down/OTHER", "down/OTHER/x"])
async def test_subscriptions_outside_own_topics_are_refused(new_user: NewUser, server: ServerProc,
                                                            topic: str) -> None:
    a, b = await new_user(), await new_user()
    topic = topic.replace("OTHER", b.user_id)
    reader, writer = await asyncio.open_connection(server.mqtt_host, server.mqtt_port)
    try:
        writer.write(connect_packet(a.device_id, a.device_id, a.token))
        writer.write(subscribe_packet(topic, 7))
        writer.write(subscribe_packet(f"down/{a.user_id}", 8))
        await writer.drain()
        assert (await read_packet(reader))[1][1] == 0
        kind, body = await read_packet(reader)
        assert kind == 0x90 and body[2] == 0x80  # SUBACK: refused
        kind, body = await read_packet(reader)
        assert kind == 0x90 and body[2] == 0x01  # own topic granted QoS 1
    finally:
        writer.close()


async def test_publishing_outside_own_up_topic_changes_nothing(new_user: NewUser, connect: Any,
                                                                server: ServerProc) -> None:
    a, b = await new_user(), await new_user()
    db = await connect(b)
    forged = json.dumps({"type": "send", "id": "forged-1", "to": a.user_id, "body": "I am b"})
    async with aiomqtt.Client(server.mqtt_host, server.mqtt_port, identifier=a.device_id, username=a.device_id,
                              password=a.token, clean_session=True) as c:
        await c.publish(f"up/{b.user_id}/{b.device_id}", forged, qos=1)  # b's topic
        await c.publish(f"down/{b.user_id}", b'{"type":"msg","body":"spoof"}', qos=1)
    await asyncio.sleep(0.5)
    assert [e for e in db.pending_events() if e["type"] == "msg"] == []
    assert await db.api.chats() == []


# -- section 3: errors ---------------------------------------------------------------------------
async def test_every_malformed_payload_gets_an_error_and_changes_nothing(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    cases: list[tuple[bytes, str, str | None]] = [
        (b"not json", "bad_request", None),
        (b"[1,2]", "bad_request", None),
        (b'{"id":"r1"}', "bad_request", "r1"),
        (b'{"type":7,"id":"r2"}', "bad_request", "r2"),
        (b'{"type":"fly","id":"r3"}', "unknown_type", "r3"),
        (json.dumps({"type": "send", "id": "r4", "to": b.user_id, "body": 5}).encode(), "bad_request", "r4"),
        (json.dumps({"type": "send", "id": "r5", "to": b.user_id}).encode(), "bad_request", "r5"),
        (json.dumps({"type": "send", "id": "r6", "to": b.user_id, "chat": "c1", "body": "x"}).encode(),
         "bad_request", "r6"),
        (json.dumps({"type": "send", "id": "x" * 65, "to": b.user_id, "body": "x"}).encode(), "bad_request", None),
        (json.dumps({"type": "sync", "id": "r7", "after": -1}).encode(), "bad_request", "r7"),
        (json.dumps({"type": "sync", "id": "r8", "after": 0, "limit": 1001}).encode(), "bad_request", "r8"),
        (json.dumps({"type": "sync", "id": "r9", "after": True}).encode(), "bad_request", "r9"),
        (json.dumps({"type": "ack", "up_to": "3"}).encode(), "bad_request", None),
        (json.dumps({"type": "presence", "state": "away"}).encode(), "bad_request", None),
        (json.dumps({"type": "watch", "id": "r10", "users": "u1"}).encode(), "bad_request", "r10"),
        (json.dumps({"type": "media_upload", "id": "r11", "sha256": "zz", "size": 1, "mime": "a/b"}).encode(),
         "bad_request", "r11"),
        (json.dumps({"type": "send", "id": "r12", "to": b.user_id, "body": "x" * 70_000}).encode(), "too_large", None),
        (json.dumps({"type": "send", "id": "r13", "to": "u-nobody", "body": "x"}).encode(), "not_found", "r13"),
        (json.dumps({"type": "send", "id": "r14", "chat": "c-nowhere", "body": "x"}).encode(), "not_found", "r14"),
        (json.dumps({"type": "send", "id": "r15", "to": a.user_id, "body": "me"}).encode(), "bad_request", "r15"),
        (json.dumps({"type": "media_done", "id": "r16", "key": "f" * 64}).encode(), "not_found", "r16"),
    ]
    for payload, code, rid in cases:
        err = await raw_reply(da, payload)
        assert (err["code"], err["id"]) == (code, rid), payload[:80]
        assert isinstance(err["message"], str) and err["message"]
    assert await da.api.chats() == []
    assert (await da.request({"type": "sync", "after": 0}))["items"] == []


async def test_rate_limit_answers_rate_limited_with_retry_after(new_user: NewUser, connect: Any) -> None:
    a = await new_user()
    da = await connect(a)
    assert da._client is not None  # noqa: SLF001
    # far more than the default burst of 200, as fast as the connection allows
    for i in range(320):
        await da._client.publish(da.up, json.dumps({"type": "sync", "id": f"s{i}", "after": 0, "limit": 1}), qos=0)  # noqa: SLF001
    errors: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not errors:
            ev = await da.next_event()
            if ev["type"] == "error":
                errors.append(ev)
    assert errors[0]["code"] == "rate_limited" and errors[0]["retry_after_ms"] > 0
    assert errors[0]["id"].startswith("s")
    await asyncio.sleep(errors[0]["retry_after_ms"] / 1000 + 0.5)
    # after waiting as told, requests are served again
    assert (await da.request({"type": "sync", "after": 0, "limit": 1}))["type"] == "batch"


async def test_forbidden_read_typing_and_media_url_for_non_members(new_user: NewUser, connect: Any) -> None:
    a, b, c = await new_user(), await new_user(), await new_user()
    da, dc = await connect(a), await connect(c)
    chat = (await da.send("secret", to=b.user_id))["chat"]
    for req in ({"type": "sync", "after": 0},):
        assert (await dc.request(req))["items"] == []  # c's own inbox: nothing of a and b
    err = await raw_reply(dc, json.dumps({"type": "read", "chat": chat, "up_to": 1}).encode())
    assert err["code"] == "forbidden"
    err = await raw_reply(dc, json.dumps({"type": "typing", "chat": chat}).encode())
    assert err["code"] == "forbidden"
    with pytest.raises(PigeonClientError) as info:
        await dc.request({"type": "media_url", "key": "a" * 64, "chat": chat})
    assert info.value.code == "forbidden"


async def test_http_errors_use_the_error_envelope(new_user: NewUser, server: ServerProc) -> None:
    import httpx

    a = await new_user()
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get("/v1/me")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.get("/v1/me", headers={"Authorization": "Bearer pg1.a.b.9999999999999.00"})
        assert r.status_code == 401
        auth = {"Authorization": f"Bearer {a.token}"}
        r = await http.post("/v1/chats", content=b"{nope", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post("/v1/chats", json={"kind": "direct", "peer": "u-nobody"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.get("/v1/chats/c-nowhere/messages", headers=auth)
        assert r.status_code == 404
        r = await http.get("/v1/no-such-route", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.post("/v1/chats", content=b"{" + b" " * 70_000 + b"}", headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    api = Api(a)
    try:
        with pytest.raises(PigeonClientError) as info:
            await api.history("c-nowhere")
        assert info.value.status == 404
    finally:
        await api.close()
