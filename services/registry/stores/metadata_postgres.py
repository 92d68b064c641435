"""Adapter metadata in PostgreSQL (psycopg 3, a connection pool): the SQLite store's schema and
guarantees, shared by any number of registry processes.

- A version appears in the one transaction that writes it (rows, labels, blob refs, change row).
- Registrations of one id serialize on its `ids` row (SELECT ... FOR UPDATE): versions are
  consecutive, and content equal to the latest version returns it instead of a new one.
- Change rows get their seq under a transaction-scoped advisory lock, so seq order is commit
  order and a poller reading `seq > last` never skips a row that commits late.
- `blob_lock` is a session advisory lock (shared / exclusive) on the connection the guarded
  metadata calls then use (thread-local), released at once if the process dies.
- Migrations are numbered, recorded in schema_migrations and applied at start-up under an
  advisory lock, so replicas starting together apply each one once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable

from services.common.errors import Unavailable
from services.registry.stores import CREATED, DELETED, AdapterRecord, Change, StoreStats
from services.registry.stores.metadata_sqlite import _COLUMNS, _PUBLIC, _replace, _row

# Advisory lock keys (any two distinct bigints; "olra" + purpose).
LOCK_MIGRATE, LOCK_BLOBS, LOCK_CHANGES = 0x6F6C7261_0001, 0x6F6C7261_0002, 0x6F6C7261_0003

MIGRATIONS = [
    """
    CREATE TABLE ids (
        adapter_id   TEXT COLLATE "C" PRIMARY KEY,
        last_version INTEGER NOT NULL,       -- highest version ever assigned: never reused
        latest       INTEGER                 -- highest live version, NULL when all are deleted
    );
    CREATE TABLE versions (
        adapter_id TEXT COLLATE "C" NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL,
        base_model TEXT NOT NULL, rank INTEGER NOT NULL, alpha DOUBLE PRECISION NOT NULL,
        target_modules TEXT NOT NULL, use_rslora BOOLEAN NOT NULL, size_bytes BIGINT NOT NULL,
        source TEXT NOT NULL, labels TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        files TEXT NOT NULL,
        PRIMARY KEY (adapter_id, version)
    );
    CREATE INDEX versions_base_model ON versions (base_model);
    CREATE TABLE labels (
        adapter_id TEXT COLLATE "C" NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL,
        value TEXT NOT NULL, PRIMARY KEY (adapter_id, version, key)
    );
    CREATE INDEX labels_kv ON labels (key, value);
    CREATE TABLE blob_refs (
        sha256 TEXT NOT NULL, size BIGINT NOT NULL, adapter_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL, PRIMARY KEY (adapter_id, version, sha256)
    );
    CREATE INDEX blob_refs_sha ON blob_refs (sha256);
    """,
    """
    CREATE TABLE changes (
        seq BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, adapter_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL, latest_version INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # public adapters: every tenant may list, read and run them; a property of the id
    "ALTER TABLE ids ADD COLUMN public BOOLEAN NOT NULL DEFAULT FALSE",
]


def _unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"the metadata database is unreachable ({type(exc).__name__}: "
                       f"{str(exc).strip() or 'no detail'}); check --metadata-url and that "
                       "PostgreSQL is up")


