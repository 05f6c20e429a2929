"""The `state.postgresql` store: Dapr's v1 table layout, xmin etags and the query API on psycopg."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.state.api import (
    BulkGetItem,
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    Feature,
    GetRequest,
    GetResponse,
    Operation,
    QueryItem,
    QueryResponse,
    SetRequest,
    StateError,
    StateStore,
)
from pillion.components.state.query import Filter, In, Logical, SortKey, parse_query
from pillion.components.state.ttl import expiry_metadata, parse_ttl
from pillion.durations import parse_duration

log = logging.getLogger(__name__)

_FEATURES = frozenset({Feature.ETAG, Feature.TRANSACTIONAL, Feature.TTL, Feature.QUERY_API})

# Dapr's v1 migration level, kept under the "migrations" key of the metadata table: level 1
# created the state table, level 2 added `expiredate`.
SCHEMA_VERSION = 2
_MIGRATIONS_KEY = "migrations"
# Dapr's migration lock: a row that set-up locks with SELECT ... FOR UPDATE.
_LOCK_KEY = "lock"
# Dapr's garbage-collector turn marker: when the last purge of expired rows started.
_LAST_CLEANUP_KEY = "last-cleanup"

# Dapr writes table names into its SQL unquoted, so PostgreSQL folds them to lower case; pillion
# quotes the folded name, which reaches the same table for every name Dapr can use.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
# Dapr's queryExecMode values; the ones that avoid prepared statements disable psycopg's.
_EXEC_MODES = {
    "cache_statement": 0,
    "cache_describe": 5,
    "describe_exec": None,
    "exec": None,
    "simple_protocol": None,
}
# Connection-string parameters pgx (Dapr's driver) understands and libpq would reject.
_PGX_PARAMS = frozenset(
    {
        "pool_max_conns",
        "pool_min_conns",
        "pool_min_idle_conns",
        "pool_max_conn_lifetime",
        "pool_max_conn_lifetime_jitter",
        "pool_max_conn_idle_time",
        "pool_health_check_period",
        "statement_cache_capacity",
        "description_cache_capacity",
        "default_query_exec_mode",
    }
)
# Etags are the row's xmin, a 32-bit transaction id; Dapr parses them as a uint32.
_MAX_XID = 2**32 - 1
# Expired rows deleted per statement, so a large purge never holds many row locks for long.
_CLEANUP_CHUNK = 1000

# -- value encoding ------------------------------------------------------------------------------
# Bytes a JSON text can start with (after optional whitespace).
_JSON_FIRST = frozenset(b' \t\r\n{["-0123456789tfn')
# Values above this size are never marked as JSON; PostgreSQL's jsonb caps out near 256 MiB.
_MAX_JSON_BYTES = 64 * 1024 * 1024
# Longest number literal and largest exponent marked as JSON: far inside PostgreSQL's numeric
# limits (131072 digits before the point, 16383 after).
_MAX_NUMBER_CHARS = 1000
_MAX_EXPONENT = 1000
# What jsonb rejects although Python's json accepts it: \u0000 and unpaired surrogates.
_BAD_JSON_CHARS = re.compile("[\x00\ud800-\udfff]")
# Marks a base64 value as holding JSON. Go's base64 decoder (Dapr), PostgreSQL's decode() and
# Python's b64decode all skip line breaks, so every reader still gets the exact bytes.
_JSON_MARK = "\n"

# SQL fragments shared by the statements.
_LIVE = "(expiredate IS NULL OR expiredate > now())"
_DATA = "CASE WHEN isbinary THEN value #>> '{}' ELSE value::text END"
# The JSON document a row holds, for the query API: Dapr's jsonb rows as they are, pillion's
# marked rows decoded; NULL for other binary rows. CASE keeps the decode away from rows whose
# bytes are not JSON, whatever order the planner evaluates conditions in.
_DOC = (
    "CASE WHEN NOT isbinary THEN value "
    "WHEN right(value #>> '{}', 1) = E'\\n' "
    "THEN convert_from(decode(value #>> '{}', 'base64'), 'UTF8')::jsonb END"
)
_EXPIRE = "now() + %(ttl)s::integer * interval '1 second'"


@dataclass(frozen=True)
class PostgreSQLMetadata:
    """Dapr's `state.postgresql` v1 metadata; `actorStateStore`, `keyPrefix` are the runtime's."""

    connection_string: str = field(
        default="", metadata={"name": "connectionString", "aliases": ("url",)}
    )
    table_name: str = field(default="state", metadata={"name": "tableName"})
    metadata_table_name: str = field(
        default="dapr_metadata", metadata={"name": "metadataTableName"}
    )
    timeout: Seconds = field(
        default=Seconds(20), metadata={"name": "timeout", "aliases": ("timeoutInSeconds",)}
    )
    cleanup_interval: Seconds = field(
        default=Seconds(3600),
        metadata={"name": "cleanupInterval", "aliases": ("cleanupIntervalInSeconds",)},
    )
    max_conns: int = field(default=0, metadata={"name": "maxConns"})
    connection_max_idle_time: Seconds = field(
        default=Seconds(0), metadata={"name": "connectionMaxIdleTime"}
    )
    query_exec_mode: str = field(default="", metadata={"name": "queryExecMode"})
    use_azure_ad: bool = field(default=False, metadata={"name": "useAzureAD"})
    use_aws_iam: bool = field(default=False, metadata={"name": "useAWSIAM"})

    def validate(self) -> None:
        if not self.connection_string.strip():
            raise ComponentConfigError("connectionString", "is required")
        table = _table_parts("tableName", self.table_name)
        meta = _table_parts("metadataTableName", self.metadata_table_name)
        if table == meta:
            raise ComponentConfigError("metadataTableName", "must differ from tableName")
        if self.timeout < 1:
            raise ComponentConfigError("timeout", "must be at least 1s")
        if self.query_exec_mode and self.query_exec_mode not in _EXEC_MODES:
            raise ComponentConfigError(
                "queryExecMode",
                f"{self.query_exec_mode!r} is not one of {', '.join(sorted(_EXEC_MODES))}",
            )
        if self.use_azure_ad:
            raise ComponentConfigError("useAzureAD", "Azure AD authentication is not supported")
        if self.use_aws_iam:
            raise ComponentConfigError("useAWSIAM", "AWS IAM authentication is not supported")


def _table_parts(name: str, value: str) -> tuple[str, ...]:
    """`table` or `schema.table`, folded to lower case as PostgreSQL folds Dapr's unquoted names."""
    parts = tuple(value.strip().split("."))
    if not 1 <= len(parts) <= 2 or any(_IDENTIFIER.fullmatch(p) is None for p in parts):
        raise ComponentConfigError(
            name, f"{value!r} is not a table name (`table` or `schema.table`, letters, digits, _)"
        )
    return tuple(p.lower() for p in parts)


