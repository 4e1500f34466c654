"""Restarting the server on the same data directory loses nothing that was acknowledged."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from clients.sdk import Api, Device, PigeonClientError, login
from tests.conftest import ServerProc, fresh_phone


async def test_restart_keeps_messages_inboxes_logins_and_sequences(tmp_path: Path) -> None:
    srv = ServerProc.start(tmp_path / "data")
    try:
        a = await login(srv.http, fresh_phone())
        b = await login(srv.http, fresh_phone())
        async with Device(a) as da:
            sent = [await da.send(f"before {i}", to=b.user_id) for i in range(5)]
    finally:
        # a hard kill: nothing gets a chance to flush after the 'sent' replies
        srv.stop(signal.SIGKILL)
    chat = sent[0]["chat"]
    srv = ServerProc.start(tmp_path / "data")
    try:
        for p in (a, b):  # tokens survive: the secret is kept in the data directory
            p.http_url, p.mqtt_host, p.mqtt_port = srv.http, srv.mqtt_host, srv.mqtt_port
            p.ws_url = f"ws://{srv.mqtt_host}:{srv.ws_port}/mqtt"
        async with Device(b) as db:
            got = [e for e in db.pending_events() if e["type"] == "msg"]
            assert [e["body"] for e in got] == [f"before {i}" for i in range(5)]
            assert [e["inbox"] for e in got] == [1, 2, 3, 4, 5]
        async with Device(a) as da:
            after = await da.send("after restart", chat=chat)
            assert after["seq"] == 6  # numbering continues, nothing reused
            again = await da.send("before 0", to=b.user_id, id=sent[0]["id"])
            assert again["seq"] == 1  # a retry of a pre-restart send is still recognised
        api = Api(a)
        try:
            assert [m["seq"] for m in (await api.history(chat))["messages"]] == [6, 5, 4, 3, 2, 1]
        finally:
            await api.close()
    finally:
        srv.stop()


async def test_store_failure_answers_unavailable_never_sent_and_recovers(tmp_path: Path) -> None:
    srv = ServerProc.start(tmp_path / "data")
    try:
        a = await login(srv.http, fresh_phone())
        b = await login(srv.http, fresh_phone())
        async with Device(a, reply_timeout=20) as da:
            # another process takes the database's write lock and keeps it
            blocker = sqlite3.connect(tmp_path / "data" / "pigeon.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(PigeonClientError) as info:
                    await da.request({"type": "send", "id": "during-outage", "to": b.user_id, "body": "x"})
                assert info.value.code == "unavailable"
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            # the same request, retried, now goes through exactly once
            sent = await da.send("x", to=b.user_id, id="during-outage")
            assert sent["seq"] == 1
            async with Api(a) as api:
                assert len((await api.history(sent["chat"]))["messages"]) == 1
    finally:
        srv.stop()
