"""Content-addressed blobs on a filesystem: ROOT/sha256/ab/abcdef...; temp files under ROOT/tmp.

Writes are atomic and durable: stream to a temp file (same filesystem), fsync, rename onto the
content address, fsync the directory. Identical bytes are stored once.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

_HEX = re.compile(r"[0-9a-f]{64}")


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsBlobWriter:
    def __init__(self, store: FsBlobStore):
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._tmp = pathlib.Path(name)
        self._hash = hashlib.sha256()
        self._sha: str | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def finish(self) -> str:
        if self._sha is None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._sha = self._hash.hexdigest()
        return self._sha

    def commit(self) -> str:
        sha = self.finish()
        dest = self._store.path(sha)
        if dest.exists():
            self._tmp.unlink(missing_ok=True)
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, dest)
        _fsync_dir(dest.parent)
        return sha

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class FsBlobReader:
    def __init__(self, path: pathlib.Path):
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FsBlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(exist_ok=True)

    def clear_temp(self) -> int:
        """Remove leftovers of writes that never committed (call at startup only)."""
        n = 0
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def path(self, sha256: str) -> pathlib.Path:
        if not _HEX.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def writer(self) -> FsBlobWriter:
        return FsBlobWriter(self)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def open(self, sha256: str) -> FsBlobReader:
        return FsBlobReader(self.path(sha256))

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list(self) -> Iterator[str]:
        for sub in (self.root / "sha256").iterdir():
            for p in sub.iterdir():
                if _HEX.fullmatch(p.name):
                    yield p.name
