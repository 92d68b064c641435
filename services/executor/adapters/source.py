"""Where adapters come from, with no torch: ResolvedAdapter, the AdapterSource protocol, LocalDirSource.

The registry-backed source (registry_source.py) and the tiers above it import this, not the device
cache, so a process that only fetches adapters (or a test of the disk tier) never loads torch.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Protocol

__all__ = ["AdapterSource", "LocalDirSource", "ResolvedAdapter", "UnusableCopy"]


class UnusableCopy(Exception):
    """A disk copy the reader cannot use (an image-only copy whose image is damaged or laid out for
    another arena): the source drops it and fetches the adapter again."""


@dataclass(frozen=True)
class ResolvedAdapter:
    adapter_id: str
    version: int
    path: pathlib.Path   # a directory holding adapter_config.json + adapter_model.safetensors


class AdapterSource(Protocol):
    def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        """Blocking; raises AdapterNotFound / Unavailable / InvalidAdapter."""
        ...

    def held(self) -> list[tuple[str, int]]:
        """(adapter_id, version) of every adapter this source keeps locally (the disk tier)."""
        ...

    def forget(self, adapter_id: str, version: int = 0) -> None:
        """Drop the local copies of adapter_id's `version` (0: every version)."""
        ...


class LocalDirSource:
    """adapter_id -> root/adapter_id, always version 1 (tests, local runs).

    Like a registry version, version 1 is taken to be immutable: a slot and the engine's prefix cache
    (keyed by adapter@version) keep what they loaded. Changing the files under a loaded id needs a
    restart; the registry instead makes every change a new version.
    """

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)

    def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        from services.common.errors import AdapterNotFound
        path = self.root / adapter_id
        if ".." in pathlib.PurePath(adapter_id).parts or not path.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r} not found under {self.root}")
        if version not in (0, 1):
            raise AdapterNotFound(f"adapter {adapter_id!r} has no version {version} (only 1)")
        return ResolvedAdapter(adapter_id, 1, path)

    def held(self) -> list[tuple[str, int]]:
        return []   # the directory is the source itself, not a cache

    def forget(self, adapter_id: str, version: int = 0) -> None:
        pass

    def latest(self, adapter_id: str) -> int:
        return self.resolve(adapter_id, 0).version

    def read(self, adapter_id: str, version: int, reader):
        """(version, reader(path), "disk"): the directory is read in place."""
        resolved = self.resolve(adapter_id, version)
        return resolved.version, reader(resolved.path), "disk"

    def stats(self) -> dict[str, int]:
        return {}
