"""Protocol section 6 end to end: the HTTP API."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from bridge.presence import ONLINE_COUNT_TTL_S
from clients.sdk import Api, PigeonClientError, login
from tests.conftest import NewUser, ServerProc, fresh_phone


async def test_login_flow_codes_and_lockout(server: ServerProc) -> None:
    phone = fresh_phone()
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.post("/v1/auth/code", json={"phone": "5550001111"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post("/v1/auth/code", json={"phone": phone})
        assert r.status_code == 202 and len(r.json()["dev_code"]) == 6
        code = r.json()["dev_code"]
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": wrong})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code, "device_name": "pixel",
                                                      "platform": "android"})
        assert r.status_code == 200
        body = r.json()
        assert set(body) >= {"user_id", "device_id", "token", "expires_at", "mqtt"}
        assert body["mqtt"]["port"] == server.mqtt_port
        if server.ws_port:
            assert body["mqtt"]["ws_url"] == f"ws://{server.mqtt_host}:{server.ws_port}/mqtt"
        else:  # an external broker without a WebSocket listener
            assert body["mqtt"]["ws_url"] is None
        # a used code cannot be used again
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code})
        assert r.status_code == 401
        # five wrong guesses lock the phone, and asking for a new code does not unlock it
        r = await http.post("/v1/auth/code", json={"phone": phone})
        code = r.json()["dev_code"]
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        statuses = [
            (await http.post("/v1/auth/verify", json={"phone": phone, "code": wrong})).status_code for _ in range(5)
        ]
        assert statuses == [401, 401, 401, 401, 429]
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert r.json()["error"]["retry_after_ms"] > 0
        assert (await http.post("/v1/auth/code", json={"phone": phone})).status_code == 429


async def test_a_body_nested_past_the_json_parsers_depth_is_a_bad_request(server: ServerProc) -> None:
    """(it was an internal error: Python's JSON reader raises RecursionError past its depth)"""
    async with httpx.AsyncClient(base_url=server.http) as http:
        for body in (b"[" * 5000, b'{"phone":' + b"[" * 5000 + b"]" * 5000 + b"}"):
            r = await http.post("/v1/auth/code", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == {"code": "bad_request",
                                                                  "message": "body is nested too deeply"}


async def test_a_login_says_which_protocol_the_device_reads_and_a_bad_one_uses_no_code(server: ServerProc) -> None:
    phone = fresh_phone()
    async with httpx.AsyncClient(base_url=server.http) as http:
        code = (await http.post("/v1/auth/code", json={"phone": phone})).json()["dev_code"]
        for bad in ("2", True, 3, 0, 2.0, [2]):
            r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code, "proto": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", bad
            assert "proto" in r.json()["error"]["message"]
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code, "proto": 2})  # the code still works
        assert r.status_code == 200 and r.json()["proto"] == 2
        first = r.json()
        code = (await http.post("/v1/auth/code", json={"phone": phone})).json()["dev_code"]
        r = await http.post("/v1/auth/verify", json={"phone": phone, "code": code, "proto": None})
        assert r.status_code == 200 and r.json()["proto"] == 1
        listed = (await http.get("/v1/devices", headers={"Authorization": f"Bearer {first['token']}"})).json()
        assert [d["proto"] for d in listed["devices"]] == [2, 1]


async def test_same_phone_links_a_second_device_to_the_same_user(new_user: NewUser) -> None:
    a = await new_user()
    a2 = await new_user(a.phone)
    assert a2.user_id == a.user_id and a2.device_id != a.device_id


