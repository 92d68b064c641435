"""The adapter registry, free of gRPC: register / upload / get / list / delete / fetch.

Crash safety by construction: files stream into temp blobs (fsynced), are validated whole, then
published (rename / upload) and referenced by one metadata transaction. Until that transaction
commits nothing is visible; blobs no version references are collected from metadata, never the
reverse, under the metadata store's exclusive blob lock (publishers hold it shared), which with
PostgreSQL spans every replica.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

import structlog

from services.common.config import CHUNK_BYTES
from services.common.errors import (
    AdapterNotFound,
    InvalidAdapter,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.peft_format import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MAX_HEADER_BYTES,
    PICKLE_FILES,
    PICKLE_MESSAGE,
    WEIGHTS_FILE,
    adapter_form,
    check_adapter_id,
    manifest_digest,
    nonfinite_tensor,
    parse_adapter_config,
    read_safetensors_header,
    validate_adapter,
)
from services.registry.base_models import BaseModelShape, check_fits
from services.registry.sources import Source, SourceCredentials, default_sources, fetch_source
from services.registry.stores import AdapterRecord, BlobStore, FileEntry, MetadataStore

log = structlog.get_logger(__name__)

DEFAULT_PAGE, MAX_PAGE = 100, 1000
FORM_LABEL = "openlora/form"   # set at registration for any form but plain LoRA: dora, ... (adapter_form)
CHANGES_KEPT_S = 7 * 24 * 3600                    # the change feed's rows are pruned at start-up


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for k, v in labels.items():
        if not k or any(c in k for c in "=,") or "," in v:
            raise InvalidArgument(f"bad label {k!r}={v!r}: keys are non-empty without '=' or ',', "
                                  "values have no ','")
    return dict(labels)


def parse_label_selector(selector: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise InvalidArgument(f"bad label_selector {selector!r}: expected k=v,k2=v2")
        out[k.strip()] = v.strip()
    return out


class UploadSession:
    """Files of one adapter streaming into temp blobs; nothing is visible until commit."""

    def __init__(self, registry: AdapterRegistry, adapter_id: str, base_model: str,
                 labels: dict[str, str], source: str, public: bool | None = None):
        self.adapter_id = check_adapter_id(adapter_id)
        self.public = public                        # None: leave the id's flag as it is
        self.base_model = base_model
        self.labels = check_labels(labels)
        self.source = source
        self._registry = registry
        self._writers: dict[str, object] = {}
        self._head: dict[str, bytearray] = {}       # first bytes of each file, for validation
        self.size = 0

    def write(self, file_name: str, data: bytes) -> None:
        if file_name not in ADAPTER_FILES:
            if file_name in PICKLE_FILES:
                raise InvalidAdapter(PICKLE_MESSAGE.format(name=file_name))
            raise InvalidArgument(f"unknown file {file_name!r}: an adapter is exactly "
                                  f"{' and '.join(ADAPTER_FILES)}")
        self.size += len(data)
        limit = self._registry.max_adapter_bytes
        if self.size > limit:
            raise ResourceExhausted(f"adapter {self.adapter_id!r} is over the registry's size "
                                    f"limit of {limit} bytes (--max-adapter-bytes)")
        writer = self._writers.get(file_name)
        if writer is None:
            writer = self._writers[file_name] = self._registry.blobs.writer()
            self._head[file_name] = bytearray()
        head = self._head[file_name]
        if file_name == CONFIG_FILE or len(head) < 8 + 1024 * 1024:
            head += data[: (1 << 24) if file_name == CONFIG_FILE else 8 + 1024 * 1024 - len(head)]
        writer.write(data)

    def add_file(self, file_name: str, path: pathlib.Path) -> None:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                self.write(file_name, chunk)

    def prepare(self) -> AdapterRecord:
        """Check the adapter is whole and valid, fsync its blobs; returns the record to commit."""
        missing = [n for n in ADAPTER_FILES if n not in self._writers]
        if missing:
            raise InvalidArgument(f"adapter {self.adapter_id!r} is incomplete: no "
                                  f"{' and '.join(missing)} received")
        config = parse_adapter_config(bytes(self._head[CONFIG_FILE]))
        weights = self._writers[WEIGHTS_FILE]
        head = bytes(self._head[WEIGHTS_FILE])
        header_end = 8 + int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if len(head) < header_end <= min(weights.size, 8 + MAX_HEADER_BYTES):
            head = self._read_weights_head(header_end)
        tensors, expected = read_safetensors_header(head)
        if expected != weights.size:
            raise InvalidAdapter(f"{WEIGHTS_FILE} has {weights.size} bytes but its safetensors "
                                 f"header describes {expected}: truncated or corrupt")
        validate_adapter(config, tensors)
        check_fits(self._registry.base_models, self.adapter_id, tensors, config)
        weights.finish()
        with open(weights._tmp, "rb") as f:
            bad = nonfinite_tensor(f, tensors)
        if bad is not None:
            raise InvalidAdapter(f"tensor {bad!r} holds NaN or infinite values; this adapter cannot "
                                 "be served (was its training diverging?)")
        form = adapter_form(config, tensors)
        labels = self.labels if form == "lora" else {**self.labels, FORM_LABEL: form}
        files = [FileEntry(name, self._writers[name].size, self._writers[name].finish())
                 for name in ADAPTER_FILES]
        return AdapterRecord(
            adapter_id=self.adapter_id, version=0, digest=manifest_digest({f.name: f.sha256 for f in files}),
            base_model=self.base_model or config.base_model, rank=config.rank, alpha=config.alpha,
            target_modules=tuple(config.target_module_names), use_rslora=config.use_rslora,
            size_bytes=sum(f.size for f in files), source=self.source, labels=labels,
            created_at=time.time(), files=tuple(files))

    def _read_weights_head(self, n: int) -> bytes:
        writer = self._writers[WEIGHTS_FILE]
        writer.finish()
        with open(writer._tmp, "rb") as f:
            return f.read(n)

    def commit(self, record: AdapterRecord) -> AdapterRecord:
        return self._registry._commit(self, record)

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        self._writers.clear()


@dataclasses.dataclass
class FetchStream:
    record: AdapterRecord
    readers: list                                   # one open BlobReader per file, manifest order

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, int, int]]:
        """(file_name, offset, length) of each chunk, in manifest order."""
        for f in self.record.files:
            for off in range(0, f.size, chunk_bytes):
                yield f.name, off, min(chunk_bytes, f.size - off)

    def close(self) -> None:
        for r in self.readers:
            r.close()


class AdapterRegistry:
    def __init__(self, metadata: MetadataStore, blobs: BlobStore, max_adapter_bytes: int,
                 work_dir: pathlib.Path, sources: dict[str, Source] | None = None,
                 on_demand_source: str = "", base_models: Sequence[BaseModelShape] = ()):
        self.metadata = metadata
        self.base_models = tuple(base_models)              # adapters must fit one (none: no check)
        self.blobs = blobs
        self.max_adapter_bytes = max_adapter_bytes
        self._work_dir = pathlib.Path(work_dir)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self._sources = sources if sources is not None else default_sources()
        self.on_demand = OnDemandImporter(self, on_demand_source) if on_demand_source else None

    def recover(self) -> None:
        """At startup, before serving: drop temp files and blobs no version references."""
        shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        with self.metadata.blob_lock(exclusive=True):
            if hasattr(self.blobs, "clear_temp"):
                self.blobs.clear_temp()
            referenced = self.metadata.referenced()
            orphans = [s for s in self.blobs.list() if s not in referenced]
            for sha in orphans:
                self.blobs.delete(sha)
        if orphans:
            log.info("orphan_blobs_removed", count=len(orphans))
        self.metadata.prune_changes(time.time() - CHANGES_KEPT_S)

    # --- writes ---------------------------------------------------------------------------------

    def begin_upload(self, adapter_id: str, base_model: str = "", labels: dict[str, str] | None = None,
                     source: str = "upload", public: bool | None = None) -> UploadSession:
        return UploadSession(self, adapter_id, base_model, labels or {}, source, public)

    def upload(self, adapter_id: str, files: dict[str, bytes], base_model: str = "",
               labels: dict[str, str] | None = None, public: bool | None = None) -> AdapterRecord:
        """Whole-file upload (tests, tools)."""
        session = self.begin_upload(adapter_id, base_model, labels, public=public)
        try:
            for name, data in files.items():
                session.write(name, data)
            return session.commit(session.prepare())
        finally:
            session.abort()

    def register(self, adapter_id: str, source: str, base_model: str = "",
                 labels: dict[str, str] | None = None, public: bool | None = None,
                 credentials: SourceCredentials | None = None) -> AdapterRecord:
        """Import from `source`, with `credentials` (the registering tenant's, for hf:// and s3://;
        None: the registry's own environment)."""
        session = self.begin_upload(adapter_id, base_model, labels, source=source, public=public)
        work = pathlib.Path(tempfile.mkdtemp(dir=self._work_dir, prefix="import-"))
        try:
            files = fetch_source(source, work, self._sources, credentials)
            total = sum(p.stat().st_size for p in files.values())
            if total > self.max_adapter_bytes:
                raise ResourceExhausted(f"{source}: {total} bytes is over the registry's size "
                                        f"limit of {self.max_adapter_bytes} (--max-adapter-bytes)")
            for name, path in files.items():
                session.add_file(name, path)
            return session.commit(session.prepare())
        finally:
            session.abort()
            shutil.rmtree(work, ignore_errors=True)

    def _commit(self, session: UploadSession, record: AdapterRecord) -> AdapterRecord:
        with self.metadata.blob_lock(exclusive=False):
            for w in session._writers.values():
                w.commit()
            stored, created = self.metadata.create_version(record)
        if session.public is not None:
            self.metadata.set_public(stored.adapter_id, session.public)
        stored = self.metadata.get(stored.adapter_id, stored.version) or stored
        log.info("adapter_stored" if created else "adapter_unchanged",
                 adapter_id=stored.adapter_id, version=stored.version, digest=stored.digest,
                 public=stored.public)
        return stored

    def delete(self, adapter_id: str, version: int = 0) -> list[AdapterRecord]:
        check_adapter_id(adapter_id)
        with self.metadata.blob_lock(exclusive=True):
            gone = self.metadata.delete(adapter_id, version)
            if not gone:
                raise self._not_found(adapter_id, version)
            candidates = {f.sha256 for r in gone for f in r.files}
            for sha in self.metadata.unreferenced(candidates):
                self.blobs.delete(sha)
        log.info("adapter_deleted", adapter_id=adapter_id, versions=[r.version for r in gone])
        return gone

    # --- reads ----------------------------------------------------------------------------------

    def get(self, adapter_id: str, version: int = 0, timeout: float | None = None) -> AdapterRecord:
        """One version (0 -> latest). An id never seen is imported from --on-demand-source first,
        waiting at most `timeout` seconds (the caller's deadline) before UNAVAILABLE."""
        check_adapter_id(adapter_id)
        record = self.metadata.get(adapter_id, version)
        if record is None and self.on_demand and self.metadata.get(adapter_id, 0) is None:
            self.on_demand.ensure(adapter_id, timeout)
            record = self.metadata.get(adapter_id, version)
        if record is None:
            raise self._not_found(adapter_id, version)
        return record

    def list(self, page_size: int = 0, page_token: str = "", base_model: str = "",
             label_selector: str = "") -> tuple[list[AdapterRecord], str]:
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        after = _decode_token(page_token)
        rows = self.metadata.list_latest(size + 1, after, base_model,
                                         parse_label_selector(label_selector))
        if len(rows) > size:
            return rows[:size], _encode_token(rows[size - 1].adapter_id)
        return rows, ""

    def fetch(self, adapter_id: str, version: int = 0, timeout: float | None = None) -> FetchStream:
        record = self.get(adapter_id, version, timeout)
        readers = []
        try:
            for f in record.files:
                readers.append(self.blobs.open(f.sha256))
        except FileNotFoundError:
            for r in readers:
                r.close()
            raise self._not_found(adapter_id, version) from None
        return FetchStream(record, readers)

    def _not_found(self, adapter_id: str, version: int) -> AdapterNotFound:
        if version and self.metadata.get(adapter_id, 0) is not None:
            return AdapterNotFound(f"adapter {adapter_id!r} has no version {version}")
        return AdapterNotFound(f"no adapter {adapter_id!r}; `openlora adapters list` shows "
                               "what the registry holds")


class OnDemandImporter:
    """Imports unknown adapter ids from one source on first request, once per id however many
    requests ask at the same time (single flight); later waiters share the first one's outcome."""

    def __init__(self, registry: AdapterRegistry, source: str, workers: int = 4):
        if source != "hf" and not source.startswith("s3://"):
            raise InvalidArgument(f"--on-demand-source {source!r}: expected hf or s3://BUCKET/PREFIX")
        self.source = source.rstrip("/")
        self.imports = 0                            # imports started (tests, metrics)
        self._registry = registry
        self._lock = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="on-demand")

    def uri(self, adapter_id: str) -> str:
        return f"hf://{adapter_id}" if self.source == "hf" else f"{self.source}/{adapter_id}"

    def ensure(self, adapter_id: str, timeout: float | None) -> None:
        with self._lock:
            future = self._inflight.get(adapter_id)
            if future is None:
                future = self._inflight[adapter_id] = self._pool.submit(self._import, adapter_id)
                self.imports += 1
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise Unavailable(f"adapter {adapter_id!r} is still being imported from "
                              f"{self.uri(adapter_id)} (source slow or unreachable); retry "
                              "with a longer deadline") from None

    def _import(self, adapter_id: str) -> None:
        uri = self.uri(adapter_id)
        try:
            log.info("on_demand_import", adapter_id=adapter_id, source=uri)
            self._registry.register(adapter_id, uri, labels={"openlora/on-demand": "true"})
        except InvalidAdapter:
            raise
        except (NotFound, InvalidArgument) as exc:
            raise AdapterNotFound(f"no adapter {adapter_id!r} in the registry, and the on-demand "
                                  f"source has none at {uri}: {exc}") from None
        finally:
            with self._lock:
                self._inflight.pop(adapter_id, None)


def _encode_token(after_id: str) -> str:
    return base64.urlsafe_b64encode(after_id.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        after = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        if not after:
            raise ValueError(token)
        return after
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"bad page_token {token!r}: pass next_page_token unchanged") from None


