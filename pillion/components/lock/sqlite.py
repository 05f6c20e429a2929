"""The `lock.sqlite` store: locks in one SQLite file that every sidecar on the host shares."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pillion.components.lock.api import Feature, LockError, LockStore, UnlockStatus
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.sqlitebusy import retry_busy

T = TypeVar("T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SQLiteLockMetadata:
    """`lock.sqlite` metadata, named as `state.sqlite` names the same settings."""

    connection_string: str = field(
        default="", metadata={"name": "connectionString", "aliases": ("databaseFile",)}
    )
    table_name: str = field(default="locks", metadata={"name": "tableName"})
    # How long init may wait for another process that holds the database while setting up.
    timeout: Seconds = field(
        default=Seconds(20), metadata={"name": "timeout", "aliases": ("timeoutInSeconds",)}
    )
    # How long one lock operation may wait for another process's write to finish.
    busy_timeout: Seconds = field(default=Seconds(2), metadata={"name": "busyTimeout"})
    # Expired locks are taken over in place; rows of locks nobody asks for again are deleted
    # at most this often (0 = never).
    cleanup_interval: Seconds = field(
        default=Seconds(3600),
        metadata={"name": "cleanupInterval", "aliases": ("cleanupIntervalInSeconds",)},
    )
    disable_wal: bool = field(default=False, metadata={"name": "disableWAL"})

    def validate(self) -> None:
        if not self.connection_string.strip():
            raise ComponentConfigError("connectionString", "is required (a file path or URI)")
        if _IDENTIFIER.fullmatch(self.table_name) is None:
            raise ComponentConfigError(
                "tableName",
                f"{self.table_name!r} is not a valid table name (letters, digits and _ only)",
            )
        if self.timeout <= 0:
            raise ComponentConfigError("timeout", "must be positive")
        if self.busy_timeout < 0:
            raise ComponentConfigError("busyTimeout", "must not be negative")
        if self.cleanup_interval < 0:
            raise ComponentConfigError("cleanupInterval", "must not be negative (0 disables it)")


class SQLiteLockStore(LockStore):
    """Locks as rows (resource, owner, expires) of a table in a SQLite file.

    Every operation is one short `BEGIN IMMEDIATE` transaction run inline on the event loop:
    acquiring inserts the row, or takes over a row whose expiry has passed; unlocking deletes
    the row only when the caller owns it. The connection never waits inside SQLite (busy
    timeout 0): when another sidecar holds the write lock, the operation is retried with
    asyncio sleeps for up to `busyTimeout`.
    """

    def __init__(self) -> None:
        self.meta: SQLiteLockMetadata | None = None
        self._conn: sqlite3.Connection | None = None
        self._sql: dict[str, str] = {}
        self._schema: tuple[str, ...] = ()
        self._next_cleanup = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(SQLiteLockMetadata, info.properties)
        meta.validate()
        self.meta = meta
        self._schema, self._sql = _statements(meta.table_name)
        target = meta.connection_string.strip()
        try:
            # Autocommit mode: this class issues BEGIN/COMMIT itself. timeout=0: never sleep
            # inside SQLite while holding up the event loop.
            self._conn = sqlite3.connect(
                target, timeout=0, isolation_level=None, uri=target.startswith("file:")
            )
        except sqlite3.Error as exc:
            raise LockError(f"sqlite open {target!r}: {exc}") from exc
        try:
            await self._retry(self._setup, meta.timeout, "set up the database")
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _setup(self) -> None:
        conn, meta = self._require(), self._meta()
        if not meta.disable_wal:
            # WAL: readers in other sidecars are not blocked by a writer.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        self._in_transaction(lambda: [conn.execute(s) for s in self._schema])

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def features(self) -> frozenset[Feature]:
        return frozenset()

    # -- operations --------------------------------------------------------------------------

    async def try_lock(self, resource_id: str, lock_owner: str, expiry_seconds: int) -> bool:
        conn = self._require()

        def acquire() -> bool:
            now = time.time()
            won = conn.execute(
                self._sql["acquire"], (resource_id, lock_owner, now + expiry_seconds, now)
            ).rowcount
            interval = self._meta().cleanup_interval
            if interval and now >= self._next_cleanup:
                conn.execute(self._sql["cleanup"], (now,))
                self._next_cleanup = now + interval
            return won == 1

        return await self._retry(
            lambda: self._in_transaction(acquire),
            self._meta().busy_timeout,
            f"lock {resource_id!r}",
        )

    async def unlock(self, resource_id: str, lock_owner: str) -> UnlockStatus:
        conn = self._require()

        def release() -> UnlockStatus:
            row = conn.execute(self._sql["get"], (resource_id,)).fetchone()
            if row is None:
                return UnlockStatus.LOCK_DOES_NOT_EXIST
            owner, expires = row
            if expires <= time.time():
                # Expired: nobody holds it any more; the row goes now rather than at cleanup.
                conn.execute(self._sql["delete"], (resource_id,))
                return UnlockStatus.LOCK_DOES_NOT_EXIST
            if owner != lock_owner:
                return UnlockStatus.LOCK_BELONGS_TO_OTHERS
            conn.execute(self._sql["delete"], (resource_id,))
            return UnlockStatus.SUCCESS

        return await self._retry(
            lambda: self._in_transaction(release),
            self._meta().busy_timeout,
            f"unlock {resource_id!r}",
        )

    # -- helpers -----------------------------------------------------------------------------

    def _in_transaction(self, fn: Callable[[], T]) -> T:
        """`fn` inside BEGIN IMMEDIATE ... COMMIT; rolled back if anything fails."""
        conn = self._require()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    async def _retry(self, fn: Callable[[], T], budget: float, what: str) -> T:
        return await retry_busy(fn, budget, what, LockError)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LockError("lock.sqlite store is not initialised or already closed")
        return self._conn

    def _meta(self) -> SQLiteLockMetadata:
        if self.meta is None:
            raise LockError("lock.sqlite store is not initialised")
        return self.meta


def _statements(table: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The schema and the statements; `table` is a validated plain identifier."""
    schema = (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "resource TEXT PRIMARY KEY NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL"
        ") WITHOUT ROWID",
        f"CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires)",
    )
    return schema, {
        # Insert, or take over a lock whose expiry has passed; one row changes iff we won.
        "acquire": (
            f"INSERT INTO {table} (resource, owner, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (resource) DO UPDATE SET owner = excluded.owner, "
            f"expires = excluded.expires WHERE {table}.expires <= ?"
        ),
        "get": f"SELECT owner, expires FROM {table} WHERE resource = ?",
        "delete": f"DELETE FROM {table} WHERE resource = ?",
        "cleanup": f"DELETE FROM {table} WHERE expires <= ?",
    }
