"""Content-addressed blobs in S3-compatible object storage: s3://BUCKET/PREFIX/sha256/ab/abcdef...

A writer spools to a local temp file (fsynced, hashed), so the key is known before anything is
sent; commit uploads it under its sha256 (one PUT, or a multipart upload above `part_bytes`), each
request carrying Content-MD5 so the store verifies every byte it receives, and then checks the
object's size and recorded sha256. An object becomes visible only when its PUT or
CompleteMultipartUpload succeeds: a crash mid-upload leaves at most an incomplete multipart
upload (invisible; aborted by `clear_temp` at start-up). Identical bytes are stored once.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
from collections.abc import Iterator

from services.common import s3
from services.common.errors import Unavailable
from services.registry.stores.blobs_fs import FsBlobWriter

MIN_PART_BYTES = 5 * 1024 * 1024          # S3's smallest part (every part but the last)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class S3BlobWriter(FsBlobWriter):
    """Spools like the files store's writer; commit uploads instead of renaming."""

    def finish(self) -> str:
        if self._sha is None:               # no fsync: the spool is scratch, S3 holds the copy
            self._file.close()
            self._sha = self._hash.hexdigest()
        return self._sha

    def commit(self) -> str:
        sha = self.finish()
        store = self._store
        try:
            if not store.exists(sha):
                store.upload(self._tmp, sha, self.size)
        finally:
            self._tmp.unlink(missing_ok=True)
        return sha


class S3BlobReader:
    """Reads one object; sequential reads share one streaming GET, a jump opens a ranged one."""

    def __init__(self, store: S3BlobStore, sha256: str):
        self._store, self._key = store, store.key(sha256)
        try:
            self.size = store.client.head_object(Bucket=store.bucket, Key=self._key)["ContentLength"]
        except Exception as exc:
            if s3.is_missing(exc):
                raise FileNotFoundError(self._key) from None
            raise store.unavailable("read", exc) from None
        self._body, self._pos = None, 0

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        if self._body is None or offset != self._pos:
            self.close()
            try:
                self._body = self._store.client.get_object(
                    Bucket=self._store.bucket, Key=self._key, Range=f"bytes={offset}-")["Body"]
            except Exception as exc:
                raise self._store.unavailable("read", exc) from None
            self._pos = offset
        out = bytearray()
        while len(out) < length:
            piece = self._body.read(length - len(out))
            if not piece:
                break
            out += piece
        self._pos += len(out)
        return bytes(out)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


class S3BlobStore:
    def __init__(self, url: str, spool_dir: str | os.PathLike, part_bytes: int = 64 * 1024 * 1024,
                 addressing_style: str = "auto"):
        self.url = url
        self.bucket, self.prefix = s3.parse_s3_url(url)
        self.part_bytes = max(part_bytes, MIN_PART_BYTES)
        self.client = s3.client(addressing_style)
        self.tmp_dir = pathlib.Path(spool_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self.unavailable("open", exc) from None

    def unavailable(self, what: str, exc: BaseException) -> Unavailable:
        return Unavailable(f"blob store {self.url}: cannot {what} ({type(exc).__name__}: {exc}); "
                           "check the bucket, AWS_ENDPOINT_URL and the AWS credentials")

    def key(self, sha256: str) -> str:
        return s3.blob_key(self.prefix, sha256)

    def writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except Exception as exc:
            if s3.is_missing(exc):
                return False
            raise self.unavailable("check a blob", exc) from None

    def upload(self, path: pathlib.Path, sha256: str, size: int) -> None:
        """Upload `path` (sha256, size already known) to its key and verify what landed."""
        key, meta = self.key(sha256), {"sha256": sha256}
        try:
            with open(path, "rb") as f:
                if size <= self.part_bytes:
                    data = f.read()
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                           ContentMD5=_md5(data), Metadata=meta)
                else:
                    self._multipart(f, key, meta)
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self.unavailable("upload a blob", exc) from None
        if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            self.client.delete_object(Bucket=self.bucket, Key=key)
            raise Unavailable(f"blob store {self.url}: {key} holds {head['ContentLength']} bytes "
                              f"after upload, expected {size}; removed, retry the request")

    def _multipart(self, f, key: str, meta: dict) -> None:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                        Metadata=meta)["UploadId"]
        try:
            parts = []
            while data := f.read(self.part_bytes):
                n = len(parts) + 1
                etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=n, Body=data, ContentMD5=_md5(data))["ETag"]
                parts.append({"PartNumber": n, "ETag": etag})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def open(self, sha256: str) -> S3BlobReader:
        return S3BlobReader(self, sha256)

    def delete(self, sha256: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        except Exception as exc:
            raise self.unavailable("delete a blob", exc) from None

    def list(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=s3.join_key(self.prefix, "sha256") + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"].rsplit("/", 1)[-1]

    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of multipart uploads under this store's prefix never completed."""
        out, kwargs = [], {"Bucket": self.bucket, "Prefix": s3.join_key(self.prefix, "sha256") + "/"}
        while True:
            page = self.client.list_multipart_uploads(**kwargs)
            out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def clear_temp(self) -> int:
        """Drop local spool files and abort incomplete multipart uploads (start-up, under the
        exclusive blob lock: no publisher is mid-upload then)."""
        n = 0
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        for key, upload_id in self.incomplete_uploads():
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            n += 1
        return n
