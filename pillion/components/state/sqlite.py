"""The `state.sqlite` store: inline reads and group-committed writes on one SQLite connection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.sqlitebusy import is_busy, retry_busy
from pillion.components.state.api import (
    BulkGetItem,
    Concurrency,
    DeleteRequest,
    ETagMismatch,
    Feature,
    GetRequest,
    GetResponse,
    InvalidQuery,
    Operation,
    QueryItem,
    QueryResponse,
    SetRequest,
    StateError,
    StateStore,
)
from pillion.components.state.query import Compare, Filter, In, Logical, SortKey, parse_query
from pillion.components.state.ttl import RandomETags, expiry_metadata, parse_ttl

log = logging.getLogger(__name__)

T = TypeVar("T")

_FEATURES = frozenset({Feature.ETAG, Feature.TRANSACTIONAL, Feature.TTL, Feature.QUERY_API})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SCHEMA_VERSION = 1
# Keys per `IN (...)` of a bulk get: under the 999-variable limit of older SQLite builds.
_BULK_CHUNK = 500
# Expired rows deleted per cleanup transaction, so a large purge never holds the loop for long.
_CLEANUP_CHUNK = 1000
# Writes committed per transaction at most; a few milliseconds of work.
_MAX_BATCH = 1000
# SQLITE_BUSY and SQLITE_LOCKED: another connection holds the lock we need.


@dataclass(frozen=True)
class SQLiteMetadata:
    """Dapr's `state.sqlite` metadata."""

    connection_string: str = field(
        default="", metadata={"name": "connectionString", "aliases": ("databaseFile",)}
    )
    table_name: str = field(default="state", metadata={"name": "tableName"})
    metadata_table_name: str = field(default="metadata", metadata={"name": "metadataTableName"})
    timeout: Seconds = field(
        default=Seconds(20), metadata={"name": "timeout", "aliases": ("timeoutInSeconds",)}
    )
    busy_timeout: Seconds = field(default=Seconds(2), metadata={"name": "busyTimeout"})
    cleanup_interval: Seconds = field(
        default=Seconds(3600),
        metadata={"name": "cleanupInterval", "aliases": ("cleanupIntervalInSeconds",)},
    )
    disable_wal: bool = field(default=False, metadata={"name": "disableWAL"})

    def validate(self) -> None:
        if not self.connection_string.strip():
            raise ComponentConfigError("connectionString", "is required (a file path or URI)")
        for name, value in (
            ("tableName", self.table_name),
            ("metadataTableName", self.metadata_table_name),
        ):
            if _IDENTIFIER.fullmatch(value) is None:
                raise ComponentConfigError(
                    name, f"{value!r} is not a valid table name (letters, digits and _ only)"
                )
        if self.table_name.lower() == self.metadata_table_name.lower():
            raise ComponentConfigError("metadataTableName", "must differ from tableName")
        if self.timeout <= 0:
            raise ComponentConfigError("timeout", "must be positive")
        if self.busy_timeout < 0:
            raise ComponentConfigError("busyTimeout", "must not be negative")


def _error(what: str, exc: sqlite3.Error) -> StateError:
    return StateError(f"sqlite {what}: {exc}")


# Unit kinds in the write queue.
_SET, _DELETE, _MULTI = 0, 1, 2


class _Unit:
    """One queued write (a set, a delete or a whole transaction) and its caller's future."""

    __slots__ = ("enqueued", "future", "kind", "payload", "ttls")

    def __init__(
        self,
        kind: int,
        payload: Any,
        ttls: Any,
        future: asyncio.Future[None],
        enqueued: float,
    ) -> None:
        self.kind = kind
        self.payload = payload
        self.ttls = ttls
        self.future = future
        self.enqueued = enqueued