# -- connection strings ---------------------------------------------------------------------------


@dataclass
class _PoolOptions:
    """Pool settings a pgx connection string carried (`pool_max_conns=...`)."""

    max_size: int | None = None
    min_size: int | None = None
    max_idle: float | None = None
    max_lifetime: float | None = None
    exec_mode: str | None = None


def _split_conninfo(raw: str) -> tuple[str, _PoolOptions]:
    """A libpq connection string from Dapr's (pgx's) one, and the pgx-only settings it held."""
    raw = raw.strip()
    if raw.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(raw)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        pgx = {k: v for k, v in pairs if k in _PGX_PARAMS}
        if not pgx:
            return raw, _PoolOptions()
        query = urlencode([(k, v) for k, v in pairs if k not in _PGX_PARAMS])
        return urlunsplit(parts._replace(query=query)), _pool_options(pgx)
    pairs = _parse_keyword_conninfo(raw)
    pgx = {k: v for k, v in pairs if k in _PGX_PARAMS}
    if not pgx:
        return raw, _PoolOptions()
    rest = {k: v for k, v in pairs if k not in _PGX_PARAMS}
    try:
        return psycopg.conninfo.make_conninfo("", **rest), _pool_options(pgx)
    except psycopg.Error as exc:
        raise ComponentConfigError("connectionString", str(exc)) from exc


