"""An embedded database written by an older Pigeon opens, and keeps what it held, under this one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.base import NewMessage
from storage.sqlite import SCHEMA_VERSION, SqliteStore

T0 = 1_700_000_000_000


async def test_schema_1_send_ids_move_to_their_devices(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    store = SqliteStore(db)
    await store.open()
    a = (await store.create_user("+15550001111", T0)).user_id
    b = (await store.create_user("+15550002222", T0)).user_id
    chat = await store.direct_chat(a, b, T0)
    await store.append_message(NewMessage(chat_id=chat.chat_id, sender=a, device="d-phone", client_id="7",
                                          ts=T0, kind="text", body="hello"), [a, b])
    await store.close()
    # make it look as schema 1 left it: send ids kept per user in a table named "sent"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE sent(sender TEXT NOT NULL, client_id TEXT NOT NULL, chat_id TEXT NOT NULL,"
                  " seq INTEGER NOT NULL, PRIMARY KEY(sender, client_id)) WITHOUT ROWID")
        c.execute("INSERT INTO sent SELECT sender, client_id, chat_id, seq FROM messages")
        c.execute("DELETE FROM device_sent")
        c.execute("UPDATE meta SET value='1' WHERE key='schema'")

    store = SqliteStore(db)
    await store.open()
    try:
        found = await store.find_sent("d-phone", "7")
        assert found is not None and found.body == "hello" and found.seq == 1
        retry = await store.append_message(NewMessage(chat_id=chat.chat_id, sender=a, device="d-phone",
                                                      client_id="7", ts=T0 + 5, kind="text", body="hello"), [a, b])
        assert retry.duplicate and retry.message.seq == 1
        assert await store.inbox_head(b) == 1
    finally:
        await store.close()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA_VERSION)
        assert c.execute("SELECT count(*) FROM sqlite_master WHERE name='sent'").fetchone()[0] == 0


async def test_schema_2_devices_read_v1(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    store = SqliteStore(db)
    await store.open()
    u = (await store.create_user("+15550001111", T0)).user_id
    old = await store.add_device(u, "phone", "android", T0)
    await store.close()
    with sqlite3.connect(db) as c:  # as schema 2 left it: devices say nothing of their protocol
        c.execute("ALTER TABLE devices DROP COLUMN proto")
        c.execute("UPDATE meta SET value='2' WHERE key='schema'")

    store = SqliteStore(db)
    await store.open()
    try:
        got = await store.get_device(old.device_id)
        assert got is not None and got.proto == 1 and await store.reads_v1(u)
        assert (await store.add_device(u, "new", "python", T0 + 1, proto=2)).proto == 2
        await store.remove_device(old.device_id)
        assert not await store.reads_v1(u)
    finally:
        await store.close()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA_VERSION) == "3"
