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
import re
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog

from services.common import errors
from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.peft_format import ADAPTER_FILES, manifest_digest
from services.common.tls import ClientSecurity, channel
from services.executor.adapters.policy import make_policy
from services.executor.adapters.source import ResolvedAdapter, UnusableCopy

log = structlog.get_logger(__name__)

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _DiskEntry:
    path: pathlib.Path
    size: int
    digest: str
    readers: int = 0
    doomed: bool = False       # evicted or removed while read: deleted when its last reader ends
    verified: bool = False     # its bytes were checked against its digest since this process started
    image_only: bool = False   # written back by the host tier: the arena's packed image, no PEFT files


class DiskAdapterStore:
    """The disk tier: root/<quoted id>/<version>/{adapter_config.json, adapter_model.safetensors, meta.json}
    and the arena's packed image beside them once read; or, for a copy the host tier wrote back as it
    evicted the adapter (put_image), meta.json and the packed image only.

    Keyed by adapter@version (immutable, so by digest), at most `capacity_bytes` (0 -> unbounded),
    surviving restarts. An in-memory index (built by one walk at start) answers every lookup: no
    directory walk on a request or status path. Readers pin an entry (acquire/release) and eviction
    never deletes a pinned one (it is deleted when its last reader ends), so any number of concurrent
    loads and evictions is safe. A copy is checked against its digest the first time it is read; a
    corrupt one is deleted and reported missing, so the caller fetches it again.
    """

    def __init__(self, root: pathlib.Path, capacity_bytes: int = 0, policy: str = "lru"):
        self.root = pathlib.Path(root)
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: dict[tuple[str, int], _DiskEntry] = {}
        self._policy = make_policy(policy)
        # (adapter_id, version) -> True while a faster tier (the host arena) holds it: such a copy is
        # evicted first, so the two tiers hold mostly different adapters (about exclusive caching)
        self.covered: Callable[[tuple[str, int]], bool] = lambda key: False
        self.hits = self.misses = self.loads = self.evictions = 0
        self.write_backs = 0
        self._bytes = 0
        self._removals: dict[str, int] = {}     # adapter_id -> times remove() dropped it (generation)
        for stale in self.root.glob(".fetch-*"):   # fetches cut off by a crash
            shutil.rmtree(stale, ignore_errors=True)
        self._scan()

    def _scan(self) -> None:
        found = []
        for d in self.root.iterdir():
            if not d.is_dir() or d.name.startswith("."):
                continue
            adapter_id = urllib.parse.unquote(d.name)
            for v in d.iterdir():
                meta = v / "meta.json"
                if not (v.name.isdigit() and meta.is_file()):
                    continue
                try:
                    info = json.loads(meta.read_text())
                    digest, image_only = info.get("digest", ""), bool(info.get("image_only", False))
                    size = sum(f.stat().st_size for f in v.iterdir())
                    used = meta.stat().st_mtime
                except (OSError, ValueError, AttributeError):
                    shutil.rmtree(v, ignore_errors=True)
                    continue
                # an image-only copy has no files to check: its image's checksum is checked on read
                found.append((used, (adapter_id, int(v.name)),
                              _DiskEntry(v, size, digest, verified=image_only, image_only=image_only)))
        for _, key, entry in sorted(found, key=lambda f: f[0]):   # oldest first: LRU order kept
            self._index[key] = entry
            self._bytes += entry.size
            self._policy.touch(key, entry.size, 1.0)

    def _dir(self, adapter_id: str) -> pathlib.Path:
        return self.root / urllib.parse.quote(adapter_id, safe="")

    # -- lookups (in memory) ---------------------------------------------------------------------
    def path(self, adapter_id: str, version: int) -> pathlib.Path | None:
        """The copy's directory (a use: evicted last), or None; not pinned (see acquire)."""
        with self._lock:
            e = self._index.get((adapter_id, version))
            if e is None or e.doomed:
                return None
            self._policy.touch((adapter_id, version), e.size, 1.0)
            return e.path

    def holds(self, adapter_id: str, version: int) -> bool:
        e = self._index.get((adapter_id, version))
        return e is not None and not e.doomed

    def versions(self, adapter_id: str) -> list[int]:
        with self._lock:
            return sorted(v for (a, v), e in self._index.items() if a == adapter_id and not e.doomed)

    def held(self) -> list[tuple[str, int]]:
        """(adapter_id, version) of every complete copy on disk."""
        with self._lock:
            return sorted(k for k, e in self._index.items() if not e.doomed)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(adapters=sum(not e.doomed for e in self._index.values()), bytes_used=self._bytes,
                        bytes_capacity=self.capacity_bytes, hits=self.hits, misses=self.misses,
                        loads=self.loads, evictions=self.evictions)

    def image_only(self, adapter_id: str, version: int) -> bool:
        e = self._index.get((adapter_id, version))
        return e is not None and e.image_only

    # -- readers ---------------------------------------------------------------------------------
    def acquire(self, adapter_id: str, version: int) -> pathlib.Path | None:
        """Pin and return a verified copy, or None (missing, or corrupt and now deleted)."""
        key = (adapter_id, version)
        with self._lock:
            e = self._index.get(key)
            if e is None or e.doomed:
                self.misses += 1
                return None
            e.readers += 1
            self._policy.touch(key, e.size, 1.0)
        if not e.verified:
            if not _verify(e.path, e.digest):
                log.warning("disk_cache_corrupt_discarded", adapter_id=adapter_id, version=version,
                            path=str(e.path))
                with self._lock:
                    self.misses += 1
                    e.readers -= 1
                    self._drop(key, e)
                return None
            e.verified = True
        with self._lock:
            self.hits += 1
        return e.path

    def release(self, adapter_id: str, version: int) -> None:
        key = (adapter_id, version)
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return
            e.readers -= 1
            if e.readers == 0 and e.doomed:
                self._delete(key, e)

    def resize(self, adapter_id: str, version: int) -> None:
        """Count files added beside a copy since it was put (the arena's packed image), and evict
        down to the budget again."""
        with self._lock:
            e = self._index.get((adapter_id, version))
            if e is None or e.doomed:
                return
            try:
                size = sum(f.stat().st_size for f in e.path.iterdir())
            except OSError:
                return
            self._bytes += size - e.size
            e.size = size
            self._evict(keep=(adapter_id, version))

    # -- changes ---------------------------------------------------------------------------------
    def remove(self, adapter_id: str, version: int = 0) -> None:
        """Drop adapter_id's `version` (0: every version; a copy being read goes when its reader
        ends)."""
        with self._lock:
            self._removals[adapter_id] = self._removals.get(adapter_id, 0) + 1
            for key, e in [(k, e) for k, e in self._index.items()
                           if k[0] == adapter_id and version in (0, k[1])]:
                self._drop(key, e)

    def generation(self, adapter_id: str) -> int:
        """How many times remove() dropped adapter_id: a write-back taken before a removal is refused."""
        with self._lock:
            return self._removals.get(adapter_id, 0)

    def discard(self, adapter_id: str, version: int) -> None:
        """Drop one copy the reader could not use (deleted when its last reader ends)."""
        with self._lock:
            e = self._index.get((adapter_id, version))
            if e is not None:
                log.warning("disk_cache_unusable_discarded", adapter_id=adapter_id, version=version)
                self._drop((adapter_id, version), e)

    def put_image(self, adapter_id: str, version: int, write: Callable[[pathlib.Path], None],
                  generation: int) -> bool:
        """A copy written back by the host tier as it evicts the adapter: `write(dir)` puts the packed
        image in a temp dir, which then moves into place like any copy. Refused (False) when the disk
        already holds adapter@version, when remove() dropped the adapter since `generation` was read
        (a deleted adapter never comes back), or when the image is larger than the whole tier."""
        key = (adapter_id, version)
        with self._lock:
            if self.holds(adapter_id, version) or self._removals.get(adapter_id, 0) != generation:
                return False
        tmp = self.tempdir()
        try:
            write(tmp)
            size = _seal(tmp, adapter_id, version, "", image_only=True)
            if self.capacity_bytes and size > self.capacity_bytes:
                return False
            with self._lock:
                if self._index.get(key) is not None or self._removals.get(adapter_id, 0) != generation:
                    return False        # a fetch landed, or a removal, while the image was written
                self._install(key, tmp, _DiskEntry(tmp, size, "", verified=True, image_only=True))
                self.write_backs += 1
                return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def put(self, adapter_id: str, version: int, digest: str, tmp: pathlib.Path,
            verified: bool = True, pin: bool = False) -> pathlib.Path:
        """Move a verified temp dir into place atomically; returns the final path (pinned for the
        caller, who then calls release, when `pin`)."""
        size = _seal(tmp, adapter_id, version, digest)
        if self.capacity_bytes and size > self.capacity_bytes:
            shutil.rmtree(tmp, ignore_errors=True)
            raise errors.ResourceExhausted(
                f"adapter {adapter_id!r} v{version} needs {size} bytes, more than the disk cache's "
                f"{self.capacity_bytes}; raise --disk-cache-bytes")
        key = (adapter_id, version)
        with self._lock:
            e = self._index.get(key)
            if e is not None and not e.doomed:       # another load won the race (same content)
                shutil.rmtree(tmp, ignore_errors=True)
                self._policy.touch(key, e.size, 1.0)
                e.readers += pin
                return e.path
            return self._install(key, tmp, _DiskEntry(tmp, size, digest, readers=int(pin),
                                                      verified=verified))

    def _install(self, key: tuple[str, int], tmp: pathlib.Path, entry: _DiskEntry) -> pathlib.Path:
        """Move the complete copy in tmp into place as `entry` (caller holds the lock), then evict
        down to the budget."""
        adapter_id, version = key
        e = self._index.get(key)
        final = self._dir(adapter_id) / str(version)
        if e is not None:                        # a doomed copy still read: keep both apart
            final = final.with_name(f"{version}.{os.getpid()}.{id(tmp)}")
            # not indexable by a later scan (not a digit name): deleted at the next start's scan
        else:
            shutil.rmtree(final, ignore_errors=True)   # an orphan the index did not know
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        if e is not None:
            self._index.pop(key)
        entry.path = final
        self._index[key] = entry
        self._bytes += entry.size
        self.loads += 1
        self._policy.touch(key, entry.size, 1.0)
        self._evict(keep=key)
        return final

    def tempdir(self) -> pathlib.Path:
        return pathlib.Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))

    # -- internals (callers hold self._lock) -----------------------------------------------------
    def _evict(self, keep: tuple[str, int]) -> None:
        if not self.capacity_bytes:
            return
        while self._bytes > self.capacity_bytes:
            candidates = [k for k, e in self._index.items() if k != keep and not e.doomed and e.readers == 0]
            # a copy the host tier also holds first: the disk sees no use of an adapter served from
            # the host, so by its own count the hottest adapters look cold and would go first
            victim = self._policy.victim([k for k in candidates if self.covered(k)] or candidates)
            if victim is None:   # everything else is being read: over budget until they finish
                log.info("disk_cache_over_budget", bytes=self._bytes, capacity=self.capacity_bytes)
                return
            log.info("disk_cache_evicted", adapter_id=victim[0], version=victim[1])
            self.evictions += 1
            self._drop(victim, self._index[victim], evicted=True)

    def _drop(self, key: tuple[str, int], e: _DiskEntry, evicted: bool = False) -> None:
        """Out of the index (its file goes when its last reader ends). Only an eviction leaves the
        policy a ghost of its frequency; a deleted or unusable copy is forgotten."""
        if not e.doomed:
            e.doomed = True
            (self._policy.remove if evicted else self._policy.forget)(key)
        if e.readers == 0:
            self._delete(key, e)

    def _delete(self, key: tuple[str, int], e: _DiskEntry) -> None:
        if self._index.get(key) is e:
            del self._index[key]
        self._bytes -= e.size
        shutil.rmtree(e.path, ignore_errors=True)
        try:
            e.path.parent.rmdir()       # the id's directory, once empty
        except OSError:
            pass