def _parse_keyword_conninfo(raw: str) -> list[tuple[str, str]]:
    """`key=value` pairs of a libpq keyword/value string (values may be single-quoted)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(raw)
    while True:
        while i < n and raw[i].isspace():
            i += 1
        if i >= n:
            return out
        start = i
        while i < n and raw[i] != "=" and not raw[i].isspace():
            i += 1
        key = raw[start:i]
        while i < n and raw[i].isspace():
            i += 1
        if not key or i >= n or raw[i] != "=":
            raise ComponentConfigError("connectionString", f'missing "=" after {key!r}')
        i += 1
        while i < n and raw[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and raw[i] == "'":
            i += 1
            while i < n and raw[i] != "'":
                if raw[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(raw[i])
                i += 1
            if i >= n:
                raise ComponentConfigError("connectionString", "unterminated quoted value")
            i += 1
        else:
            while i < n and not raw[i].isspace():
                if raw[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(raw[i])
                i += 1
        out.append((key, "".join(value)))


def _pool_options(pgx: Mapping[str, str]) -> _PoolOptions:
    opts = _PoolOptions()
    try:
        if "pool_max_conns" in pgx:
            opts.max_size = int(pgx["pool_max_conns"])
        if "pool_min_conns" in pgx:
            opts.min_size = int(pgx["pool_min_conns"])
        if "pool_max_conn_idle_time" in pgx:
            opts.max_idle = parse_duration(pgx["pool_max_conn_idle_time"])
        if "pool_max_conn_lifetime" in pgx:
            opts.max_lifetime = parse_duration(pgx["pool_max_conn_lifetime"])
    except ValueError as exc:
        raise ComponentConfigError("connectionString", f"pool setting: {exc}") from exc
    mode = pgx.get("default_query_exec_mode")
    if mode is not None:
        if mode not in _EXEC_MODES:
            raise ComponentConfigError(
                "connectionString", f"default_query_exec_mode {mode!r} is not supported"
            )
        opts.exec_mode = mode
    return opts


# -- values ------------------------------------------------------------------------------------


class _NotJSONB(ValueError):
    """Python's json would take the text, PostgreSQL's jsonb might not."""


def _reject_constant(name: str) -> Any:
    raise _NotJSONB(name)


def _check_number(literal: str) -> None:
    if len(literal) > _MAX_NUMBER_CHARS or not literal.isascii():
        raise _NotJSONB(literal[:20])
    e = literal.find("e")
    if e < 0:
        e = literal.find("E")
    if e >= 0 and abs(int(literal[e + 1 :])) > _MAX_EXPONENT:
        raise _NotJSONB(literal[:20])


def is_jsonb_text(data: bytes) -> bool:
    """Whether `data` is UTF-8 JSON that PostgreSQL's jsonb is certain to accept.

    Conservative: a False for valid JSON only means the query API will not see the value.
    """
    if not data or len(data) > _MAX_JSON_BYTES or data[0] not in _JSON_FIRST:
        return False
    try:
        text = data.decode("utf-8")
        doc = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_check_number,
            parse_float=_check_number,
        )
    except (ValueError, RecursionError):
        return False
    # Raw text cannot hold NUL or surrogates (UTF-8 and JSON rule them out); only escapes can.
    return "\\u" not in text or _strings_ok(doc)


def _strings_ok(doc: Any) -> bool:
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _BAD_JSON_CHARS.search(v):
                return False
        elif isinstance(v, dict):
            for k, x in v.items():
                if _BAD_JSON_CHARS.search(k):
                    return False
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return True


def encode_value(data: bytes, mark_json: bool = True) -> str:
    """The base64 text stored (as a jsonb string, isbinary=true) for `data`."""
    text = base64.b64encode(data).decode("ascii")
    return text + _JSON_MARK if mark_json and is_jsonb_text(data) else text


def decode_value(text: str, isbinary: bool) -> bytes:
    """The bytes a row holds: base64 for binary rows, the jsonb text for Dapr's JSON rows."""
    if not isbinary:
        return text.encode("utf-8")
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError) as exc:
        raise StateError(f"stored value is not valid base64: {exc}") from exc