class PostgresMetadataStore:
    """MetadataStore on PostgreSQL. Thread-safe; one pooled connection per call."""

    def __init__(self, url: str, pool_size: int = 8, connect_timeout: float = 10.0):
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                    kwargs={"autocommit": True}, timeout=connect_timeout,
                                    name="openlora-registry")
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except self._errors as exc:
            self._pool.close()
            raise _unavailable(exc) from None
        self._local = threading.local()
        self._migrate()

    # --- connections ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _conn(self):
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise _unavailable(exc) from None

    @contextlib.contextmanager
    def _tx(self):
        with self._conn() as conn:
            try:
                with conn.transaction():
                    yield conn
            except self._errors as exc:
                raise _unavailable(exc) from None

    def close(self) -> None:
        self._pool.close()

    def _migrate(self) -> None:
        with self._conn() as c:
            c.execute("SELECT pg_advisory_lock(%s)", (LOCK_MIGRATE,))
            try:
                c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                          " applied_at DOUBLE PRECISION NOT NULL)")
                done = c.execute("SELECT coalesce(max(version), 0) FROM schema_migrations"
                                 ).fetchone()[0]
                for i in range(done, len(MIGRATIONS)):
                    with c.transaction():
                        c.execute(MIGRATIONS[i])
                        c.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (i + 1, time.time()))
            finally:
                c.execute("SELECT pg_advisory_unlock(%s)", (LOCK_MIGRATE,))

    def schema_version(self) -> int:
        with self._conn() as c:
            return c.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]

    @contextlib.contextmanager
    def blob_lock(self, exclusive: bool):
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("blob_lock is not reentrant")
        with self._conn() as conn:
            fn = "pg_advisory_lock" if exclusive else "pg_advisory_lock_shared"
            conn.execute(f"SELECT {fn}(%s)", (LOCK_BLOBS,))
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None
                with contextlib.suppress(*self._errors):
                    conn.execute(f"SELECT {fn.replace('lock', 'unlock')}(%s)", (LOCK_BLOBS,))

    # --- writes ---------------------------------------------------------------------------------

    @staticmethod
    def _change(c, kind: str, adapter_id: str, version: int, latest: int) -> None:
        c.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_CHANGES,))
        c.execute("INSERT INTO changes (kind, adapter_id, version, latest_version, created_at) "
                  "VALUES (%s, %s, %s, %s, %s)", (kind, adapter_id, version, latest, time.time()))

    def create_version(self, record: AdapterRecord) -> tuple[AdapterRecord, bool]:
        with self._tx() as c:
            c.execute("INSERT INTO ids (adapter_id, last_version, latest) VALUES (%s, 0, NULL) "
                      "ON CONFLICT DO NOTHING", (record.adapter_id,))
            last, latest = c.execute("SELECT last_version, latest FROM ids WHERE adapter_id=%s "
                                     "FOR UPDATE", (record.adapter_id,)).fetchone()
            if latest is not None:
                current = self._get(c, record.adapter_id, latest)
                if current is not None and current.digest == record.digest:
                    return current, False
            stored = _replace(record, version=last + 1)
            self._insert(c, stored)
            c.execute("UPDATE ids SET last_version=%s, latest=%s WHERE adapter_id=%s",
                      (stored.version, stored.version, record.adapter_id))
            self._change(c, CREATED, record.adapter_id, stored.version, stored.version)
            return stored, True

    def insert_many(self, records: Iterable[AdapterRecord]) -> None:
        """Bulk import of fully-formed records (tests, migrations): one transaction."""
        records = list(records)
        with self._tx() as c:
            cur = c.cursor()
            cur.executemany(f"INSERT INTO versions ({_COLUMNS}) VALUES "
                            f"({', '.join(['%s'] * 13)})", [self._values(r) for r in records])
            cur.executemany("INSERT INTO labels VALUES (%s, %s, %s, %s)",
                            [(r.adapter_id, r.version, k, v) for r in records
                             for k, v in r.labels.items()])
            cur.executemany("INSERT INTO blob_refs VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            [(f.sha256, f.size, r.adapter_id, r.version) for r in records
                             for f in r.files])
            cur.executemany("INSERT INTO ids (adapter_id, last_version, latest) VALUES (%s, %s, %s) "
                            "ON CONFLICT (adapter_id) DO UPDATE SET "
                            "last_version=GREATEST(ids.last_version, excluded.last_version), "
                            "latest=GREATEST(coalesce(ids.latest, 0), excluded.latest)",
                            [(r.adapter_id, r.version, r.version) for r in records])

    @staticmethod
    def _values(r: AdapterRecord) -> tuple:
        return (r.adapter_id, r.version, r.digest, r.base_model, r.rank, r.alpha,
                json.dumps(list(r.target_modules)), bool(r.use_rslora), r.size_bytes, r.source,
                json.dumps(r.labels, sort_keys=True), r.created_at,
                json.dumps([[f.name, f.size, f.sha256] for f in r.files]))

    def _insert(self, c, r: AdapterRecord) -> None:
        c.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})",
                  self._values(r))
        cur = c.cursor()
        if r.labels:
            cur.executemany("INSERT INTO labels VALUES (%s, %s, %s, %s)",
                            [(r.adapter_id, r.version, k, v) for k, v in r.labels.items()])
        cur.executemany("INSERT INTO blob_refs VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        [(f.sha256, f.size, r.adapter_id, r.version) for f in r.files])

    def delete(self, adapter_id: str, version: int = 0) -> list[AdapterRecord]:
        where, args = ("adapter_id=%s", (adapter_id,)) if version == 0 else \
            ("adapter_id=%s AND version=%s", (adapter_id, version))
        with self._tx() as c:
            if c.execute("SELECT 1 FROM ids WHERE adapter_id=%s FOR UPDATE",
                         (adapter_id,)).fetchone() is None:
                return []
            gone = [_row(r) for r in c.execute(
                f"DELETE FROM versions WHERE {where} RETURNING {_COLUMNS}", args)]
            if not gone:
                return []
            for table in ("labels", "blob_refs"):
                c.execute(f"DELETE FROM {table} WHERE {where}", args)
            latest = c.execute("UPDATE ids SET latest=(SELECT max(version) FROM versions WHERE "
                               "adapter_id=%s) WHERE adapter_id=%s RETURNING latest",
                               (adapter_id, adapter_id)).fetchone()[0]
            if not latest:                            # gone: a later adapter of that id starts private
                c.execute("UPDATE ids SET public=FALSE WHERE adapter_id=%s", (adapter_id,))
            self._change(c, DELETED, adapter_id, version, latest or 0)
            return sorted(gone, key=lambda r: r.version)

    # --- reads ----------------------------------------------------------------------------------

    @staticmethod
    def _get(c, adapter_id: str, version: int) -> AdapterRecord | None:
        r = c.execute(f"SELECT {_COLUMNS}, {_PUBLIC} FROM versions WHERE adapter_id=%s AND version=%s",
                      (adapter_id, version)).fetchone()
        return _row(r) if r else None

    def get(self, adapter_id: str, version: int = 0) -> AdapterRecord | None:
        with self._conn() as c:
            if version == 0:
                r = c.execute(f"SELECT {', '.join('v.' + x.strip() for x in _COLUMNS.split(','))}, i.public "
                              "FROM ids i JOIN versions v ON v.adapter_id=i.adapter_id AND "
                              "v.version=i.latest WHERE i.adapter_id=%s", (adapter_id,)).fetchone()
                return _row(r) if r else None
            return self._get(c, adapter_id, version)

    def list_latest(self, limit: int, after_id: str = "", base_model: str = "",
                    labels: dict[str, str] | None = None) -> list[AdapterRecord]:
        sql = [f"SELECT {', '.join('v.' + c.strip() for c in _COLUMNS.split(','))}, i.public FROM ids i "
               "JOIN versions v ON v.adapter_id=i.adapter_id AND v.version=i.latest "
               "WHERE i.adapter_id > %s"]
        args: list = [after_id]
        if base_model:
            sql.append("AND v.base_model = %s")
            args.append(base_model)
        for k, val in (labels or {}).items():
            sql.append("AND EXISTS (SELECT 1 FROM labels l WHERE l.adapter_id=v.adapter_id "
                       "AND l.version=v.version AND l.key=%s AND l.value=%s)")
            args += [k, val]
        sql.append("ORDER BY i.adapter_id LIMIT %s")
        args.append(limit)
        with self._conn() as c:
            return [_row(r) for r in c.execute(" ".join(sql), args)]

    def set_public(self, adapter_id: str, public: bool) -> bool:
        with self._tx() as c:
            return c.execute("UPDATE ids SET public=%s WHERE adapter_id=%s AND latest IS NOT NULL",
                             (bool(public), adapter_id)).rowcount > 0

    def unreferenced(self, sha256s: set[str]) -> set[str]:
        if not sha256s:
            return set()
        with self._conn() as c:
            used = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM blob_refs WHERE "
                                            "sha256 = ANY(%s)", (list(sha256s),))}
        return set(sha256s) - used

    def referenced(self) -> set[str]:
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM blob_refs")}

    def stats(self) -> StoreStats:
        with self._conn() as c:
            ids = c.execute("SELECT count(*) FROM ids WHERE latest IS NOT NULL").fetchone()[0]
            versions = c.execute("SELECT count(*) FROM versions").fetchone()[0]
            size = c.execute("SELECT coalesce(sum(size), 0) FROM (SELECT sha256, max(size) AS size "
                             "FROM blob_refs GROUP BY sha256) s").fetchone()[0]
        return StoreStats(adapters=ids, versions=versions, blob_bytes=int(size))

    def last_change(self) -> int:
        with self._conn() as c:
            return c.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def prune_changes(self, before: float) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM changes WHERE created_at < %s AND seq < "
                             "(SELECT max(seq) FROM changes)", (before,)).rowcount

    def changes_after(self, seq: int, limit: int = 1000) -> list[Change]:
        with self._conn() as c:
            return [Change(*r) for r in c.execute(
                "SELECT seq, kind, adapter_id, version, latest_version FROM changes WHERE seq > %s "
                "ORDER BY seq LIMIT %s", (seq, limit))]
