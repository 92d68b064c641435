"""Content-addressed blobs on a filesystem: ROOT/sha256/ab/abcdef...; temp files under ROOT/tmp.

Writes are atomic and durable: stream to a temp file (same filesystem), fsync, rename onto the
content address, fsync the directory. Identical bytes are stored once.
"""

from __future__ import annotations

import errno
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


_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class FsBlobReader:
    def __init__(self, path: pathlib.Path):
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def read_cached(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset` with what the page cache holds, never waiting on the disk.

        Returns how many bytes it read: may be short, 0 when nothing there is cached or the
        filesystem cannot tell (then use `read_into`, off the event loop)."""
        if _NOWAIT is None:
            return 0
        try:
            return os.preadv(self._fd, [buf], offset, _NOWAIT)
        except OSError as exc:              # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here
            if exc.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise
            return 0

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset` (may block on the disk); returns bytes read, short only at EOF."""
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

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