# -- query API ---------------------------------------------------------------------------------


_COMPARISONS = {"EQ": "=", "NEQ": "<>", "GT": ">", "GTE": ">=", "LT": "<", "LTE": "<="}


class _QueryBuilder:
    """Translates a parsed query to SQL over the row's JSON document, all values as params."""

    def __init__(self) -> None:
        self.params: list[Any] = []

    def path(self, path: tuple[str, ...]) -> str:
        self.params.append(list(path))
        return "(doc #> %s::text[])"

    def value(self, v: Any) -> str:
        self.params.append(json.dumps(v, allow_nan=False))
        return "%s::jsonb"

    def filter(self, f: Filter) -> str:
        if isinstance(f, Logical):
            return "(" + f" {f.op} ".join(self.filter(x) for x in f.filters) + ")"
        if isinstance(f, In):
            path = self.path(f.path)
            self.params.append([json.dumps(x, allow_nan=False) for x in f.values])
            return f"{path} = ANY(%s::jsonb[])"
        if f.op in ("EQ", "NEQ"):
            path = self.path(f.path)
            return f"{path} {_COMPARISONS[f.op]} {self.value(f.value)}"
        # jsonb orders values of different types by type; compare numbers with numbers only.
        typed = f"jsonb_typeof({self.path(f.path)}) = 'number'"
        return f"({typed} AND {self.path(f.path)} {_COMPARISONS[f.op]} {self.value(f.value)})"

    def sort(self, items: tuple[SortKey, ...]) -> str:
        return ", ".join(f"{self.path(s.path)} {'DESC' if s.descending else 'ASC'}" for s in items)


# -- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Write:
    """One planned statement; `conflict` is the ETagMismatch message when no row may change."""

    sql: str
    params: Mapping[str, Any]
    conflict: str | None


