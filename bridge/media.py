"""Media in three steps: ask for an upload URL, upload straight to storage, confirm.

Keys are the content's SHA-256, so identical content is stored once. A key becomes usable in
a message only after :meth:`Media.done` has read back the stored object and found the declared
size and hash. Download URLs go only to members of a chat where a message carries the key.
"""

from __future__ import annotations

import logging

from storage.base import MediaObject, StorageUnavailable, Store
from storage.media import MediaStore

from .clock import Clock
from .errors import BadRequest, Conflict, Forbidden, NotFound, TooLarge, Unavailable
from .handling import Caller, storage_errors
from .protocol import MediaReady, MediaUploadReply, MediaUrlReply, UploadTicket

log = logging.getLogger(__name__)


class Media:
    def __init__(self, store: Store, blobs: MediaStore, clock: Clock, *, max_bytes: int, url_ttl_s: int) -> None:
        self._store = store
        self._blobs = blobs
        self._clock = clock
        self.max_bytes = max_bytes
        self._ttl = url_ttl_s * 1000

    async def upload(self, caller: Caller, rid: str, sha256: str, size: int, mime: str) -> MediaUploadReply:
        if size > self.max_bytes:
            raise TooLarge(f"media may be at most {self.max_bytes} bytes")
        key = sha256
        now = self._clock.now_ms()
        async with storage_errors():
            obj = await self._store.put_media(
                MediaObject(key=key, sha256=sha256, size=size, mime=mime, owner=caller.user_id,
                            state="pending", created_at=now)
            )
        if obj.size != size:
            raise Conflict("this content was declared before with another size")
        if obj.state == "ready":
            return MediaUploadReply(id=rid, key=key, exists=True)
        try:
            ticket = await self._blobs.presign_upload(key, size, mime, now + self._ttl)
        except StorageUnavailable as exc:
            raise Unavailable("media storage is unavailable; retry later") from exc
        upload = UploadTicket(method=ticket.method, url=ticket.url, expires=ticket.expires,
                              fields=tuple(ticket.fields.items()) if ticket.fields else None,
                              headers=tuple(ticket.headers.items()) if ticket.headers else None)
        return MediaUploadReply(id=rid, key=key, exists=False, upload=upload)

    async def done(self, caller: Caller, rid: str, key: str) -> MediaReady:
        async with storage_errors():
            obj = await self._store.get_media(key)
        if obj is None:
            raise NotFound("no upload was started for that key")
        if obj.state != "ready":
            try:
                stored = await self._blobs.inspect(key)
            except StorageUnavailable as exc:
                raise Unavailable("media storage is unavailable; retry later") from exc
            if stored is None:
                raise BadRequest("nothing has been uploaded under that key")
            if stored.size != obj.size or stored.sha256 != obj.sha256:
                await self._blobs.delete(key)
                raise BadRequest("the uploaded object does not match the declared size and sha256")
            async with storage_errors():
                await self._store.mark_media_ready(key)
            log.debug("media %s ready", key)
        return MediaReady(id=rid, key=key)

    async def sweep(self, older_than_s: int, limit: int = 500) -> int:
        """Delete uploads never confirmed with ``media_done`` within ``older_than_s``; return how many."""
        before = self._clock.now_ms() - older_than_s * 1000
        swept = 0
        for obj in await self._store.stale_uploads(before, limit):
            await self._blobs.delete(obj.key)
            if await self._store.drop_media(obj.key):
                swept += 1
        if swept:
            log.info("removed %d uploads that were never confirmed", swept)
        return swept

    async def mime(self, key: str) -> str:
        async with storage_errors():
            obj = await self._store.get_media(key)
        return obj.mime if obj else "application/octet-stream"

    async def url(self, caller: Caller, rid: str, key: str, chat_id: str) -> MediaUrlReply:
        async with storage_errors():
            chat = await self._store.get_chat(chat_id, current_seq=False)
            if chat is None:
                raise NotFound(f"chat {chat_id} does not exist")
            if chat.member(caller.user_id) is None:
                raise Forbidden("you are not a member of this chat")
            if not await self._store.message_carries_media(chat_id, key):
                raise NotFound("no message in this chat carries that key")
        expires = self._clock.now_ms() + self._ttl
        try:
            url = await self._blobs.presign_download(key, expires)
        except StorageUnavailable as exc:
            raise Unavailable("media storage is unavailable; retry later") from exc
        return MediaUrlReply(id=rid, key=key, url=url, expires=expires)