class SQLiteStateStore(StateStore):
    """State in a SQLite file that several sidecar processes may share.

    Reads run inline on the event loop: a point SELECT costs microseconds, far less than a hop to
    a thread. Writes queue up and the first one schedules a flush on the next loop iteration;
    the flush commits everything queued in one transaction, so a burst of concurrent writes
    costs one commit. The connection never blocks on another process's lock: SQLite's busy
    timeout is 0 and waiting happens as loop-friendly retries within `busyTimeout`.
    """

    def __init__(self) -> None:
        self.meta: SQLiteMetadata | None = None
        # Write transactions committed; lets tests and benchmarks see how well writes group.
        self.commits = 0
        # Times a flush found another connection holding the write lock and retried later.
        self.lock_waits = 0
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[_Unit] = []
        self._flush_handle: asyncio.Handle | None = None
        self._busy_attempts = 0
        self._etags = RandomETags()
        self._cleanup_task: asyncio.Task[None] | None = None
        self._sql: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(SQLiteMetadata, info.properties)
        meta.validate()
        self.meta = meta
        self._loop = asyncio.get_running_loop()
        self._sql = _statements(meta.table_name, meta.metadata_table_name)
        target = meta.connection_string.strip()
        try:
            # Autocommit mode (isolation_level=None): this class issues BEGIN/COMMIT itself.
            # timeout=0: never sleep inside SQLite while holding up the event loop.
            self._conn = sqlite3.connect(
                target, timeout=0, isolation_level=None, uri=target.startswith("file:")
            )
        except sqlite3.Error as exc:
            raise _error(f"open {target!r}", exc) from exc
        try:
            await self._retry_busy(self._setup, meta.timeout, "set up the database")
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        if meta.cleanup_interval > 0:
            self._cleanup_task = self._loop.create_task(
                self._cleanup_forever(meta.cleanup_interval),
                name=f"state.sqlite cleanup {info.name}",
            )

    def _setup(self) -> None:
        conn, meta = self._require(), self._meta()
        if not meta.disable_wal:
            # WAL lets readers in other processes proceed while one writes; NORMAL sync is
            # durable across application crashes, and WAL keeps the database consistent on power
            # loss. Switching needs a lock, hence the retries around _setup.
            # An in-memory database answers "memory" here, which is fine.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        # BEGIN IMMEDIATE serialises set-up across sidecars opening the same file at once.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in self._sql["schema"].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(self._sql["meta_init"], ("schema-version", str(SCHEMA_VERSION)))
            row = conn.execute(self._sql["meta_get"], ("schema-version",)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version = int(row[0]) if row and str(row[0]).isdigit() else -1
        if version != SCHEMA_VERSION:
            found = row[0] if row else None
            raise StateError(
                f"table {meta.metadata_table_name!r} records schema version {found}, "
                f"this pillion understands {SCHEMA_VERSION}"
            )

    async def close(self) -> None:
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
            self._cleanup_task = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._queue and self._conn is not None:
            # Commit what callers already handed us rather than dropping it.
            self._busy_attempts = 0
            self._flush(final=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    def max_ops(self) -> int:
        return 0

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, req: GetRequest) -> GetResponse | None:
        conn = self._require()
        args = (req.key, time.time())
        try:
            row = conn.execute(self._sql["get"], args).fetchone()
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise _error(f"get {req.key!r}", exc) from exc
            row = await self._retry_busy(
                lambda: conn.execute(self._sql["get"], args).fetchone(),
                self._meta().busy_timeout,
                f"get {req.key!r}",
            )
        if row is None:
            return None
        return GetResponse(row[0], row[1], expiry_metadata(row[2]))

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        keys = list(dict.fromkeys(r.key for r in reqs))
        found: dict[str, tuple[bytes, str, float | None]] = {}
        now = time.time()
        for start in range(0, len(keys), _BULK_CHUNK):
            chunk = keys[start : start + _BULK_CHUNK]
            sql = self._sql["bulk_get"].format(marks=",".join("?" * len(chunk)))
            rows = await self._read(functools.partial(self._fetchall, sql, (now, *chunk)))
            for key, value, etag, expire in rows:
                found[key] = (value, etag, expire)
        out: list[BulkGetItem] = []
        for r in reqs:
            hit = found.get(r.key)
            if hit is None:
                out.append(BulkGetItem(r.key))
            else:
                out.append(BulkGetItem(r.key, hit[0], hit[1], expiry_metadata(hit[2])))
        return out

    def _fetchall(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._require().execute(sql, args).fetchall()

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise _error("read", exc) from exc
        return await self._retry_busy(fn, self._meta().busy_timeout, "read")

    async def _retry_busy(self, fn: Callable[[], T], budget: float, what: str) -> T:
        return await retry_busy(fn, budget, what, StateError)

    # -- query -------------------------------------------------------------------------------

    async def query(
        self, q: Mapping[str, Any] | bytes | str, metadata: Mapping[str, str]
    ) -> QueryResponse:
        """Dapr's state query language over the JSON values of live rows.

        Filters compare typed JSON (`{"EQ": {"n": 5}}` matches 5 and 5.0, not "5"); sorting
        orders by JSON type as PostgreSQL's jsonb does, then by value, then by key; the page
        token is the offset of the next page. Values that are not JSON are never returned.
        """
        query = parse_query(q)
        where = _QuerySQL()
        cond = where.filter(query.filter) if query.filter is not None else "1"
        order = _QuerySQL()
        sort = order.sort(query.sort)
        t = f'"{self._meta().table_name}"'
        # The subquery names the row's JSON text; NULL (matching nothing) unless it is valid
        # JSON without NUL bytes, so json_extract never sees anything else.
        text = (
            f"SELECT key, value, etag FROM (SELECT key, value, etag, CASE WHEN "
            "instr(value, x'00') = 0 AND json_valid(CAST(value AS TEXT)) "
            f"THEN CAST(value AS TEXT) END AS doc FROM {t} "
            "WHERE expiration_time IS NULL OR expiration_time > ?) "
            f"WHERE doc IS NOT NULL AND {cond} ORDER BY {sort}key LIMIT ? OFFSET ?"
        )
        params = (
            time.time(),
            *where.params,
            *order.params,
            query.limit or -1,
            query.offset,
        )
        rows = await self._read(functools.partial(self._fetchall, text, params))
        results = [QueryItem(key, bytes(value), etag) for key, value, etag in rows]
        return QueryResponse(results, query.next_token(len(results)))

    # -- writes ------------------------------------------------------------------------------

    async def set(self, req: SetRequest) -> None:
        # TTL errors belong to the caller alone, so they are raised before joining a batch.
        await self._submit(_SET, req, parse_ttl(req.metadata) if req.metadata else None)

    async def delete(self, req: DeleteRequest) -> None:
        await self._submit(_DELETE, req, None)

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        if not ops:
            return
        ttls: list[int | None] = []
        for op in ops:
            if isinstance(op, SetRequest):
                ttls.append(parse_ttl(op.metadata) if op.metadata else None)
            elif isinstance(op, DeleteRequest):
                ttls.append(None)
            else:
                raise ValueError(f"unsupported transaction operation {op!r}")
        await self._submit(_MULTI, tuple(ops), ttls)

    def _submit(self, kind: int, payload: Any, ttls: Any) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None or self._conn is None:
            raise StateError("state store is not open")
        fut = loop.create_future()
        self._queue.append(_Unit(kind, payload, ttls, fut, loop.time()))
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return fut

    def _flush(self, final: bool = False) -> None:
        """Apply every queued unit in one transaction, then settle their futures."""
        self._flush_handle = None
        queue = self._queue
        if len(queue) > _MAX_BATCH and not final:
            # Bound how long one flush holds the loop; the rest go on the next iteration.
            self._queue = queue[_MAX_BATCH:]
            queue = queue[:_MAX_BATCH]
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)
        else:
            self._queue = []
        units = [u for u in queue if not u.future.done()]  # done: the caller gave up
        if not units:
            return
        try:
            self._flush_units(units, final)
        except BaseException as exc:
            # A bug here must not leave callers awaiting forever.
            conn = self._conn
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for u in units:
                _settle(u, StateError(f"sqlite write failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise

    def _flush_units(self, units: list[_Unit], final: bool) -> None:
        conn, meta = self._require(), self._meta()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if is_busy(exc) and not final:
                self._requeue_busy(units, exc)
            else:
                for u in units:
                    _settle(u, _error("begin write transaction", exc))
            return
        self._busy_attempts = 0

        now = time.time()
        outcomes: list[BaseException | None] = []
        for u in units:
            try:
                if u.kind == _SET:
                    self._apply_set(conn, u.payload, u.ttls, now)
                elif u.kind == _DELETE:
                    self._apply_delete(conn, u.payload, now)
                else:
                    self._apply_multi(conn, u.payload, u.ttls, now)
                outcomes.append(None)
            except StateError as exc:
                outcomes.append(exc)
            except sqlite3.Error as exc:
                outcomes.append(_error("write", exc))
                if not conn.in_transaction:
                    # Some errors (disk full, I/O) make SQLite roll the whole transaction back,
                    # taking the units already applied with it.
                    for i, prior in enumerate(outcomes):
                        if prior is None:
                            outcomes[i] = _error("write (transaction rolled back)", exc)
                    outcomes.extend(
                        _error("write (transaction rolled back)", exc)
                        for _ in units[len(outcomes) :]
                    )
                    break

        if conn.in_transaction:
            try:
                self._commit(conn, meta)
                self.commits += 1
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                failure = _error("commit", exc)
                outcomes = [failure if o is None else o for o in outcomes]
        for u, outcome in zip(units, outcomes, strict=True):
            _settle(u, outcome)

    def _commit(self, conn: sqlite3.Connection, meta: SQLiteMetadata) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # In WAL mode the writer already holds every lock it needs; only a rollback journal
            # waits at COMMIT for readers to leave. Wait inline then: the transaction is open,
            # and yielding to the loop would let reads see uncommitted rows.
            if not is_busy(exc) or not conn.in_transaction:
                raise
            conn.execute(f"PRAGMA busy_timeout={int(meta.busy_timeout * 1000)}")
            try:
                conn.execute("COMMIT")
            finally:
                conn.execute("PRAGMA busy_timeout=0")

    def _requeue_busy(self, units: list[_Unit], exc: sqlite3.Error) -> None:
        """Another process holds the write lock: fail units that waited too long, retry the rest."""
        loop, budget = self._loop, self._meta().busy_timeout
        assert loop is not None
        now = loop.time()
        waiting = []
        for u in units:
            if now - u.enqueued >= budget:
                _settle(u, _error(f"write (waited {budget:g}s for the lock)", exc))
            else:
                waiting.append(u)
        if not waiting:
            self._busy_attempts = 0
            return
        self._queue[:0] = waiting
        self.lock_waits += 1
        delay = min(0.0005 * (2**self._busy_attempts), 0.02)
        self._busy_attempts += 1
        if self._flush_handle is None:
            self._flush_handle = loop.call_later(delay, self._flush)

    def _apply_set(
        self, conn: sqlite3.Connection, req: SetRequest, ttl: int | None, now: float
    ) -> None:
        expire = None if ttl is None else now + ttl
        etag = self._etags.next()
        sql = self._sql
        if req.concurrency == Concurrency.LAST_WRITE or (
            not req.etag and req.concurrency != Concurrency.FIRST_WRITE
        ):
            conn.execute(sql["upsert"], (req.key, req.value, etag, expire, now))
        elif req.etag:
            cur = conn.execute(
                sql["update_if"], (req.value, etag, expire, now, req.key, req.etag, now)
            )
            if cur.rowcount == 0:
                raise ETagMismatch(f"etag mismatch for key {req.key!r}")
        else:
            cur = conn.execute(sql["insert_new"], (req.key, req.value, etag, expire, now, now))
            if cur.rowcount == 0:
                raise ETagMismatch(f"key {req.key!r} already exists (first-write)")

    def _apply_delete(self, conn: sqlite3.Connection, req: DeleteRequest, now: float) -> None:
        if req.etag and req.concurrency != Concurrency.LAST_WRITE:
            cur = conn.execute(self._sql["delete_if"], (req.key, req.etag, now))
            if cur.rowcount == 0:
                raise ETagMismatch(f"etag mismatch for key {req.key!r}")
        else:
            conn.execute(self._sql["delete"], (req.key,))

    def _apply_multi(
        self,
        conn: sqlite3.Connection,
        ops: Sequence[Operation],
        ttls: Sequence[int | None],
        now: float,
    ) -> None:
        # A savepoint scopes the rollback to this transaction; the rest of the batch stays.
        conn.execute("SAVEPOINT unit")
        try:
            for op, ttl in zip(ops, ttls, strict=True):
                if isinstance(op, SetRequest):
                    self._apply_set(conn, op, ttl, now)
                else:
                    self._apply_delete(conn, op, now)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
            raise
        conn.execute("RELEASE unit")

    # -- expiry ------------------------------------------------------------------------------

    async def _cleanup_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.cleanup_expired()
            except StateError as exc:
                log.warning("state.sqlite: purging expired rows failed: %s", exc)

    async def cleanup_expired(self) -> int:
        """Delete expired rows unless another process did so within the cleanup interval.

        Returns how many rows went; 0 also when the database was busy (the next round retries).
        """
        conn, meta = self._require(), self._meta()
        now = time.time()
        # The last-cleanup row makes sidecars sharing the file take turns; the 0.9 slack keeps a
        # process whose timer fires a little early from skipping its own turn.
        claimed = self._cleanup_txn(
            lambda: (
                conn.execute(
                    self._sql["claim_cleanup"],
                    ("last-cleanup", repr(now), now - 0.9 * meta.cleanup_interval),
                ).rowcount
            )
        )
        if not claimed:
            return 0
        total = 0
        while True:
            n = self._cleanup_txn(
                lambda: conn.execute(self._sql["purge"], (time.time(), _CLEANUP_CHUNK)).rowcount
            )
            if n is None:
                break
            total += n
            if n < _CLEANUP_CHUNK:
                break
            await asyncio.sleep(0)  # let requests through between chunks
        if total:
            log.debug("state.sqlite: purged %d expired rows", total)
        return total

    def _cleanup_txn(self, fn: Callable[[], int]) -> int | None:
        """Run `fn` in its own write transaction; None when another process holds the lock."""
        conn = self._require()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if is_busy(exc):
                return None
            raise _error("cleanup", exc) from exc
        try:
            n = fn()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if is_busy(exc):
                return None
            raise _error("cleanup", exc) from exc
        return n

    # -- helpers ----------------------------------------------------------------------------

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError("state store is not open")
        return self._conn

    def _meta(self) -> SQLiteMetadata:
        assert self.meta is not None
        return self.meta


def _settle(u: _Unit, outcome: BaseException | None) -> None:
    if u.future.done():
        return
    if outcome is None:
        u.future.set_result(None)
    else:
        u.future.set_exception(outcome)


# json_type's names for numbers, and the rank of each JSON type in PostgreSQL's jsonb order.
_NUMBER = "('integer', 'real')"
_TYPE_RANK = (
    "CASE json_type(doc, ?) WHEN 'null' THEN 0 WHEN 'text' THEN 1 WHEN 'integer' THEN 2 "
    "WHEN 'real' THEN 2 WHEN 'false' THEN 3 WHEN 'true' THEN 3 WHEN 'array' THEN 4 "
    "WHEN 'object' THEN 5 ELSE 6 END"
)
_SQL_OPS = {"EQ": "=", "NEQ": "<>", "GT": ">", "GTE": ">=", "LT": "<", "LTE": "<="}
_INT64 = range(-(2**63), 2**63)


def json_path(path: tuple[str, ...]) -> str:
    """SQLite's JSON path for validated segments: digit-only ones index arrays, others are keys.

    The path is always bound as a parameter; a quote in a segment could still end its label
    early (SQLite has no escape there), so such segments are refused.
    """
    out = ["$"]
    for seg in path:
        if seg.isascii() and seg.isdigit() and len(seg) <= 9:
            out.append(f"[{int(seg)}]")
        elif '"' in seg:
            raise InvalidQuery(f"state.sqlite cannot query a field name containing '\"': {seg!r}")
        else:
            out.append(f'."{seg}"')
    return "".join(out)


class _QuerySQL:
    """Translates a parsed query to SQL over `doc` (the row's JSON text); all values are params."""

    def __init__(self) -> None:
        self.params: list[Any] = []

    def _p(self, *values: Any) -> None:
        self.params.extend(values)

    def equal(self, path: str, v: Any) -> str:
        """True when the value at `path` is the JSON value `v`, False otherwise (never NULL)."""
        if v is None or isinstance(v, bool):
            self._p(path)
            return f"json_type(doc, ?) = '{'null' if v is None else str(v).lower()}'"
        if isinstance(v, str):
            self._p(path, path, v)
            return "(json_type(doc, ?) = 'text' AND json_extract(doc, ?) = ?)"
        if isinstance(v, int | float):
            self._p(path, path, v if not isinstance(v, int) or v in _INT64 else float(v))
            return f"(json_type(doc, ?) IN {_NUMBER} AND json_extract(doc, ?) = ?)"
        # Objects and arrays compare as minified JSON text (so key order matters).
        self._p(path, path, json.dumps(v, separators=(",", ":"), ensure_ascii=False))
        return "(json_type(doc, ?) IN ('object', 'array') AND json_extract(doc, ?) = json(?))"

    def filter(self, f: Filter) -> str:
        if isinstance(f, Logical):
            return "(" + f" {f.op} ".join(self.filter(x) for x in f.filters) + ")"
        path = json_path(f.path)
        if isinstance(f, In):
            return "(" + " OR ".join(self.equal(path, v) for v in f.values) + ")"
        return self.compare(f, path)

    def compare(self, f: Compare, path: str) -> str:
        if f.op == "EQ":
            return self.equal(path, f.value)
        if f.op == "NEQ":
            self._p(path)
            return f"(json_type(doc, ?) IS NOT NULL AND NOT {self.equal(path, f.value)})"
        v = f.value
        self._p(path, path, v if not isinstance(v, int) or v in _INT64 else float(v))
        return f"(json_type(doc, ?) IN {_NUMBER} AND json_extract(doc, ?) {_SQL_OPS[f.op]} ?)"

    def sort(self, items: tuple[SortKey, ...]) -> str:
        """ORDER BY terms, each followed by ", " (the key comes last)."""
        out = []
        for s in items:
            path = json_path(s.path)
            d = "DESC" if s.descending else "ASC"
            self._p(path, path)
            out.append(f"{_TYPE_RANK} {d}, json_extract(doc, ?) {d}, ")
        return "".join(out)


def _statements(table: str, meta_table: str) -> dict[str, str]:
    t, m = f'"{table}"', f'"{meta_table}"'
    live = "(expiration_time IS NULL OR expiration_time > ?)"
    return {
        # A rowid table rather than WITHOUT ROWID: state values can be large, and SQLite advises
        # WITHOUT ROWID only for small rows.
        "schema": f"""
            CREATE TABLE IF NOT EXISTS {t} (
                key TEXT NOT NULL PRIMARY KEY,
                value BLOB NOT NULL,
                etag TEXT NOT NULL,
                expiration_time REAL NULL,
                update_time REAL NOT NULL
            );
            CREATE INDEX IF NOT EXISTS "{table}_expiration" ON {t} (expiration_time)
                WHERE expiration_time IS NOT NULL;
            CREATE TABLE IF NOT EXISTS {m} (
                key TEXT NOT NULL PRIMARY KEY,
                value TEXT NOT NULL
            )
        """,
        "meta_init": f"INSERT OR IGNORE INTO {m} (key, value) VALUES (?, ?)",
        "meta_get": f"SELECT value FROM {m} WHERE key = ?",
        "get": f"SELECT value, etag, expiration_time FROM {t} WHERE key = ? AND {live}",
        "bulk_get": (
            f"SELECT key, value, etag, expiration_time FROM {t} WHERE {live} AND key IN ({{marks}})"
        ),
        "upsert": (
            f"INSERT INTO {t} (key, value, etag, expiration_time, update_time) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "etag = excluded.etag, expiration_time = excluded.expiration_time, "
            "update_time = excluded.update_time"
        ),
        "update_if": (
            f"UPDATE {t} SET value = ?, etag = ?, expiration_time = ?, update_time = ? "
            f"WHERE key = ? AND etag = ? AND {live}"
        ),
        # First-write: insert, or take over a row that has expired (expired counts as absent).
        "insert_new": (
            f"INSERT INTO {t} (key, value, etag, expiration_time, update_time) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "etag = excluded.etag, expiration_time = excluded.expiration_time, "
            "update_time = excluded.update_time "
            "WHERE expiration_time IS NOT NULL AND expiration_time <= ?"
        ),
        "delete_if": f"DELETE FROM {t} WHERE key = ? AND etag = ? AND {live}",
        "delete": f"DELETE FROM {t} WHERE key = ?",
        "claim_cleanup": (
            f"INSERT INTO {m} (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value WHERE CAST(value AS REAL) <= ?"
        ),
        "purge": (
            f"DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} "
            "WHERE expiration_time IS NOT NULL AND expiration_time <= ? LIMIT ?)"
        ),
    }