class _Statements:
    def __init__(self, table: tuple[str, ...], meta: tuple[str, ...]) -> None:
        t = psycopg.sql.Identifier(*table).as_string()
        m = psycopg.sql.Identifier(*meta).as_string()
        self.table = t
        self.meta = m
        self.create_meta = (
            f"CREATE TABLE IF NOT EXISTS {m} (key text NOT NULL PRIMARY KEY, value text NOT NULL)"
        )
        self.insert_lock = (
            f"INSERT INTO {m} (key, value) VALUES (%s, 'lock') ON CONFLICT (key) DO NOTHING"
        )
        self.take_lock = f"SELECT value FROM {m} WHERE key = %s FOR UPDATE"
        self.meta_get = f"SELECT value FROM {m} WHERE key = %s"
        self.meta_set = (
            f"INSERT INTO {m} (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        self.create_table = (
            f"CREATE TABLE IF NOT EXISTS {t} ("
            "key text NOT NULL PRIMARY KEY, value jsonb NOT NULL, isbinary boolean NOT NULL, "
            "insertdate TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(), "
            "updatedate TIMESTAMP WITH TIME ZONE NULL, expiredate TIMESTAMP WITH TIME ZONE NULL)"
        )
        self.add_expiredate = (
            f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS expiredate TIMESTAMP WITH TIME ZONE"
        )
        self.columns = (
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
        )
        self.get = (
            f"SELECT {_DATA}, isbinary, xmin::text, expiredate FROM {t} WHERE key = %s AND {_LIVE}"
        )
        self.bulk_get = (
            f"SELECT key, {_DATA}, isbinary, xmin::text, expiredate FROM {t} "
            f"WHERE key = ANY(%s) AND {_LIVE}"
        )
        upsert = (
            f"INSERT INTO {t} AS s (key, value, isbinary, expiredate) "
            f"VALUES (%(key)s, to_jsonb(%(value)s::text), true, {_EXPIRE}) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "isbinary = excluded.isbinary, updatedate = now(), expiredate = excluded.expiredate"
        )
        self.upsert = upsert
        # First-write: insert, or take over a row that has expired (expired counts as absent).
        self.insert_new = upsert + " WHERE s.expiredate IS NOT NULL AND s.expiredate <= now()"
        self.update_if = (
            f"UPDATE {t} SET value = to_jsonb(%(value)s::text), isbinary = true, "
            f"updatedate = now(), expiredate = {_EXPIRE} "
            f"WHERE key = %(key)s AND xmin = %(etag)s::xid AND {_LIVE}"
        )
        self.delete_if = f"DELETE FROM {t} WHERE key = %(key)s AND xmin = %(etag)s::xid AND {_LIVE}"
        self.delete = f"DELETE FROM {t} WHERE key = %(key)s"
        # Dapr's query, so pillion and daprd sidecars sharing the tables take turns purging.
        self.claim_cleanup = (
            f"INSERT INTO {m} AS md (key, value) VALUES ('{_LAST_CLEANUP_KEY}', now()::text) "
            "ON CONFLICT (key) DO UPDATE SET value = now()::text WHERE "
            "(EXTRACT('epoch' FROM now() - md.value::timestamp with time zone) * 1000)::bigint > %s"
        )
        self.purge = (
            f"DELETE FROM {t} WHERE key IN (SELECT key FROM {t} "
            "WHERE expiredate IS NOT NULL AND expiredate <= now() "
            "LIMIT %s FOR UPDATE SKIP LOCKED) AND expiredate <= now()"
        )


# What concurrent CREATE TABLE IF NOT EXISTS of one table can raise in the sessions that lose.
_CREATE_RACE = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateObject,
    psycopg.errors.DuplicateTable,
)

# Columns the store reads and writes, with the types Dapr's v1 migrations give them.
_REQUIRED_COLUMNS = {
    "key": "text",
    "value": "jsonb",
    "isbinary": "boolean",
    "updatedate": "timestamp with time zone",
    "expiredate": "timestamp with time zone",
}


def _etag(key: str, etag: str) -> str:
    if not (etag.isascii() and etag.isdigit()) or int(etag) > _MAX_XID:
        raise ETagInvalid(f"invalid etag {etag!r} for key {key!r}: expected a transaction id")
    return etag


def _expire(row_value: datetime | None) -> dict[str, str]:
    return expiry_metadata(None if row_value is None else row_value.timestamp())


