"""Storage interfaces of the registry: metadata (SQLite or PostgreSQL) and blobs (files or S3).
The core speaks only these Protocols; records are plain dataclasses.

Blob publishing vs. blob collection is guarded by `MetadataStore.blob_lock`: publishers (blob
commit + create_version) hold it shared, collectors (delete's GC, start-up recovery) exclusive,
so a blob is never deleted between its publication and the metadata that references it. With
PostgreSQL the lock is a database advisory lock, so it holds across replicated registries.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    size: int
    sha256: str                                    # bare hex


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One version of an adapter, as stored."""

    adapter_id: str
    version: int
    digest: str                                    # "sha256:<hex of manifest>"
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    size_bytes: int
    source: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0                        # unix seconds
    files: tuple[FileEntry, ...] = ()
    public: bool = False                           # every tenant may read and run it (per id)


@dataclass(frozen=True, slots=True)
class StoreStats:
    adapters: int                                  # distinct ids with at least one version
    versions: int
    blob_bytes: int                                # bytes of distinct blobs referenced


CREATED, DELETED = "created", "deleted"


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change feed, in commit order (seq increases)."""

    seq: int
    kind: str                                      # CREATED | DELETED
    adapter_id: str
    version: int                                   # 0 with DELETED: every version
    latest_version: int                            # the id's latest version after it (0: none)


class MetadataStore(Protocol):
    def create_version(self, record: AdapterRecord) -> tuple[AdapterRecord, bool]:
        """Atomically: if the id's latest version has record.digest, return (it, False); else store
        record as version last+1 (record.version is ignored) and return (stored, True)."""

    def get(self, adapter_id: str, version: int = 0) -> AdapterRecord | None:
        """One version; 0 -> latest. None when absent."""

    def list_latest(self, limit: int, after_id: str = "", base_model: str = "",
                    labels: dict[str, str] | None = None) -> list[AdapterRecord]:
        """Latest version of each id > after_id, ordered by id, filtered, at most `limit`."""

    def delete(self, adapter_id: str, version: int = 0) -> list[AdapterRecord]:
        """Delete one version (0 -> all); returns what was deleted (empty when nothing matched).
        An id left with no version becomes private again."""

    def set_public(self, adapter_id: str, public: bool) -> bool:
        """Mark every version of the id public or private; False when the id has no version."""

    def unreferenced(self, sha256s: set[str]) -> set[str]:
        """The subset of sha256s no stored version references."""

    def referenced(self) -> set[str]:
        """Every blob sha256 some version references."""

    def stats(self) -> StoreStats: ...

    def blob_lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """Shared: publishing blobs + create_version. Exclusive: deleting blobs (see module doc)."""

    def last_change(self) -> int:
        """The newest change's seq (0 when none)."""

    def changes_after(self, seq: int, limit: int = 1000) -> list[Change]:
        """Changes with seq > `seq`, oldest first, at most `limit`."""

    def prune_changes(self, before: float) -> int:
        """Drop changes made before unix time `before` (always keeping the newest); returns how many."""

    def close(self) -> None: ...


class BlobWriter(Protocol):
    size: int

    def write(self, data: bytes) -> None: ...

    def finish(self) -> str:
        """Make the bytes durable (still invisible); returns their sha256 hex."""

    def commit(self) -> str:
        """Publish under the sha256 (atomic; a no-op if that blob exists); returns the sha256."""

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def writer(self) -> BlobWriter: ...

    def exists(self, sha256: str) -> bool: ...

    def open(self, sha256: str) -> BlobReader:
        """Raises FileNotFoundError when absent."""

    def delete(self, sha256: str) -> None: ...

    def list(self) -> Iterator[str]: ...


class BlobReader(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class SharedLock:
    """A readers-writer lock for one process: many shared holders or one exclusive holder."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.contextmanager
    def hold(self, exclusive: bool):
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()
