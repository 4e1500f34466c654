"""The SQLite store's group commit: writes that share one transaction still succeed or fail
one by one, and each caller hears only after the shared COMMIT."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from storage.base import StorageUnavailable
from storage.sqlite import SqliteStore


def insert(key: str, fail_with: Exception | None = None):  # type: ignore[no-untyped-def]
    def run(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO meta VALUES(?, 'x')", (key,))
        if fail_with is not None:
            raise fail_with
        return key

    return run


async def test_a_failing_write_rolls_back_alone_and_the_rest_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        jobs = [store._write(insert(f"k{i}", ValueError("refused") if i == 3 else None))  # noqa: SLF001
                for i in range(8)]
        jobs.append(store._write(insert("k0")))  # noqa: SLF001 - same key again: a sqlite error
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert results[:3] == ["k0", "k1", "k2"] and results[4:8] == ["k4", "k5", "k6", "k7"]
        assert isinstance(results[3], ValueError)
        assert isinstance(results[8], StorageUnavailable)
        await store.close()
        store = SqliteStore(tmp_path / "p.db")  # what a new process finds on disk
        await store.open()
        keys = await store._read(lambda c: [r[0] for r in c.execute(  # noqa: SLF001
            "SELECT key FROM meta WHERE key LIKE 'k%' ORDER BY key")])
        assert keys == ["k0", "k1", "k2", "k4", "k5", "k6", "k7"]
    finally:
        await store.close()


async def test_a_write_is_answered_only_once_committed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        await store._write(insert("durable"))  # noqa: SLF001
        # a separate connection sees it at once: the caller was answered after COMMIT
        other = sqlite3.connect(tmp_path / "p.db")
        try:
            assert other.execute("SELECT count(*) FROM meta WHERE key='durable'").fetchone() == (1,)
        finally:
            other.close()
    finally:
        await store.close()


@pytest.mark.parametrize("n", [1, 600])
async def test_batches_larger_than_one_commit_all_land(tmp_path: Path, n: int) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        got = await asyncio.gather(*(store._write(insert(f"b{i}")) for i in range(n)))  # noqa: SLF001
        assert sorted(got) == sorted(f"b{i}" for i in range(n))
    finally:
        await store.close()