class PostgreSQLStateStore(StateStore):
    """State in Dapr's v1 PostgreSQL table, shareable with daprd and other pillion sidecars.

    Etags are the row's `xmin` (the id of the transaction that last wrote it), as in Dapr.

    Values: the contract returns exactly the bytes stored, but jsonb normalises JSON text
    (whitespace, key order, number spelling), so pillion never stores a value as jsonb. Every
    value is written as Dapr writes binary values: `isbinary = true` and `value` a JSON string
    holding the base64 of the bytes, which daprd reads back byte for byte. Values that are JSON
    jsonb accepts get a trailing line break in that base64 text: base64 decoders (Go's, libpq's,
    Python's) skip it, and it tells the query API which rows it may decode as JSON in SQL.
    Rows daprd wrote as jsonb (`isbinary = false`) read back as PostgreSQL prints the jsonb.
    """

    def __init__(self) -> None:
        self.meta: PostgreSQLMetadata | None = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] | None = None
        self._sql: _Statements | None = None
        self._timeout = 20.0
        self._mark_json = True
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(PostgreSQLMetadata, info.properties)
        meta.validate()
        conninfo, pool_opts = _split_conninfo(meta.connection_string)
        try:
            psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise ComponentConfigError("connectionString", str(exc)) from exc
        self.meta = meta
        self._timeout = float(meta.timeout)
        table = _table_parts("tableName", meta.table_name)
        self._sql = _Statements(table, _table_parts("metadataTableName", meta.metadata_table_name))

        exec_mode = meta.query_exec_mode or pool_opts.exec_mode or ""
        prepare_threshold = _EXEC_MODES.get(exec_mode, 5)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, prepare_threshold=prepare_threshold
                )
        except TimeoutError as exc:
            raise StateError(f"postgresql: connecting timed out after {self._timeout:g}s") from exc
        except psycopg.Error as exc:
            raise StateError(f"postgresql: connect: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout):
                await self._setup(conn)
        except TimeoutError as exc:
            raise StateError(f"postgresql: set-up timed out after {self._timeout:g}s") from exc
        except psycopg.Error as exc:
            raise StateError(f"postgresql: set-up: {exc}") from exc
        finally:
            await conn.close()

        max_size = meta.max_conns if meta.max_conns > 1 else pool_opts.max_size
        if max_size is None or max_size < 1:
            max_size = max(4, os.cpu_count() or 1)
        min_size = min(max(pool_opts.min_size or 1, 0), max_size)
        max_idle = meta.connection_max_idle_time or pool_opts.max_idle or 600.0
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            max_idle=max_idle,
            max_lifetime=pool_opts.max_lifetime or 3600.0,
            timeout=self._timeout,
            kwargs={"autocommit": True, "prepare_threshold": prepare_threshold},
            open=False,
            name=f"state.postgresql {info.name}",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
        except psycopg.Error as exc:
            await pool.close()
            raise StateError(f"postgresql: opening the connection pool: {exc}") from exc
        self._pool = pool
        if meta.cleanup_interval > 0:
            self._cleanup_task = asyncio.get_running_loop().create_task(
                self._cleanup_forever(float(meta.cleanup_interval)),
                name=f"state.postgresql cleanup {info.name}",
            )

    async def _setup(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        """Create or migrate the tables exactly as Dapr's v1 component does, under its lock."""
        sql = self._statements()
        enc = await (await conn.execute("SHOW server_encoding")).fetchone()
        # The query API decodes marked values with convert_from(..., 'UTF8'); elsewhere skip it.
        self._mark_json = enc is not None and str(enc[0]).upper() in ("UTF8", "UTF-8")
        for attempt in range(5):
            try:
                await conn.execute(sql.create_meta)
                break
            except _CREATE_RACE:
                # Sessions racing through CREATE TABLE IF NOT EXISTS: the losers hit the winner's
                # catalog rows ("type ... already exists", a unique violation) and retry.
                if attempt == 4:
                    raise
                await asyncio.sleep(0.05)
        await conn.execute(sql.insert_lock, (_LOCK_KEY,))
        async with conn.transaction():
            await conn.execute(sql.take_lock, (_LOCK_KEY,))
            row = await (await conn.execute(sql.meta_get, (_MIGRATIONS_KEY,))).fetchone()
            raw = "0" if row is None else str(row[0])
            if not raw.isdigit():
                raise StateError(f"invalid migration level {raw!r} in table {sql.meta}")
            level = int(raw)
            if level < 1:
                log.info("state.postgresql: creating table %s", sql.table)
                await conn.execute(sql.create_table)
                await conn.execute(sql.meta_set, (_MIGRATIONS_KEY, "1"))
            if level < 2:
                await conn.execute(sql.add_expiredate)
                await conn.execute(sql.meta_set, (_MIGRATIONS_KEY, str(SCHEMA_VERSION)))
            if level > SCHEMA_VERSION:
                log.warning(
                    "state.postgresql: %s records migration level %d; pillion knows %d",
                    sql.meta,
                    level,
                    SCHEMA_VERSION,
                )
        cur = await conn.execute(sql.columns, (sql.table,))
        columns = {name: kind for name, kind in await cur.fetchall()}
        wrong = [f"{c} {want}" for c, want in _REQUIRED_COLUMNS.items() if columns.get(c) != want]
        if wrong:
            raise StateError(
                f"table {sql.table} is not a Dapr state.postgresql v1 table: "
                f"expected columns {', '.join(wrong)}"
            )

    async def close(self) -> None:
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
            self._cleanup_task = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=5)

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    def max_ops(self) -> int:
        return 0

    # -- plumbing ----------------------------------------------------------------------------

    def _statements(self) -> _Statements:
        if self._sql is None:
            raise StateError("state store is not open")
        return self._sql

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """A pooled connection for one operation, bounded by `timeout`; errors become StateError."""
        pool = self._pool
        if pool is None:
            raise StateError("state store is not open")
        try:
            async with asyncio.timeout(self._timeout), pool.connection() as conn:
                yield conn
        except StateError:
            raise
        except TimeoutError as exc:
            raise StateError(f"postgresql {what}: timed out after {self._timeout:g}s") from exc
        except psycopg.Error as exc:
            raise StateError(f"postgresql {what}: {exc}") from exc

    # -- reads -------------------------------------------------------------------------------

    async def get(self, req: GetRequest) -> GetResponse | None:
        sql = self._statements()
        async with self._connection(f"get {req.key!r}") as conn:
            row = await (await conn.execute(sql.get, (req.key,))).fetchone()
        if row is None:
            return None
        data, isbinary, etag, expire = row
        return GetResponse(decode_value(data, isbinary), etag, _expire(expire))

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        if not reqs:
            return []
        sql = self._statements()
        keys = list(dict.fromkeys(r.key for r in reqs))
        async with self._connection("bulk get") as conn:
            rows = await (await conn.execute(sql.bulk_get, (keys,))).fetchall()
        found: dict[str, BulkGetItem] = {}
        for key, data, isbinary, etag, expire in rows:
            try:
                found[key] = BulkGetItem(key, decode_value(data, isbinary), etag, _expire(expire))
            except StateError as exc:
                found[key] = BulkGetItem(key, error=str(exc))
        return [found.get(r.key) or BulkGetItem(r.key) for r in reqs]

    # -- writes ------------------------------------------------------------------------------

    async def set(self, req: SetRequest) -> None:
        write = self._plan_set(req)
        async with self._connection(f"set {req.key!r}") as conn:
            await self._apply(conn, write)

    async def delete(self, req: DeleteRequest) -> None:
        write = self._plan_delete(req)
        async with self._connection(f"delete {req.key!r}") as conn:
            await self._apply(conn, write)

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        if not ops:
            return
        # Bad TTLs and malformed etags fail the whole transaction before it starts.
        writes: list[_Write] = []
        for op in ops:
            if isinstance(op, SetRequest):
                writes.append(self._plan_set(op))
            elif isinstance(op, DeleteRequest):
                writes.append(self._plan_delete(op))
            else:
                raise ValueError(f"unsupported transaction operation {op!r}")
        async with self._connection("transaction") as conn, conn.transaction():
            for w in writes:
                await self._apply(conn, w)

    def _plan_set(self, req: SetRequest) -> _Write:
        sql = self._statements()
        ttl = parse_ttl(req.metadata) if req.metadata else None
        params: dict[str, Any] = {
            "key": req.key,
            "value": encode_value(req.value, self._mark_json),
            "ttl": ttl,
        }
        if req.concurrency == Concurrency.LAST_WRITE or (
            not req.etag and req.concurrency != Concurrency.FIRST_WRITE
        ):
            return _Write(sql.upsert, params, None)
        if req.etag:
            params["etag"] = _etag(req.key, req.etag)
            return _Write(sql.update_if, params, f"etag mismatch for key {req.key!r}")
        return _Write(sql.insert_new, params, f"key {req.key!r} already exists (first-write)")

    def _plan_delete(self, req: DeleteRequest) -> _Write:
        sql = self._statements()
        if req.etag and req.concurrency != Concurrency.LAST_WRITE:
            params = {"key": req.key, "etag": _etag(req.key, req.etag)}
            return _Write(sql.delete_if, params, f"etag mismatch for key {req.key!r}")
        return _Write(sql.delete, {"key": req.key}, None)

    @staticmethod
    async def _apply(conn: psycopg.AsyncConnection[TupleRow], w: _Write) -> None:
        cur = await conn.execute(w.sql, w.params)
        if w.conflict is not None and cur.rowcount == 0:
            raise ETagMismatch(w.conflict)

    # -- query -------------------------------------------------------------------------------

    async def query(
        self, q: Mapping[str, Any] | bytes | str, metadata: Mapping[str, str]
    ) -> QueryResponse:
        """Dapr's state query language over the JSON values of live rows.

        Filters compare typed JSON (`{"EQ": {"n": 5}}` matches 5 and 5.0, not "5"); sorting
        uses jsonb's order, then the key; the page token is the offset of the next page.
        Values that are not JSON never match and are never returned.
        """
        query = parse_query(q)
        b = _QueryBuilder()
        where = "doc IS NOT NULL"
        if query.filter is not None:
            where += " AND " + b.filter(query.filter)
        order = b.sort(query.sort)
        limit, offset = query.limit, query.offset
        t = self._statements().table
        text = (
            f"SELECT key, {_DATA}, isbinary, etag FROM ("
            f"SELECT key, value, isbinary, xmin::text AS etag, {_DOC} AS doc FROM {t} "
            # OFFSET 0 keeps the subquery whole, so each row's document is decoded only once.
            f"WHERE {_LIVE} OFFSET 0) AS q WHERE {where} "
            f"ORDER BY {order + ', ' if order else ''}key"
        )
        params = b.params
        if limit:
            text += " LIMIT %s"
            params.append(limit)
        if offset:
            text += " OFFSET %s"
            params.append(offset)
        async with self._connection("query") as conn:
            rows = await (await conn.execute(text, params)).fetchall()
        results: list[QueryItem] = []
        for key, data, isbinary, etag in rows:
            try:
                results.append(QueryItem(key, decode_value(data, isbinary), etag))
            except StateError as exc:
                results.append(QueryItem(key, etag=etag, error=str(exc)))
        return QueryResponse(results, query.next_token(len(results)))

    # -- expiry ------------------------------------------------------------------------------

    async def _cleanup_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.cleanup_expired()
            except StateError as exc:
                log.warning("state.postgresql: purging expired rows failed: %s", exc)

    async def cleanup_expired(self) -> int:
        """Delete expired rows unless another sidecar (pillion or daprd) did so this interval.

        Returns how many rows went; 0 also when it was another sidecar's turn.
        """
        sql, meta = self._statements(), self.meta
        assert meta is not None
        # Dapr's slack: a timer firing 100ms early still counts as this interval's turn.
        threshold_ms = max(int(meta.cleanup_interval * 1000) - 100, 0)
        async with self._connection("cleanup") as conn:
            cur = await conn.execute(sql.claim_cleanup, (threshold_ms,))
            if cur.rowcount == 0:
                return 0
        total = 0
        while True:
            async with self._connection("cleanup") as conn:
                n = (await conn.execute(sql.purge, (_CLEANUP_CHUNK,))).rowcount
            total += n
            if n < _CLEANUP_CHUNK:
                break
        if total:
            log.debug("state.postgresql: purged %d expired rows", total)
        return total
