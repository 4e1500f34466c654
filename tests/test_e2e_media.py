"""Media end to end on the embedded default: signed local URLs served by Pigeon itself."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import httpx
import pytest

from clients.sdk import PigeonClientError
from tests.conftest import NewUser


async def test_upload_send_and_download_by_members_only(new_user: NewUser, connect: Any) -> None:
    a, b, c = await new_user(), await new_user(), await new_user()
    da, db, dc = await connect(a), await connect(b), await connect(c)
    data = os.urandom(50_000)
    media = await da.upload(data, "image/jpeg", name="cat.jpg")
    assert media["key"] == hashlib.sha256(data).hexdigest()
    sent = await da.send("look", to=b.user_id, media=media)
    async with asyncio.timeout(5):
        while (ev := await db.next_event())["type"] != "msg":
            pass
    assert ev["kind"] == "media" and ev["media"] == media
    assert await db.download(media["key"], sent["chat"]) == data
    with pytest.raises(PigeonClientError) as info:
        await dc.download(media["key"], sent["chat"])
    assert info.value.code == "forbidden"
    other = (await dc.send("hi", to=b.user_id))["chat"]
    with pytest.raises(PigeonClientError) as info:
        await db.download(media["key"], other)  # b is a member, but no message there carries it
    assert info.value.code == "not_found"
    # identical content is stored once: the second upload is not needed
    again = await dc.request({"type": "media_upload", "sha256": media["key"], "size": len(data), "mime": "image/jpeg"})
    assert again["exists"] is True and "upload" not in again


async def raw_upload(up: dict[str, Any], body: bytes, *, forge: bool = False) -> int:
    """Upload with the ticket as a device would (PUT or POST form); ``forge`` spoils the signature."""
    async with httpx.AsyncClient() as http:
        if up["method"] == "PUT":
            url = up["url"].replace("sig=", "sig=0") if forge else up["url"]
            return (await http.put(url, content=body, headers=up.get("headers") or {})).status_code
        fields = dict(up["fields"])
        if forge:
            fields["x-amz-signature"] = "0" * len(fields["x-amz-signature"])
        return (await http.post(up["url"], data=fields, files={"file": ("f", body)})).status_code


async def test_storage_refuses_more_than_declared_and_bad_content_never_becomes_ready(
    new_user: NewUser, connect: Any
) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    reply = await da.request({"type": "media_upload", "sha256": sha, "size": 1000, "mime": "application/pdf"})
    up = reply["upload"]
    assert up["method"] in ("PUT", "POST") and up["expires"] > 0
    # the storage server itself refuses a body over the declared size, and a forged signature
    assert await raw_upload(up, data + b"extra") in (400, 413)
    assert await raw_upload(up, data, forge=True) == 403
    # right size, wrong bytes: stored, but never becomes ready
    assert await raw_upload(up, os.urandom(1000)) in (200, 204)
    with pytest.raises(PigeonClientError) as info:
        await da.request({"type": "media_done", "key": reply["key"]})
    assert info.value.code == "bad_request"
    media = {"key": reply["key"], "mime": "application/pdf", "size": 1000, "sha256": sha}
    with pytest.raises(PigeonClientError) as info:
        await da.send("doc", to=b.user_id, media=media)
    assert info.value.code == "bad_request"
    # the real bytes make it ready
    assert await raw_upload(up, data) in (200, 204)
    assert (await da.request({"type": "media_done", "key": reply["key"]}))["type"] == "media_ready"
    assert (await da.send("doc", to=b.user_id, media=media))["type"] == "sent"


async def test_media_over_the_limit_and_over_http(new_user: NewUser, connect: Any) -> None:
    a, b = await new_user(), await new_user()
    da = await connect(a)
    with pytest.raises(PigeonClientError) as info:
        await da.request({"type": "media_upload", "sha256": "a" * 64, "size": 200 * 1024 * 1024, "mime": "video/mp4"})
    assert info.value.code == "too_large"
    data = b"tiny file " + os.urandom(8).hex().encode()
    sha = hashlib.sha256(data).hexdigest()
    api = da.api
    up = await api._call("POST", "/v1/media/uploads", json={"sha256": sha, "size": len(data), "mime": "text/plain"})  # noqa: SLF001
    await api.put_blob(up["upload"], data)
    assert (await api._call("POST", f"/v1/media/{sha}/done"))["ready"] is True  # noqa: SLF001
    media = {"key": sha, "mime": "text/plain", "size": len(data), "sha256": sha}
    sent = await da.send("note", to=b.user_id, media=media)
    got = await api._call("GET", f"/v1/media/{sha}", params={"chat": sent["chat"]})  # noqa: SLF001
    assert await api.get_blob(got["url"]) == data
    with pytest.raises(PigeonClientError) as info:
        await api._call("GET", f"/v1/media/{sha}")  # noqa: SLF001
    assert info.value.code == "bad_request"