def _seal(tmp: pathlib.Path, adapter_id: str, version: int, digest: str, **extra) -> int:
    """Write a copy's meta.json (what the start-up scan indexes it by); its size in bytes."""
    (tmp / "meta.json").write_text(json.dumps({"adapter_id": adapter_id, "version": version,
                                               "digest": digest, **extra}))
    return sum(f.stat().st_size for f in tmp.iterdir())


def _verify(path: pathlib.Path, digest: str) -> bool:
    """The files' sha256 manifest matches `digest` (a copy without one, e.g. from a test, passes)."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
        return True
    try:
        got = {}
        for name in ADAPTER_FILES:
            h = hashlib.sha256()
            with open(path / name, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            got[name] = h.hexdigest()
    except OSError:
        return False
    return manifest_digest(got) == digest


def image_name(signature: str) -> str:
    """The file name of the arena's packed image (HostArena.signature) in a disk copy."""
    return f"arena-{signature}.pt"


class RegistryAdapterSource:
    """AdapterSource backed by a registry address and a DiskAdapterStore."""

    def __init__(self, address: str, store: DiskAdapterStore, timeout_s: float = 30.0,
                 direct=None, security: ClientSecurity | None = None):
        self.address = address
        self.store = store
        self.timeout_s = timeout_s
        self.direct = direct      # a blob_direct.DirectBlobReader, or None: FetchAdapter only
        self.direct_reads = 0
        self._channel = channel(address, security, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # adapters arrive as MiB chunks: read the socket in large pieces (gRPC starts at 8 KiB)
            ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
            ("grpc.experimental.tcp_max_read_chunk_size", 8 * 1024 * 1024)]) if address else None
        self._stub = registry_pb2_grpc.AdapterRegistryStub(self._channel) if self._channel else None

    def held(self) -> list[tuple[str, int]]:
        return self.store.held()

    def holds(self, adapter_id: str, version: int) -> bool:
        """Whether the disk tier has a copy now (not a use: nothing moves in its eviction order)."""
        return self.store.holds(adapter_id, version)

    def set_covered(self, covered: Callable[[tuple[str, int]], bool]) -> None:
        """Tell the disk tier which copies a faster tier holds (it evicts those first)."""
        self.store.covered = covered

    def forget(self, adapter_id: str, version: int = 0) -> None:
        """Drop adapter_id's `version` (0: every version) from the disk tier."""
        self.store.remove(adapter_id, version)

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def packed_path(self, path: pathlib.Path, signature: str) -> pathlib.Path | None:
        """Where the arena's packed image of the copy at `path` lives: beside its files in the disk
        tier (evicted and removed with them; versions are immutable)."""
        return path / image_name(signature) if path.parent.parent == self.store.root else None

    def generation(self, adapter_id: str) -> int:
        return self.store.generation(adapter_id)

    def write_back(self, adapter_id: str, version: int, signature: str,
                   save: Callable[[pathlib.Path], None], generation: int) -> bool:
        """Keep on disk an adapter the host tier evicts and the disk no longer holds: `save(path)`
        writes its packed image (an image-only copy; see DiskAdapterStore.put_image)."""
        return self.store.put_image(adapter_id, version, lambda d: save(d / image_name(signature)),
                                    generation)

    def latest(self, adapter_id: str) -> int:
        """The registry's latest version of adapter_id (raises AdapterNotFound / Unavailable)."""
        if self._stub is None:
            held = self.store.versions(adapter_id)
            if held:
                return held[-1]
            raise errors.AdapterNotFound(f"adapter {adapter_id!r} is not on this executor's disk and "
                                         "no --registry is configured")
        try:
            return self._stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=adapter_id),
                                         timeout=self.timeout_s).version
        except grpc.RpcError as exc:
            raise self._error(adapter_id, exc) from None

    def read(self, adapter_id: str, version: int, reader):
        """(version, reader(path), tier it came from: "disk" | "registry") with the copy pinned on
        disk while `reader` runs (an eviction never deletes it under the reader). A corrupt disk copy,
        or one the reader cannot use (UnusableCopy), is discarded and fetched again."""
        for _ in range(3):
            tier, unusable = "disk", False
            try:
                v = version
                if v == 0:
                    v = self._latest_or_local(adapter_id)
                path = self.store.acquire(adapter_id, v)
                if path is None:
                    if self._stub is None:
                        raise errors.AdapterNotFound(
                            f"adapter {adapter_id!r} v{v} is not on this executor's disk and no "
                            "--registry is configured")
                    tier = "registry"
                    path = self._fetch(adapter_id, v, pin=True).path   # pinned as it lands
            except grpc.RpcError as exc:
                raise self._error(adapter_id, exc) from None
            try:
                return v, reader(path), tier
            except UnusableCopy:    # an image-only copy this arena cannot use
                unusable = True
            finally:
                self.store.resize(adapter_id, v)     # the reader may have added a packed image
                self.store.release(adapter_id, v)
            if unusable:            # after its release: dropped at once, and fetched again
                self.store.discard(adapter_id, v)
        raise errors.Unavailable(f"adapter {adapter_id!r}: its disk copy kept disappearing; "
                                 "raise --disk-cache-bytes")

    def _latest_or_local(self, adapter_id: str) -> int:
        try:
            return self.latest(adapter_id)
        except errors.Unavailable:
            held = self.store.versions(adapter_id)
            if held:
                log.warning("registry_unreachable_serving_local", adapter_id=adapter_id,
                            version=held[-1], registry=self.address)
                return held[-1]
            raise

    def _error(self, adapter_id: str, exc: grpc.RpcError) -> errors.OpenLoraError:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.AdapterNotFound(exc.details())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.InvalidArgument(exc.details())
        if code in _UNREACHABLE:
            return errors.Unavailable(f"adapter {adapter_id!r}: registry {self.address} unreachable "
                                      f"({code.name}) and this executor holds no copy")
        return errors.Unavailable(f"registry {self.address}: {code.name}: {exc.details()}")

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

    def _fetch(self, adapter_id: str, version: int, pin: bool = False) -> ResolvedAdapter:
        if version == 0:
            meta = self._stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=adapter_id),
                                         timeout=self.timeout_s)
            local = self.store.path(adapter_id, meta.version)
            if local is not None:
                return ResolvedAdapter(adapter_id, meta.version, local)
            version = meta.version
        if self.direct is not None and self.direct.enabled:   # straight from the blob store
            meta = self._stub.GetAdapter(registry_pb2.GetAdapterRequest(
                adapter_id=adapter_id, version=version), timeout=self.timeout_s)
            tmp = self.store.tempdir()
            try:
                if self.direct.fetch(meta, tmp):             # verified against the digest
                    self.direct_reads += 1
                    return ResolvedAdapter(adapter_id, meta.version, self.store.put(
                        adapter_id, meta.version, meta.digest, tmp, pin=pin))
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        stream = self._stub.FetchAdapter(
            registry_pb2.FetchAdapterRequest(adapter_id=adapter_id, version=version),
            timeout=self.timeout_s)
        tmp = self.store.tempdir()
        try:
            meta = self._receive(stream, tmp)
            return ResolvedAdapter(adapter_id, meta.version,
                                   self.store.put(adapter_id, meta.version, meta.digest, tmp, pin=pin))
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
