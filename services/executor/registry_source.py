"""Adapters resolved through the registry, kept in the executor's disk tier.

    resolve(id, version) -> ResolvedAdapter(id, version, path)   # path holds the two PEFT files

A specific version is immutable: once on disk it is served from disk without asking the registry.
Version 0 (latest) asks the registry which version is newest; when the registry cannot be reached it
falls back to the newest version held locally (logged), and only an adapter held nowhere fails with
UNAVAILABLE. Every fetched file is checked against the manifest's sha256 and the manifest against the
adapter's digest before it becomes visible (temp dir, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import urllib.parse

import grpc
import structlog

from services.common import errors
from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.peft_format import ADAPTER_FILES, manifest_digest
from services.executor.adapters.cache import ResolvedAdapter

log = structlog.get_logger(__name__)

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class DiskAdapterStore:
    """The disk tier: root/<quoted id>/<version>/{adapter_config.json, adapter_model.safetensors, meta.json}.

    At most `capacity_bytes` (0 -> unbounded): putting a version evicts the least recently used
    others (use = meta.json's mtime, touched on every hit). It survives restarts.
    """

    def __init__(self, root: pathlib.Path, capacity_bytes: int = 0):
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".fetch-*"):   # fetches cut off by a crash
            shutil.rmtree(stale, ignore_errors=True)

    def _dir(self, adapter_id: str) -> pathlib.Path:
        return self.root / urllib.parse.quote(adapter_id, safe="")

    def path(self, adapter_id: str, version: int) -> pathlib.Path | None:
        p = self._dir(adapter_id) / str(version)
        try:
            os.utime(p / "meta.json")   # recently used: evicted last
        except FileNotFoundError:
            return None
        return p

    def versions(self, adapter_id: str) -> list[int]:
        d = self._dir(adapter_id)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "meta.json").exists())

    def remove(self, adapter_id: str) -> None:
        shutil.rmtree(self._dir(adapter_id), ignore_errors=True)

    def held(self) -> list[tuple[str, int]]:
        """(adapter_id, version) of every complete copy on disk."""
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                adapter_id = urllib.parse.unquote(d.name)
                out += [(adapter_id, v) for v in self.versions(adapter_id)]
        return out

    def put(self, adapter_id: str, version: int, digest: str, tmp: pathlib.Path) -> pathlib.Path:
        """Move a verified temp dir into place atomically; returns the final path."""
        (tmp / "meta.json").write_text(json.dumps({"adapter_id": adapter_id, "version": version,
                                                   "digest": digest}))
        final = self._dir(adapter_id) / str(version)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another thread won the race with the same immutable content
            shutil.rmtree(tmp, ignore_errors=True)
        if self.capacity_bytes:
            self._evict(keep=final)
        return final

    def _evict(self, keep: pathlib.Path) -> None:
        entries = []   # (last use, bytes, dir)
        for d in self.root.iterdir():
            if not d.is_dir() or d.name.startswith("."):
                continue
            for v in d.iterdir():
                try:
                    used = (v / "meta.json").stat().st_mtime
                except FileNotFoundError:
                    continue
                entries.append((used, sum(f.stat().st_size for f in v.iterdir()), v))
        total = sum(size for _, size, _ in entries)
        for used, size, v in sorted(entries, key=lambda e: e[0]):
            if total <= self.capacity_bytes:
                return
            if v == keep:
                continue
            log.info("disk_cache_evicted", path=str(v), bytes=size)
            shutil.rmtree(v, ignore_errors=True)
            total -= size
        if total > self.capacity_bytes:
            shutil.rmtree(keep, ignore_errors=True)
            raise errors.ResourceExhausted(
                f"adapter at {keep.name} needs more than the disk cache's {self.capacity_bytes} "
                "bytes; raise --disk-cache-bytes")

    def tempdir(self) -> pathlib.Path:
        return pathlib.Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))


class RegistryAdapterSource:
    """AdapterSource backed by a registry address and a DiskAdapterStore."""

    def __init__(self, address: str, store: DiskAdapterStore, timeout_s: float = 30.0):
        self.address = address
        self.store = store
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # adapters arrive as MiB chunks: read the socket in large pieces (gRPC starts at 8 KiB)
            ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
            ("grpc.experimental.tcp_max_read_chunk_size", 8 * 1024 * 1024)]) if address else None
        self._stub = registry_pb2_grpc.AdapterRegistryStub(self._channel) if self._channel else None

    def held(self) -> list[tuple[str, int]]:
        return self.store.held()

    def forget(self, adapter_id: str) -> None:
        self.store.remove(adapter_id)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        if version:
            local = self.store.path(adapter_id, version)
            if local is not None:
                return ResolvedAdapter(adapter_id, version, local)
        if self._stub is None:
            held = self.store.versions(adapter_id)
            if version == 0 and held:
                return ResolvedAdapter(adapter_id, held[-1], self.store.path(adapter_id, held[-1]))
            raise errors.AdapterNotFound(
                f"adapter {adapter_id!r} v{version or 'latest'} is not on this executor's disk and "
                "no --registry is configured")
        try:
            return self._fetch(adapter_id, version)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise errors.AdapterNotFound(exc.details()) from None
            if code in _UNREACHABLE:
                return self._fallback(adapter_id, version, exc)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise errors.InvalidArgument(exc.details()) from None
            raise errors.Unavailable(f"registry {self.address}: {code.name}: {exc.details()}") from None

    def _fallback(self, adapter_id: str, version: int, exc: grpc.RpcError) -> ResolvedAdapter:
        held = self.store.versions(adapter_id)
        if version == 0 and held:
            log.warning("registry_unreachable_serving_local", adapter_id=adapter_id,
                        version=held[-1], registry=self.address, error=exc.code().name)
            return ResolvedAdapter(adapter_id, held[-1], self.store.path(adapter_id, held[-1]))
        raise errors.Unavailable(
            f"adapter {adapter_id!r}: registry {self.address} unreachable ({exc.code().name}) "
            "and this executor holds no copy") from None

    def _fetch(self, adapter_id: str, version: int) -> ResolvedAdapter:
        if version == 0:
            meta = self._stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=adapter_id),
                                         timeout=self.timeout_s)
            local = self.store.path(adapter_id, meta.version)
            if local is not None:
                return ResolvedAdapter(adapter_id, meta.version, local)
            version = meta.version
        stream = self._stub.FetchAdapter(
            registry_pb2.FetchAdapterRequest(adapter_id=adapter_id, version=version),
            timeout=self.timeout_s)
        tmp = self.store.tempdir()
        try:
            meta = self._receive(stream, tmp)
            return ResolvedAdapter(adapter_id, meta.version,
                                   self.store.put(adapter_id, meta.version, meta.digest, tmp))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _receive(stream, tmp: pathlib.Path) -> registry_pb2.Adapter:
        meta = None
        hashes: dict[str, hashlib._Hash] = {}
        handles = {}
        try:
            for msg in stream:
                if msg.WhichOneof("item") == "adapter":
                    meta = msg.adapter
                    continue
                name = msg.chunk.file_name
                if meta is None or name not in ADAPTER_FILES:
                    raise errors.Unavailable(f"registry sent an unexpected chunk for {name!r}")
                if name not in handles:
                    handles[name] = open(tmp / name, "wb")
                    hashes[name] = hashlib.sha256()
                data = msg.chunk.data              # each access copies the bytes out: once
                handles[name].write(data)
                hashes[name].update(data)
        finally:
            for h in handles.values():
                h.close()
        if meta is None:
            raise errors.Unavailable("registry sent no adapter metadata")
        got = {name: h.hexdigest() for name, h in hashes.items()}
        want = {f.name: f.sha256 for f in meta.files}
        if got != want or manifest_digest(got) != meta.digest:
            raise errors.Unavailable(
                f"adapter {meta.adapter_id!r} v{meta.version}: fetched bytes do not match digest "
                f"{meta.digest}; refusing to load")
        return meta