async def test_me_rename_find_and_push(new_user: NewUser) -> None:
    a, b = await new_user(), await new_user()
    api = Api(a)
    try:
        me = await api.me()
        assert me["user_id"] == a.user_id and me["phone"] == a.phone and me["device_id"] == a.device_id
        assert (await api.rename("Alice"))["name"] == "Alice"
        assert (await api.me())["name"] == "Alice"
        with pytest.raises(PigeonClientError) as info:
            await api.rename("")
        assert info.value.code == "bad_request"
        assert await api.find_user(b.phone) == b.user_id
        with pytest.raises(PigeonClientError) as info:
            await api.find_user(fresh_phone())
        assert info.value.status == 404
        assert (await api.set_push("webhook", "http://127.0.0.1:9/wake"))["provider"] == "webhook"
        with pytest.raises(PigeonClientError) as info:
            await api.set_push("pigeon-post", "x")
        assert info.value.code == "bad_request"
        with pytest.raises(PigeonClientError) as info:  # the server was given no FCM credentials
            await api.set_push("fcm", "f" * 40)
        assert info.value.code == "bad_request" and "credentials" in info.value.message
        with pytest.raises(PigeonClientError) as info:
            await api.set_push("webhook", "http://127.0.0.1:9/x", device_id=b.device_id)
        assert info.value.status == 403
        assert [d["push"] for d in await api.devices()] == ["webhook"]
    finally:
        await api.close()


async def test_chats_direct_is_idempotent_and_groups_are_limited(new_user: NewUser) -> None:
    a, b = await new_user(), await new_user()
    api, bapi = Api(a), Api(b)
    try:
        d1 = await api.open_direct(b.user_id)
        d2 = await bapi.open_direct(a.user_id)
        assert d1["chat"] == d2["chat"] and d1["kind"] == "direct" and d1["last_seq"] == 0
        group = await api.create_group("friends", [b.user_id])
        assert group["admins"] == [a.user_id]
        listed = {c["chat"]: c for c in await bapi.chats()}
        assert set(listed) == {d1["chat"], group["chat"]}
        assert listed[group["chat"]]["title"] == "friends" and listed[group["chat"]]["last_seq"] == 1
        with pytest.raises(PigeonClientError) as info:
            await api.create_group("crowd", [f"u{i:016x}" for i in range(100)])  # 101 with the creator
        assert info.value.code == "bad_request"
        with pytest.raises(PigeonClientError) as info:
            await api.create_group("ghosts", ["u-nobody"])
        assert info.value.code == "not_found"
        with pytest.raises(PigeonClientError) as info:
            await api._call("POST", "/v1/chats", json={"kind": "channel"})  # noqa: SLF001
        assert info.value.code == "bad_request"
    finally:
        await api.close()
        await bapi.close()


async def test_only_admins_add_and_remove_members(new_user: NewUser) -> None:
    admin, m, outsider = await new_user(), await new_user(), await new_user()
    api, mapi = Api(admin), Api(m)
    try:
        chat = (await api.create_group("g", [m.user_id]))["chat"]
        with pytest.raises(PigeonClientError) as info:
            await mapi.add_member(chat, outsider.user_id)
        assert info.value.status == 403
        with pytest.raises(PigeonClientError) as info:
            await mapi.remove_member(chat, admin.user_id)
        assert info.value.status == 403
        await api.add_member(chat, outsider.user_id)
        await api.add_member(chat, outsider.user_id)  # adding twice changes nothing
        await api.remove_member(chat, outsider.user_id)
        members = (await api._call("GET", f"/v1/chats/{chat}"))["members"]  # noqa: SLF001
        assert set(members) == {admin.user_id, m.user_id}
        history = await api.history(chat)
        assert [x["event"] for x in reversed(history["messages"])] == ["created", "member_added", "member_removed"]
        direct = (await api.open_direct(m.user_id))["chat"]
        with pytest.raises(PigeonClientError) as info:
            await api.add_member(direct, outsider.user_id)
        assert info.value.status == 403
    finally:
        await api.close()
        await mapi.close()


async def test_history_pages_newest_first(new_user: NewUser) -> None:
    a, b = await new_user(), await new_user()
    api = Api(a)
    try:
        chat = (await api.open_direct(b.user_id))["chat"]
        for i in range(7):
            await api.post_message(chat, f"h{i}")
        page = await api.history(chat, limit=3)
        assert [x["seq"] for x in page["messages"]] == [7, 6, 5] and page["next_before"] == 5
        page = await api.history(chat, before=5, limit=3)
        assert [x["seq"] for x in page["messages"]] == [4, 3, 2] and page["next_before"] == 2
        page = await api.history(chat, before=2, limit=3)
        assert [x["seq"] for x in page["messages"]] == [1] and page["next_before"] is None
        with pytest.raises(PigeonClientError) as info:
            await api.history(chat, limit=0)
        assert info.value.code == "bad_request"
    finally:
        await api.close()


