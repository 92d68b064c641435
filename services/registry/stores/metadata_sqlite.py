"""Adapter metadata in SQLite (WAL): one transaction per mutation, version numbers assigned under
BEGIN IMMEDIATE so concurrent writers get consecutive versions and none is lost.

Schema migrations are numbered (MIGRATIONS[i] takes PRAGMA user_version from i to i+1) and applied at
open, each in its own transaction. One process per database file."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable

from services.registry.stores import (
    CREATED,
    DELETED,
    AdapterRecord,
    Change,
    FileEntry,
    SharedLock,
    StoreStats,
)

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS ids (
    adapter_id   TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL,         -- highest version ever assigned: numbers are never reused
    latest       INTEGER                   -- highest live version, NULL when all are deleted
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id     TEXT NOT NULL,
    version        INTEGER NOT NULL,
    digest         TEXT NOT NULL,
    base_model     TEXT NOT NULL,
    rank           INTEGER NOT NULL,
    alpha          REAL NOT NULL,
    target_modules TEXT NOT NULL,          -- JSON list
    use_rslora     INTEGER NOT NULL,
    size_bytes     INTEGER NOT NULL,
    source         TEXT NOT NULL,
    labels         TEXT NOT NULL,          -- JSON object
    created_at     REAL NOT NULL,
    files          TEXT NOT NULL,          -- JSON [[name, size, sha256], ...] in name order
    PRIMARY KEY (adapter_id, version)
);
CREATE INDEX IF NOT EXISTS versions_base_model ON versions (base_model);
CREATE TABLE IF NOT EXISTS labels (
    adapter_id TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version, key)
);
CREATE INDEX IF NOT EXISTS labels_kv ON labels (key, value);
CREATE TABLE IF NOT EXISTS blob_refs (
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, adapter_id TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (adapter_id, version, sha256)
);
CREATE INDEX IF NOT EXISTS blob_refs_sha ON blob_refs (sha256);
"""
MIGRATIONS = [
    SCHEMA_V1,                              # IF NOT EXISTS: databases made before versioning
    """CREATE TABLE changes (               -- the change feed (WatchAdapters), in commit order
        seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, adapter_id TEXT NOT NULL,
        version INTEGER NOT NULL, latest_version INTEGER NOT NULL, created_at REAL NOT NULL);""",
    # public adapters: every tenant may list, read and run them; a property of the id
    "ALTER TABLE ids ADD COLUMN public INTEGER NOT NULL DEFAULT 0",
]

_COLUMNS = ("adapter_id, version, digest, base_model, rank, alpha, target_modules, use_rslora, "
            "size_bytes, source, labels, created_at, files")
# the id's public flag, selected after _COLUMNS from `versions` (ids keeps it: one per id)
_PUBLIC = "(SELECT ids.public FROM ids WHERE ids.adapter_id = versions.adapter_id)"


def _row(r) -> AdapterRecord:
    return AdapterRecord(
        adapter_id=r[0], version=r[1], digest=r[2], base_model=r[3], rank=r[4], alpha=r[5],
        target_modules=tuple(json.loads(r[6])), use_rslora=bool(r[7]), size_bytes=r[8],
        source=r[9], labels=json.loads(r[10]), created_at=r[11],
        files=tuple(FileEntry(*f) for f in json.loads(r[12])),
        public=bool(r[13]) if len(r) > 13 else False)


