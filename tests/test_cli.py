"""The ``pigeon`` command as a user runs it, against the real test server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from clients.sdk import Device, Profile
from tests.conftest import ROOT, ServerProc, fresh_phone


def pigeon(server: ServerProc, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
    env = {**os.environ, "PIGEON_SERVER": server.http, "NO_COLOR": "1", "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "clients.cli", *args], cwd=ROOT, env=env, input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


async def test_login_send_history_groups(server: ServerProc, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice.json", tmp_path / "bob.json"
    pa, pb = fresh_phone(), fresh_phone()
    out = await asyncio.to_thread(pigeon, server, "login", pa, "--display-name", "Alice", "--profile", str(alice))
    assert f"logged in as Alice ({pa})" in out
    out = await asyncio.to_thread(pigeon, server, "login", pb, "--profile", str(bob))
    assert f"logged in as {pb}" in out and "--display-name" in out
    out = await asyncio.to_thread(pigeon, server, "send", pb, "hello [bob]", "--profile", str(alice))
    assert "as seq 1" in out
    note = tmp_path / "note.txt"
    note.write_text("attached")
    await asyncio.to_thread(pigeon, server, "send", pb, "see file", "--file", str(note), "--profile", str(alice))
    hist = await asyncio.to_thread(pigeon, server, "history", pa, "--profile", str(bob))
    assert "hello [bob]" in hist and "[file note.txt, 8 bytes]" in hist
    # people are shown by name and phone, never by their opaque ids
    assert f"Alice ({pa}): hello [bob]" in hist
    assert Profile.load(alice).user_id not in hist
    out = await asyncio.to_thread(pigeon, server, "group", "create", "Book club", pb, "--profile", str(alice))
    assert "with 2 members" in out
    listing = await asyncio.to_thread(pigeon, server, "chats", "--profile", str(bob))
    assert "group" in listing and "Book club" in listing and "direct" in listing
    assert f"Alice ({pa})" in listing and Profile.load(alice).user_id not in listing


async def test_push_registers_and_removes_a_webhook(server: ServerProc, tmp_path: Path) -> None:
    me = tmp_path / "me.json"
    await asyncio.to_thread(pigeon, server, "login", fresh_phone(), "--profile", str(me))
    out = await asyncio.to_thread(pigeon, server, "push", "webhook", "http://127.0.0.1:9/wake", "--profile", str(me))
    assert "push: webhook" in out
    out = await asyncio.to_thread(pigeon, server, "push", "off", "--profile", str(me))
    assert "push: -" in out


async def test_interactive_chat_sends_and_shows_ticks(server: ServerProc, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice.json", tmp_path / "bob.json"
    pa, pb = fresh_phone(), fresh_phone()
    await asyncio.to_thread(pigeon, server, "login", pa, "--profile", str(alice))
    await asyncio.to_thread(pigeon, server, "login", pb, "--profile", str(bob))
    async with Device(Profile.load(bob)) as dbob:
        env = {**os.environ, "PIGEON_SERVER": server.http, "NO_COLOR": "1", "COLUMNS": "200"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "chat", pb, "--profile", str(alice), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        lines: list[str] = []

        async def until(text: str) -> None:
            async with asyncio.timeout(20):
                while not any(text in ln for ln in lines):
                    line = await proc.stdout.readline()  # type: ignore[union-attr]
                    assert line, "chat exited early"
                    lines.append(line.decode())

        await until("type a message")
        proc.stdin.write(b"typed in the terminal\n")
        await proc.stdin.drain()
        async with asyncio.timeout(10):
            while (ev := await dbob.next_event())["type"] != "msg":
                pass
        assert ev["body"] == "typed in the terminal"
        await until("✓ sent")
        await dbob.read(ev["chat"], ev["seq"])
        await until("read")
        reply: dict[str, Any] = await dbob.send("answer from bob", chat=ev["chat"])
        await until("answer from bob")
        assert reply["seq"] == 2
        assert any(f"{pb}: answer from bob" in ln for ln in lines), lines[-3:]
        # a received file can be saved from the chat
        media = await dbob.upload(b"thirteen byte", "text/plain", name="note.txt")
        await dbob.send(chat=ev["chat"], media=media)
        await until("/save 3 keeps this file")
        proc.stdin.write(f"/save 3 {tmp_path}\n".encode())
        await proc.stdin.drain()
        await until("saved")
        assert (tmp_path / "note.txt").read_bytes() == b"thirteen byte"
        proc.stdin.write(f"/save {tmp_path}\n".encode())  # the same file again: never overwritten
        await proc.stdin.drain()
        await until("already exists")
        proc.stdin.write(b"/quit\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
