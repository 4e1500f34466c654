"""Media on MinIO or any S3-compatible store (minio SDK).

Uploads use a presigned POST policy: the storage server itself refuses a body outside
``content-length-range`` 1…declared size, a different key, or a different Content-Type, and
the form stops working when the policy expires. Downloads are presigned GETs. The SDK is
blocking, so every call runs in a worker thread; any failure to reach the server becomes
:class:`storage.base.StorageUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from .base import StorageError, StorageUnavailable
from .media import StoredObject, UploadTicket

_CHUNK = 1 << 16


class S3MediaStore:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *,
                 secure: bool = False, region: str = "us-east-1", public_endpoint: str | None = None,
                 public_secure: bool | None = None) -> None:
        try:
            from minio import Minio
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("S3 media needs the minio package: pip install 'pigeon[s3]'") from exc
        import urllib3

        self.bucket = bucket
        # devices may reach the store under another name than the bridge does (a proxy, a CDN,
        # a compose network): URLs are signed for that name
        pub_secure = secure if public_secure is None else public_secure
        self._base = f"{'https' if pub_secure else 'http'}://{public_endpoint or endpoint}"
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=5),
                                   retries=urllib3.Retry(total=0))
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                             region=region, http_client=http)
        self._signer = self._client if not public_endpoint else Minio(
            public_endpoint, access_key=access_key, secret_key=secret_key, secure=pub_secure, region=region)

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        from minio.error import S3Error

        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise
            raise StorageUnavailable(f"s3: {exc.code}: {exc.message}") from exc
        except StorageError:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"s3: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        if not await self._call(self._client.bucket_exists, self.bucket):
            try:
                await self._call(self._client.make_bucket, self.bucket)
            except StorageUnavailable as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc):
                    raise

    async def close(self) -> None:
        return None

    async def _reachable(self) -> None:
        """Presigning is local arithmetic; ask the server once so an outage is reported now,
        not as a failed upload on the device later."""
        if not await self._call(self._client.bucket_exists, self.bucket):
            raise StorageUnavailable(f"s3: bucket {self.bucket} is missing")

    async def presign_upload(self, key: str, size: int, mime: str, expires: int) -> UploadTicket:
        from minio.datatypes import PostPolicy

        await self._reachable()
        policy = PostPolicy(self.bucket, datetime.fromtimestamp(expires / 1000, tz=UTC))
        policy.add_equals_condition("key", key)
        policy.add_equals_condition("Content-Type", mime)
        policy.add_content_length_range_condition(1, size)
        form: dict[str, str] = await self._call(self._signer.presigned_post_policy, policy)
        return UploadTicket(method="POST", url=f"{self._base}/{self.bucket}", expires=expires,
                            fields={**form, "key": key, "Content-Type": mime})

    async def presign_download(self, key: str, expires: int) -> str:
        await self._reachable()
        ttl = max(1, int(expires / 1000 - datetime.now(tz=UTC).timestamp()))
        url: str = await self._call(self._signer.presigned_get_object, self.bucket, key,
                                    expires=timedelta(seconds=ttl))
        return url

    async def inspect(self, key: str) -> StoredObject | None:
        from minio.error import S3Error

        def digest() -> StoredObject | None:
            try:
                resp = self._client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    return None
                raise
            try:
                h, size = hashlib.sha256(), 0
                for chunk in resp.stream(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                return StoredObject(size=size, sha256=h.hexdigest())
            finally:
                resp.close()
                resp.release_conn()

        result: StoredObject | None = await self._call(digest)
        return result

    async def delete(self, key: str) -> None:
        await self._call(self._client.remove_object, self.bucket, key)
