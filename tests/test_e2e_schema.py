"""`pigeon serve` refuses a store whose schema is missing or old, and `pigeon db migrate` fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clients.launch import BACKEND_VARS, ROOT, ServerProc
from tests.conftest import production_url


def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_serve_refuses_an_unmigrated_keyspace_until_migrate(tmp_path: Path) -> None:
    base = production_url("PIGEON_STORE", "cassandra://").rsplit("/", 1)[0]
    store = f"{base}/pigeon_fresh_{uuid.uuid4().hex[:8]}"
    refused = pigeon("serve", "--dev", "--store", store, "--data-dir", str(tmp_path / "a"), "--http-port", "0",
                     "--mqtt-port", "0", "--ws-port", "0")
    assert refused.returncode == 1
    assert "pigeon db migrate" in refused.stderr + refused.stdout
    migrated = pigeon("db", "migrate", "--store", store)
    assert migrated.returncode == 0, migrated.stderr
    srv = ServerProc.start(tmp_path / "b", "--store", store)
    srv.stop()


DDL_S = 60  # a schema change waits for the cluster to agree on it: on a busy box, longer than a query


async def test_migrate_moves_schema_2_send_ids_to_their_devices() -> None:
    """A keyspace written when send ids were kept per user keeps answering retries after migrate."""
    from storage import open_store
    from storage.base import NewMessage
    from storage.cassandra import SCHEMA_VERSION, SchemaError

    base = production_url("PIGEON_STORE", "cassandra://").rsplit("/", 1)[0]
    ks = f"pigeon_fresh_{uuid.uuid4().hex[:8]}"
    store = open_store(f"{base}/{ks}")
    await store.migrate()
    await store.open()
    session = store._session  # type: ignore[attr-defined]
    try:
        a = (await store.create_user("+15550001111", 1)).user_id
        b = (await store.create_user("+15550002222", 1)).user_id
        chat = await store.direct_chat(a, b, 1)
        await store.append_message(NewMessage(chat_id=chat.chat_id, sender=a, device="d-phone", client_id="7", ts=1,
                                              kind="text", body="hello"), [a, b])
        device = await store.add_device(a, "phone", "android", 1)
        # before schema 6 devices said nothing of the protocol they read
        session.execute(f"ALTER TABLE {ks}.devices DROP proto", timeout=DDL_S)
        session.execute(f"ALTER TABLE {ks}.user_devices DROP proto", timeout=DDL_S)
        # before schema 7 a send's record said nothing of where it was numbered before its fan-out
        session.execute(f"ALTER TABLE {ks}.device_sent DROP open_chat", timeout=DDL_S)
        session.execute(f"ALTER TABLE {ks}.device_sent DROP open_seq", timeout=DDL_S)
        # before schema 8 a fence kept nothing of the one before it
        session.execute(f"ALTER TABLE {ks}.fences DROP prev_epoch", timeout=DDL_S)
        session.execute(f"ALTER TABLE {ks}.fences DROP prev_after", timeout=DDL_S)
        # as schema 2 left it: send ids per user in "sent", nothing in "device_sent"
        session.execute(f"CREATE TABLE {ks}.sent (sender text, client_id text, chat_id text, seq bigint, "
                        "PRIMARY KEY ((sender, client_id)))", timeout=DDL_S)
        session.execute(f"INSERT INTO {ks}.sent (sender, client_id, chat_id, seq) VALUES (%s, '7', %s, 1)",
                        (a, chat.chat_id))
        session.execute(f"TRUNCATE {ks}.device_sent", timeout=DDL_S)
        session.execute(f"INSERT INTO {ks}.meta (key, value) VALUES ('schema', '2')")
        await store.close()

        store = open_store(f"{base}/{ks}")
        with pytest.raises(SchemaError, match=f"needs {SCHEMA_VERSION}"):
            await store.open()
        await store.migrate()
        await store.open()
        found = await store.find_sent("d-phone", "7")
        assert found is not None and found.body == "hello" and found.seq == 1
        again = await store.append_message(NewMessage(chat_id=chat.chat_id, sender=a, device="d-phone",
                                                      client_id="8", ts=2, kind="text", body="again"), [a, b])
        assert again.message.seq == 2
        newest, opened_under = await store._fence_to_open(f"c:{chat.chat_id}")  # type: ignore[attr-defined]
        assert newest == opened_under and newest[1] == 1  # fenced at seq 1 when opened again after migrate
        await store.settled()  # type: ignore[attr-defined]
        assert await store._x("get_sent", "d-phone", "8") == [(chat.chat_id, 2, chat.chat_id, 2)]  # type: ignore[attr-defined]
        got = await store.get_device(device.device_id)
        assert got is not None and got.proto == 1 and await store.reads_v1(a)
        assert (await store.add_device(b, "new", "python", 2, proto=2)).proto == 2 and not await store.reads_v1(b)
        session = store._session  # type: ignore[attr-defined]
        assert session.execute("SELECT table_name FROM system_schema.tables WHERE keyspace_name=%s "
                               "AND table_name='sent'", (ks,)).one() is None
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=DDL_S)
        await store.close()
