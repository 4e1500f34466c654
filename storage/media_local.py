"""Media on local disk, served by Pigeon's own HTTP server behind HMAC-signed, expiring URLs.

URL form: ``{base}/v1/blobs/{key}?op=put|get&exp=MS&max=BYTES&sig=HEX`` where ``sig`` is
HMAC-SHA256 of ``op|key|exp|max`` under a secret only the server knows. The HTTP edge calls
:meth:`LocalMediaStore.check_signature` and then :meth:`write` or :meth:`path_for`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

from .media import StoredObject, UploadTicket

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 16


class SignatureError(Exception):
    """A blob URL whose signature is wrong, whose operation differs, or which has expired."""


class UploadTooLarge(Exception):
    """The body exceeds the size the URL was signed for."""


class LocalMediaStore:
    def __init__(self, root: Path, secret: bytes, base_url: str) -> None:
        self._root = root
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    async def open(self) -> None:
        (self._root / "objects").mkdir(parents=True, exist_ok=True)
        (self._root / "incoming").mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    def _sign(self, op: str, key: str, exp: int, limit: int) -> str:
        msg = f"{op}|{key}|{exp}|{limit}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def _url(self, op: str, key: str, exp: int, limit: int) -> str:
        q = urlencode({"op": op, "exp": exp, "max": limit, "sig": self._sign(op, key, exp, limit)})
        return f"{self.base_url}/v1/blobs/{key}?{q}"

    def check_signature(self, op: str, key: str, exp: int, limit: int, sig: str, now: int) -> None:
        if not KEY_RE.match(key):
            raise SignatureError("malformed key")
        if not hmac.compare_digest(self._sign(op, key, exp, limit), sig):
            raise SignatureError("bad signature")
        if now > exp:
            raise SignatureError("URL expired")

    async def presign_upload(self, key: str, size: int, mime: str, expires: int) -> UploadTicket:
        return UploadTicket(
            method="PUT", url=self._url("put", key, expires, size), expires=expires,
            headers={"Content-Type": mime},
        )

    async def presign_download(self, key: str, expires: int) -> str:
        return self._url("get", key, expires, 0)

    def path_for(self, key: str) -> Path:
        return self._root / "objects" / key[:2] / key

    async def write(self, key: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Store the body under ``key``; refuse (and keep nothing) past ``limit`` bytes."""
        tmp = self._root / "incoming" / f"{key}.{secrets.token_hex(4)}"
        total = 0
        fh = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for chunk in chunks:
                total += len(chunk)
                if total > limit:
                    raise UploadTooLarge(f"body exceeds {limit} bytes")
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(fh.flush)
            await asyncio.to_thread(os.fsync, fh.fileno())
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        fh.close()
        dest = self.path_for(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return total

    async def inspect(self, key: str) -> StoredObject | None:
        path = self.path_for(key)

        def digest() -> StoredObject | None:
            if not path.exists():
                return None
            h = hashlib.sha256()
            size = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            return StoredObject(size=size, sha256=h.hexdigest())

        return await asyncio.to_thread(digest)

    async def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)