class SqliteMetadataStore:
    """MetadataStore on one SQLite file. Thread-safe (one connection behind a lock).

    synchronous="FULL" makes each acknowledged mutation survive power loss; "OFF" is for bulk
    test fixtures only.
    """

    def __init__(self, path: str, synchronous: str = "FULL"):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._blob_lock = SharedLock()
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for i in range(version, len(MIGRATIONS)):
            with self._tx() as db:
                for statement in filter(str.strip, MIGRATIONS[i].split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={i + 1}")

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def blob_lock(self, exclusive: bool):
        return self._blob_lock.hold(exclusive)

    @staticmethod
    def _change(db, kind: str, adapter_id: str, version: int, latest: int) -> None:
        db.execute("INSERT INTO changes (kind, adapter_id, version, latest_version, created_at) "
                   "VALUES (?, ?, ?, ?, ?)", (kind, adapter_id, version, latest, time.time()))

    def last_change(self) -> int:
        with self._lock:
            return self._db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def prune_changes(self, before: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM changes WHERE created_at < ? AND seq < "
                              "(SELECT max(seq) FROM changes)", (before,)).rowcount

    def changes_after(self, seq: int, limit: int = 1000) -> list[Change]:
        with self._lock:
            return [Change(*r) for r in self._db.execute(
                "SELECT seq, kind, adapter_id, version, latest_version FROM changes WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (seq, limit))]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def create_version(self, record: AdapterRecord) -> tuple[AdapterRecord, bool]:
        with self._tx() as db:
            row = db.execute("SELECT last_version, latest FROM ids WHERE adapter_id=?",
                             (record.adapter_id,)).fetchone()
            if row and row[1] is not None:
                latest = self._get(db, record.adapter_id, row[1])
                if latest is not None and latest.digest == record.digest:
                    return latest, False
            version = (row[0] if row else 0) + 1
            stored = _replace(record, version=version)
            self._insert(db, stored)
            db.execute("INSERT INTO ids (adapter_id, last_version, latest) VALUES (?, ?, ?) "
                       "ON CONFLICT(adapter_id) DO UPDATE SET last_version=excluded.last_version, "
                       "latest=excluded.latest", (record.adapter_id, version, version))
            self._change(db, CREATED, record.adapter_id, version, version)
            return stored, True

    def insert_many(self, records: Iterable[AdapterRecord]) -> None:
        """Bulk import of fully-formed records (tests, migrations): one transaction."""
        with self._tx() as db:
            for r in records:
                self._insert(db, r)
                db.execute("INSERT INTO ids (adapter_id, last_version, latest) VALUES (?, ?, ?) "
                           "ON CONFLICT(adapter_id) DO UPDATE SET "
                           "last_version=max(last_version, excluded.last_version), "
                           "latest=max(coalesce(latest, 0), excluded.latest)",
                           (r.adapter_id, r.version, r.version))

    @staticmethod
    def _insert(db, r: AdapterRecord) -> None:
        db.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", (
            r.adapter_id, r.version, r.digest, r.base_model, r.rank, r.alpha,
            json.dumps(list(r.target_modules)), int(r.use_rslora), r.size_bytes, r.source,
            json.dumps(r.labels, sort_keys=True), r.created_at,
            json.dumps([[f.name, f.size, f.sha256] for f in r.files])))
        db.executemany("INSERT INTO labels VALUES (?, ?, ?, ?)",
                       [(r.adapter_id, r.version, k, v) for k, v in r.labels.items()])
        db.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?, ?, ?)",
                       [(f.sha256, f.size, r.adapter_id, r.version) for f in r.files])

    @staticmethod
    def _get(db, adapter_id: str, version: int) -> AdapterRecord | None:
        r = db.execute(f"SELECT {_COLUMNS}, {_PUBLIC} FROM versions WHERE adapter_id=? AND version=?",
                       (adapter_id, version)).fetchone()
        return _row(r) if r else None

    def get(self, adapter_id: str, version: int = 0) -> AdapterRecord | None:
        with self._lock:
            if version == 0:
                row = self._db.execute("SELECT latest FROM ids WHERE adapter_id=?",
                                       (adapter_id,)).fetchone()
                if not row or row[0] is None:
                    return None
                version = row[0]
            return self._get(self._db, adapter_id, version)

    def list_latest(self, limit: int, after_id: str = "", base_model: str = "",
                    labels: dict[str, str] | None = None) -> list[AdapterRecord]:
        sql = [f"SELECT {', '.join('v.' + c.strip() for c in _COLUMNS.split(','))}, i.public FROM ids i "
               "JOIN versions v ON v.adapter_id=i.adapter_id AND v.version=i.latest "
               "WHERE i.adapter_id > ?"]
        args: list = [after_id]
        if base_model:
            sql.append("AND v.base_model = ?")
            args.append(base_model)
        for k, val in (labels or {}).items():
            sql.append("AND EXISTS (SELECT 1 FROM labels l WHERE l.adapter_id=v.adapter_id "
                       "AND l.version=v.version AND l.key=? AND l.value=?)")
            args += [k, val]
        sql.append("ORDER BY i.adapter_id LIMIT ?")
        args.append(limit)
        with self._lock:
            return [_row(r) for r in self._db.execute(" ".join(sql), args)]

    def delete(self, adapter_id: str, version: int = 0) -> list[AdapterRecord]:
        with self._tx() as db:
            where, args = ("adapter_id=?", (adapter_id,)) if version == 0 else \
                ("adapter_id=? AND version=?", (adapter_id, version))
            gone = [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM versions WHERE {where}",
                                                args)]
            if not gone:
                return []
            for table in ("versions", "labels", "blob_refs"):
                db.execute(f"DELETE FROM {table} WHERE {where}", args)
            db.execute("UPDATE ids SET latest=(SELECT max(version) FROM versions WHERE "
                       "adapter_id=?) WHERE adapter_id=?", (adapter_id, adapter_id))
            latest = db.execute("SELECT latest FROM ids WHERE adapter_id=?", (adapter_id,)).fetchone()
            if not (latest and latest[0]):              # gone: a later adapter of that id starts private
                db.execute("UPDATE ids SET public=0 WHERE adapter_id=?", (adapter_id,))
            self._change(db, DELETED, adapter_id, version, (latest and latest[0]) or 0)
            return gone

    def set_public(self, adapter_id: str, public: bool) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE ids SET public=? WHERE adapter_id=? AND latest IS NOT NULL",
                              (int(public), adapter_id)).rowcount > 0

    def unreferenced(self, sha256s: set[str]) -> set[str]:
        with self._lock:
            return {s for s in sha256s if self._db.execute(
                "SELECT 1 FROM blob_refs WHERE sha256=? LIMIT 1", (s,)).fetchone() is None}

    def referenced(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM blob_refs")}

    def stats(self) -> StoreStats:
        with self._lock:
            ids = self._db.execute("SELECT count(*) FROM ids WHERE latest IS NOT NULL").fetchone()[0]
            versions = self._db.execute("SELECT count(*) FROM versions").fetchone()[0]
            size = self._db.execute("SELECT coalesce(sum(size), 0) FROM (SELECT sha256, "
                                    "max(size) AS size FROM blob_refs GROUP BY sha256)").fetchone()[0]
        return StoreStats(adapters=ids, versions=versions, blob_bytes=size)


def _replace(record: AdapterRecord, **changes) -> AdapterRecord:
    import dataclasses
    return dataclasses.replace(record, **changes)


class _Transaction:
    """`with` block = BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), holding the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._lock.release()
