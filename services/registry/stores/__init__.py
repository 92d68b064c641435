"""Storage interfaces of the registry: metadata (SQLite now, PostgreSQL later) and blobs (files now,
S3 later). The core speaks only these Protocols; records are plain dataclasses."""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(frozen=True, slots=True)
class StoreStats:
    adapters: int                                  # distinct ids with at least one version
    versions: int
    blob_bytes: int                                # bytes of distinct blobs referenced


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
        """Delete one version (0 -> all); returns what was deleted (empty when nothing matched)."""

    def unreferenced(self, sha256s: set[str]) -> set[str]:
        """The subset of sha256s no stored version references."""

    def referenced(self) -> set[str]:
        """Every blob sha256 some version references."""

    def stats(self) -> StoreStats: ...

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

    def open(self, sha256: str) -> "BlobReader":
        """Raises FileNotFoundError when absent."""

    def delete(self, sha256: str) -> None: ...

    def list(self) -> Iterator[str]: ...


class BlobReader(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...