async def test_healthz_and_metrics(server: ServerProc, new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    await da.send("count me", to=b.user_id)
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        # the online count is taken at most every ONLINE_COUNT_TTL_S (a walk over the shared
        # state), so a scrape may show one a few seconds old: from before the device said online
        deadline = time.monotonic() + ONLINE_COUNT_TTL_S + 2
        while True:
            text = (await http.get("/metrics")).text
            online = [ln for ln in text.splitlines() if ln.startswith("pigeon_online_devices ")]
            if float(online[0].split()[1]) >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    for name in ("pigeon_messages_in_total", "pigeon_messages_out_total", "pigeon_fanout_recipients_bucket",
                 "pigeon_sync_batches_total", "pigeon_connected_devices", "pigeon_errors_total",
                 "pigeon_handling_seconds_bucket", "pigeon_gc_pause_seconds_bucket"):
        assert name in text, name
    connected = [ln for ln in text.splitlines() if ln.startswith("pigeon_connected_devices ")]
    assert float(connected[0].split()[1]) >= 1
    online = [ln for ln in text.splitlines() if ln.startswith("pigeon_online_devices ")]
    assert float(online[0].split()[1]) >= 1  # counted when read, the SDK having said it is online


async def test_login_helper_rejects_unknown_phone_format(server: ServerProc) -> None:
    with pytest.raises(PigeonClientError) as info:
        await login(server.http, "not-a-phone")
    assert info.value.code == "bad_request"
    await asyncio.sleep(0)


async def test_unlinking_a_device_ends_its_token_and_its_connection(new_user: NewUser, server: ServerProc) -> None:
    from tests.mqtt_raw import connack_code, connect_packet, read_packet

    phone_owner = await new_user()
    old_phone = await new_user(phone_owner.phone)
    stranger = await new_user()
    # the old phone is connected when it gets unlinked
    reader, writer = await asyncio.open_connection(server.mqtt_host, server.mqtt_port)
    writer.write(connect_packet(old_phone.device_id, old_phone.device_id, old_phone.token))
    await writer.drain()
    assert (await read_packet(reader))[1][1] == 0
    async with Api(phone_owner) as api, Api(old_phone) as gone, Api(stranger) as other:
        with pytest.raises(PigeonClientError) as info:
            await other._call("DELETE", f"/v1/devices/{old_phone.device_id}")  # noqa: SLF001 - not theirs
        assert info.value.status == 404
        assert (await api._call("DELETE", f"/v1/devices/{old_phone.device_id}"))["unlinked"] is True  # noqa: SLF001
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # its connection was closed
        with pytest.raises(PigeonClientError) as info:
            await gone.me()
        assert info.value.status == 401
        assert (await api.me())["user_id"] == phone_owner.user_id  # the other device is unaffected
    writer.close()
    code = await connack_code(server.mqtt_host, server.mqtt_port,
                              connect_packet(old_phone.device_id, old_phone.device_id, old_phone.token))
    assert code in (4, 5)


async def test_a_refreshed_token_works_over_http_and_mqtt(new_user: NewUser, server: ServerProc) -> None:
    from tests.mqtt_raw import connack_code, connect_packet

    a = await new_user()
    async with Api(a) as api:
        fresh = await api._call("POST", "/v1/auth/refresh")  # noqa: SLF001
    assert fresh["device_id"] == a.device_id and fresh["token"] != a.token and fresh["expires_at"] >= a.expires_at
    a.token = fresh["token"]
    async with Api(a) as api:
        assert (await api.me())["device_id"] == a.device_id
    code = await connack_code(server.mqtt_host, server.mqtt_port, connect_packet(a.device_id, a.device_id, a.token))
    assert code == 0
