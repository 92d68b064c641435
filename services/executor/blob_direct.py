"""Direct blob reads: an executor that can reach the registry's blob store copies an adapter's files
from it itself, verified by digest, instead of streaming them through FetchAdapter.

The registry stores blobs content-addressed, so the registry's Adapter metadata (files with sha256,
digest) is all it takes to find them; no proto change:

    s3://BUCKET/PREFIX   ->  s3://BUCKET/PREFIX/sha256/ab/abcdef...   (the registry's --blob-url)
    file:///DIR or /DIR  ->  DIR/sha256/ab/abcdef...                  (its DATA_DIR/blobs, shared)

    reader = DirectBlobReader(config.blob_url)            # once per executor
    if reader.fetch(meta, tmp):                            # meta: registry_pb2.Adapter
        ...tmp/adapter_config.json, tmp/adapter_model.safetensors are whole and verified
    else:
        ...FetchAdapter as before (store unreachable, blob missing, bytes not matching)

`fetch` never raises for an unreachable store, a missing blob or a digest mismatch: it logs why,
removes what it wrote and returns False, so FetchAdapter stays the fallback. Every file is checked
against its sha256 and size, and the manifest against the adapter's digest, before True.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import shutil
import threading

import structlog

from services.common import s3
from services.common.peft_format import ADAPTER_FILES, manifest_digest

log = structlog.get_logger(__name__)

READ_BYTES = 8 * 1024 * 1024


class _Miss(Exception):
    """This store cannot give this adapter's bytes (absent, unreachable, corrupt)."""


class DirectBlobReader:
    def __init__(self, blob_url: str, addressing_style: str = "auto", concurrency: int = 8):
        self.blob_url = blob_url
        self._root: pathlib.Path | None = None
        self._bucket = self._prefix = ""
        if blob_url.startswith("s3://"):
            self._bucket, self._prefix = s3.parse_s3_url(blob_url)
        elif blob_url.startswith("file://") or blob_url.startswith("/"):
            self._root = pathlib.Path(blob_url.removeprefix("file://"))
        elif blob_url:
            raise ValueError(f"blob_url {blob_url!r}: expected s3://BUCKET[/PREFIX], file:///DIR or "
                             "empty (off)")
        self._addressing_style, self._concurrency = addressing_style, concurrency
        self._client = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.blob_url)

    def fetch(self, adapter, dest: pathlib.Path) -> bool:
        """Copy `adapter`'s files (registry_pb2.Adapter or alike: .files[name, size_bytes, sha256],
        .digest) into dest/NAME, verified. True when whole; False (dest cleaned) otherwise."""
        if not self.enabled:
            return False
        files = list(adapter.files)
        written: list[pathlib.Path] = []
        try:
            if sorted(f.name for f in files) != sorted(ADAPTER_FILES):
                raise _Miss(f"unexpected manifest {[f.name for f in files]}")
            if manifest_digest({f.name: f.sha256 for f in files}) != adapter.digest:
                raise _Miss(f"manifest does not match digest {adapter.digest}")
            for f in files:
                path = dest / f.name
                written.append(path)
                if self._root is not None:
                    self._copy_file(f.sha256, path)
                else:
                    self._copy_s3(f.sha256, path)
                got_size, got_sha = _hash_file(path)
                if (got_size, got_sha) != (f.size_bytes, f.sha256):
                    raise _Miss(f"{f.name}: {got_size} bytes sha256 {got_sha[:12]}..., expected "
                                f"{f.size_bytes} bytes sha256 {f.sha256[:12]}...")
            return True
        except Exception as exc:          # any failure -> FetchAdapter, never a failed load
            log.info("direct_blob_read_skipped", adapter_id=adapter.adapter_id,
                     version=adapter.version, blob_url=self.blob_url,
                     reason=f"{type(exc).__name__}: {exc}")
            for p in written:
                p.unlink(missing_ok=True)
            return False

    # --- shared filesystem ------------------------------------------------------------------------

    def _copy_file(self, sha256: str, dest: pathlib.Path) -> None:
        src = self._root / s3.blob_key("", sha256)
        if not src.is_file():
            raise _Miss(f"no blob {src}")
        try:
            os.link(src, dest)            # blobs are immutable: share the inode, no copy
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(src, dest)

    # --- S3 ---------------------------------------------------------------------------------------

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = s3.client(self._addressing_style, connect_timeout=2.0,
                                         read_timeout=30.0, max_attempts=2,
                                         max_pool=max(10, self._concurrency * 2))
            return self._client

    def _copy_s3(self, sha256: str, dest: pathlib.Path) -> None:
        from boto3.s3.transfer import TransferConfig
        config = TransferConfig(multipart_threshold=READ_BYTES, multipart_chunksize=READ_BYTES,
                                max_concurrency=self._concurrency, use_threads=True)
        self.client.download_file(self._bucket, s3.blob_key(self._prefix, sha256), str(dest),
                                  Config=config)


def _hash_file(path: pathlib.Path) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            h.update(view[:got])
            n += got
    return n, h.hexdigest()


def fetch_direct(adapter, dest: pathlib.Path, blob_url: str) -> bool:
    """One-shot form of DirectBlobReader(blob_url).fetch(adapter, dest); False when blob_url is
    empty. Prefer one DirectBlobReader per executor (it keeps its S3 connections)."""
    return bool(blob_url) and DirectBlobReader(blob_url).fetch(adapter, dest)
