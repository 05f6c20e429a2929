"""The `state.mysql` store: Dapr's MySQL/MariaDB table layout behind an aiomysql pool."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import re
import ssl
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import aiomysql  # type: ignore[import-untyped]
import pymysql  # type: ignore[import-untyped]
from pymysql.constants import CLIENT  # type: ignore[import-untyped]

from pillion.components.metadata import (
    ComponentConfigError,
    ComponentInfo,
    Properties,
    Seconds,
    decode,
)
from pillion.components.state.api import (
    BulkGetItem,
    Concurrency,
    DeleteRequest,
    ETagMismatch,
    Feature,
    GetRequest,
    GetResponse,
    Operation,
    SetRequest,
    StateError,
    StateStore,
)
from pillion.components.state.ttl import expiry_metadata, parse_ttl
from pillion.durations import parse_duration

log = logging.getLogger(__name__)

T = TypeVar("T")

_FEATURES = frozenset({Feature.ETAG, Feature.TRANSACTIONAL, Feature.TTL})
# Dapr's rule for schema and table names: ASCII letters, digits and underscores.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_]{1,64}")
# A session variable the connection string sets (`?sql_mode=...`), as Go's driver does.
_SESSION_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Dapr's `id VARCHAR(255)`.
_MAX_KEY_CHARS = 255
# Keys per bulk-get query: one query for any sensible request, bounded packet size for huge ones.
_BULK_CHUNK = 5000
# Expired rows deleted per cleanup statement, so a large purge never holds locks for long.
_CLEANUP_CHUNK = 1000
# TIMESTAMP columns end at 2038-01-19 03:14:07 UTC; FROM_UNIXTIME past it yields NULL.
_MAX_EXPIRY = 2**31 - 1
# Deadlocks (1213) and MariaDB's snapshot-isolation conflict (1020) abort the statement or
# transaction without applying anything, so the whole operation is run again.
_RETRY_CODES = frozenset({1020, 1213})
_RETRIES = 5
_LAST_CLEANUP = "last-cleanup"

# Connection-string parameters of Go's MySQL driver that need no counterpart here: pillion
# always speaks utf8mb4, reads times as epochs and bounds every operation by timeoutInSeconds.
_DRIVER_PARAMS = frozenset(
    {
        "allowAllFiles",
        "allowCleartextPasswords",
        "allowFallbackToPlaintext",
        "allowOldPasswords",
        "charset",
        "checkConnLiveness",
        "clientFoundRows",
        "collation",
        "columnsWithAlias",
        "compress",
        "connectionAttributes",
        "interpolateParams",
        "loc",
        "maxAllowedPacket",
        "multiStatements",
        "readTimeout",
        "rejectReadOnly",
        "serverPubKey",
        "timeTruncate",
        "writeTimeout",
    }
)


# -- connection string -------------------------------------------------------------------------


@dataclass(frozen=True)
class DSN:
    """A parsed Go MySQL DSN: `[user[:password]@][net[(addr)]]/dbname[?param=value&...]`."""

    user: str = ""
    password: str = ""
    net: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 3306
    unix_socket: str | None = None
    dbname: str = ""
    # "false", "true" (verify), "skip-verify", "preferred", or a named config ("custom").
    tls: str = "false"
    connect_timeout: float | None = None
    parse_time: bool = False
    allow_native_passwords: bool = True
    # Other parameters: session system variables, `SET name=value` on every connection.
    session_vars: Mapping[str, str] = field(default_factory=dict)


def _dsn_error(message: str) -> ComponentConfigError:
    return ComponentConfigError("connectionString", message)


def _go_bool(name: str, raw: str) -> bool:
    # Go's readBool: exactly these spellings.
    if raw in ("1", "true", "TRUE", "True"):
        return True
    if raw in ("0", "false", "FALSE", "False"):
        return False
    raise _dsn_error(f"parameter {name!r} must be true or false, got {raw!r}")


def parse_dsn(dsn: str) -> DSN:
    """Parse a connection string the way Go's go-sql-driver/mysql does.

    As there, the database part starts after the last '/', so a password may contain '/'
    but parameter values must escape it (`%2F`); parameter values are URL-unescaped.
    """
    slash = dsn.rfind("/")
    if slash < 0:
        raise _dsn_error("expected user:password@tcp(host:port)/?params (no '/' found)")
    left, right = dsn[:slash], dsn[slash + 1 :]
    user = password = net = addr = ""
    if left:
        at = left.rfind("@")
        rest = left
        if at >= 0:
            user, _, password = left[:at].partition(":")
            rest = left[at + 1 :]
        paren = rest.find("(")
        if paren >= 0:
            if not rest.endswith(")"):
                raise _dsn_error("address must be enclosed in parentheses: tcp(host:port)")
            net, addr = rest[:paren], rest[paren + 1 : -1]
        else:
            net = rest
    dbname, _, query = right.partition("?")
    kw: dict[str, Any] = {"user": user, "password": password, "dbname": unquote(dbname)}
    session: dict[str, str] = {}
    for part in query.split("&") if query else ():
        name, found, raw = part.partition("=")
        if not found:
            continue
        value = unquote(raw.replace("+", " "))
        if name == "parseTime":
            kw["parse_time"] = _go_bool(name, value)
        elif name == "allowNativePasswords":
            kw["allow_native_passwords"] = _go_bool(name, value)
        elif name == "tls":
            if value in ("1", "true", "TRUE", "True", "0", "false", "FALSE", "False"):
                kw["tls"] = "true" if _go_bool(name, value) else "false"
            elif value.lower() in ("skip-verify", "preferred"):
                kw["tls"] = value.lower()
            else:
                kw["tls"] = value
        elif name == "timeout":
            try:
                kw["connect_timeout"] = parse_duration(value)
            except ValueError as exc:
                raise _dsn_error(f"parameter 'timeout': {exc}") from exc
        elif name in _DRIVER_PARAMS:
            continue
        elif _SESSION_VAR.fullmatch(name):
            session[name] = value
        else:
            raise _dsn_error(f"invalid parameter name {name!r}")
    kw["session_vars"] = session

    net = net or "tcp"
    if net == "unix":
        kw.update(net=net, unix_socket=addr or "/tmp/mysql.sock")
    elif net in ("tcp", "tcp4", "tcp6"):
        host, port = _split_addr(addr)
        kw.update(net=net, host=host, port=port)
    else:
        raise _dsn_error(f"unsupported network {net!r} (use tcp or unix)")
    return DSN(**kw)


def _split_addr(addr: str) -> tuple[str, int]:
    if not addr:
        return "127.0.0.1", 3306
    host, port_text = addr, ""
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise _dsn_error(f"invalid address {addr!r}: missing ']'")
        host, tail = addr[1:end], addr[end + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise _dsn_error(f"invalid address {addr!r}")
            port_text = tail[1:]
    elif addr.count(":") == 1:
        host, port_text = addr.split(":")
    if not port_text:
        return host or "127.0.0.1", 3306
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _dsn_error(f"invalid port in address {addr!r}")
    return host or "127.0.0.1", int(port_text)


# -- metadata ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MySQLMetadata:
    """Dapr's `state.mysql` metadata, plus pillion's `maxConns` (connection pool size)."""

    connection_string: str = field(default="", metadata={"name": "connectionString"})
    schema_name: str = field(default="dapr_state_store", metadata={"name": "schemaName"})
    table_name: str = field(default="state", metadata={"name": "tableName"})
    metadata_table_name: str = field(
        default="dapr_metadata", metadata={"name": "metadataTableName"}
    )
    # Dapr reads a number of seconds; a Go duration ("30s") is accepted too.
    timeout: Seconds = field(default=Seconds(20), metadata={"name": "timeoutInSeconds"})
    # None: the default hour; zero or negative: no background cleanup.
    cleanup_interval: Seconds | None = field(
        default=None,
        metadata={"name": "cleanupInterval", "aliases": ("cleanupIntervalInSeconds",)},
    )
    pem_path: str = field(default="", metadata={"name": "pemPath"})
    max_conns: int = field(default=10, metadata={"name": "maxConns"})

    def validate(self) -> DSN:
        """Check the values; returns the parsed connection string."""
        if not self.connection_string.strip():
            raise ComponentConfigError(
                "connectionString", "is required (user:password@tcp(host:port)/?params)"
            )
        for name, value in (
            ("schemaName", self.schema_name),
            ("tableName", self.table_name),
            ("metadataTableName", self.metadata_table_name),
        ):
            if _IDENTIFIER.fullmatch(value) is None:
                raise ComponentConfigError(
                    name, f"{value!r} is not a valid name (1-64 letters, digits and _ only)"
                )
        if self.table_name.lower() == self.metadata_table_name.lower():
            raise ComponentConfigError("metadataTableName", "must differ from tableName")
        if self.max_conns < 1:
            raise ComponentConfigError("maxConns", "must be at least 1")
        dsn = parse_dsn(self.connection_string.strip())
        if dsn.tls not in ("false", "true", "skip-verify", "preferred") and (
            dsn.tls != "custom" or not self.pem_path
        ):
            raise ComponentConfigError(
                "connectionString",
                f"tls={dsn.tls!r} names no known TLS config (use tls=custom with pemPath)",
            )
        return dsn

    @property
    def op_timeout(self) -> float:
        # Dapr: a non-positive timeoutInSeconds means the default.
        return float(self.timeout) if self.timeout > 0 else 20.0

    @property
    def cleanup_seconds(self) -> float:
        """Seconds between cleanups; 0 when disabled."""
        if self.cleanup_interval is None:
            return 3600.0
        return max(float(self.cleanup_interval), 0.0)


def _tls_context(dsn: DSN, pem_path: str) -> ssl.SSLContext | None:
    if dsn.tls == "false":
        return None
    if dsn.tls == "custom":
        try:
            return ssl.create_default_context(cafile=pem_path)
        except (OSError, ssl.SSLError) as exc:
            raise ComponentConfigError("pemPath", f"cannot load {pem_path!r}: {exc}") from exc
    ctx = ssl.create_default_context()
    if dsn.tls in ("skip-verify", "preferred"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- values --------------------------------------------------------------------------------------


def encode_value(value: bytes) -> str:
    """The `value` column text for `value`: a JSON string of its base64 (with isbinary=1).

    This is how Dapr stores binary values, so Dapr sidecars sharing the table read the same
    bytes. Every value takes this form, JSON included: MariaDB keeps JSON text verbatim, but
    its validity rules differ from everyone else's (31 levels of nesting, no lone surrogates) and
    MySQL 8 normalises JSON text, so only this form returns bytes exactly on both.
    """
    return '"' + base64.b64encode(value).decode("ascii") + '"'


def decode_value(value: str | bytes, isbinary: Any) -> bytes:
    """Bytes from a row; isbinary=0 rows (Dapr's JSON values) come back as their JSON text."""
    if not isbinary:
        return value.encode() if isinstance(value, str) else bytes(value)
    text = value if isinstance(value, str) else bytes(value).decode()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and "\\" not in text:
        b64 = text[1:-1]
    else:
        parsed = json.loads(text)
        if not isinstance(parsed, str):
            raise ValueError("a binary value must be a JSON string of base64")
        b64 = parsed
    # Like Go's decoder: line breaks are skipped, anything else outside base64 is an error.
    return base64.b64decode(b64.replace("\r", "").replace("\n", ""), validate=True)


def _expiry_sql(ttl: int | None) -> str:
    """SQL for the expiredate of a write; None: never expires.

    The expiry is rounded up to the next whole second (the TIMESTAMP's resolution): an item
    lives at least its TTL, never less.
    """
    if ttl is None:
        return "NULL"
    return f"FROM_UNIXTIME(CEIL(UNIX_TIMESTAMP(NOW(6))) + {int(ttl)})"


def _check_ttl(ttl: int | None) -> None:
    if ttl is not None and time.time() + ttl + 86400 > _MAX_EXPIRY:
        raise ValueError(
            f"ttlInSeconds {ttl} reaches past 2038-01-19, the end of MySQL's TIMESTAMP range"
        )


# -- the store ---------------------------------------------------------------------------------


class MySQLStateStore(StateStore):
    """State in a MySQL or MariaDB table with Dapr's layout, shared safely by many sidecars.

    Rows: `id` (the key), `value` (JSON), `isbinary`, `insertDate`, `updateDate`, `eTag` (a
    uuid4 per write) and `expiredate`. Every conditional write is one statement whose WHERE
    clause or ON DUPLICATE KEY UPDATE decides, so concurrent writers on one key race inside
    InnoDB's row lock and exactly one etag holder wins. Times are the server's, so sidecars
    with skewed clocks agree on expiry.
    """

    def __init__(self) -> None:
        self.meta: MySQLMetadata | None = None
        self._pool: Any = None
        self._timeout = 20.0
        self._session_sql: list[str] = []
        # Connections that have run the session set-up; the pool has no on-connect hook.
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()
        self._sql: dict[str, str] = {}
        self._cleanup_task: asyncio.Task[None] | None = None
        self._connect: dict[str, Any] = {}
        # Tasks killing the server threads of connections abandoned by cancelled callers.
        self._killers: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        # Dapr treats an empty value as absent (the default applies).
        props = Properties({k: v for k, v in info.properties.items() if v.strip()})
        meta = decode(MySQLMetadata, props)
        dsn = meta.validate()
        if meta.pem_path and dsn.tls != "custom":
            log.warning(
                "state.mysql %s: pemPath is set but the connection string lacks "
                "tls=custom; connecting without it",
                info.name,
            )
        if dsn.dbname and dsn.dbname != meta.schema_name:
            log.warning(
                "state.mysql %s: the connection string names database %r; using "
                "schemaName %r as Dapr does",
                info.name,
                dsn.dbname,
                meta.schema_name,
            )
        self.meta = meta
        self._timeout = meta.op_timeout
        self._sql = _statements(meta.schema_name, meta.table_name, meta.metadata_table_name)
        tls = _tls_context(dsn, meta.pem_path)
        connect: dict[str, Any] = {
            "user": dsn.user,
            "password": dsn.password,
            "charset": "utf8mb4",
            "autocommit": True,
            "connect_timeout": dsn.connect_timeout or self._timeout,
            "ssl": tls,
            "local_infile": False,
        }
        if dsn.unix_socket is not None:
            connect["unix_socket"] = dsn.unix_socket
        else:
            connect.update(host=dsn.host, port=dsn.port)
        self._connect = connect
        try:
            async with asyncio.timeout(self._timeout):
                await self._bootstrap(connect, dsn, meta)
                self._pool = await aiomysql.create_pool(
                    minsize=1, maxsize=meta.max_conns, db=meta.schema_name, **connect
                )
            await self._run("create tables", self._create_tables)
        except (pymysql.err.MySQLError, OSError, TimeoutError) as exc:
            await self._close_pool()
            raise StateError(f"mysql init: {_describe(exc, self._timeout)}") from exc
        except BaseException:
            await self._close_pool()
            raise
        interval = meta.cleanup_seconds
        if interval > 0:
            self._cleanup_task = asyncio.get_running_loop().create_task(
                self._cleanup_forever(interval), name=f"state.mysql cleanup {info.name}"
            )

    async def _bootstrap(self, connect: dict[str, Any], dsn: DSN, meta: MySQLMetadata) -> None:
        """Check TLS and server settings, and create the schema, on a first connection."""
        conn = await aiomysql.connect(**connect)
        try:
            if dsn.tls in ("true", "skip-verify", "custom") and not (
                conn.server_capabilities & CLIENT.SSL
            ):
                raise StateError(f"mysql init: tls={dsn.tls} but the server does not offer TLS")
            async with conn.cursor() as cur:
                await cur.execute("SELECT @@log_bin, @@binlog_format")
                log_bin, binlog_format = await cur.fetchone()
                await cur.execute(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                    (meta.schema_name,),
                )
                if await cur.fetchone() is None:
                    log.info("state.mysql: creating schema %r", meta.schema_name)
                    await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{meta.schema_name}`")
        finally:
            conn.close()
        session = ["SET time_zone = '+00:00'"]
        # READ COMMITTED avoids gap locks (and MariaDB 11.6's snapshot-isolation errors);
        # statement-based binary logging refuses it, so such servers keep their default.
        if not (log_bin and str(binlog_format).upper() == "STATEMENT"):
            session.append("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        if dsn.session_vars:
            session.append("SET " + ", ".join(f"{k} = {v}" for k, v in dsn.session_vars.items()))
        self._session_sql = session

    async def _create_tables(self, cur: Any) -> None:
        meta, sql = self._meta(), self._sql
        await cur.execute(
            "SELECT COLLATION_NAME FROM information_schema.collations "
            "WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')"
        )
        available = {row[0] for row in await cur.fetchall()}
        # Keys compare byte for byte: a case-insensitive or space-padding collation would make
        # "a", "A" and "a " one row.
        collation = next(
            (c for c in ("utf8mb4_nopad_bin", "utf8mb4_0900_bin") if c in available),
            "utf8mb4_bin",
        )
        for table, ddl in (
            (meta.table_name, sql["create_state"].format(collation=collation)),
            (meta.metadata_table_name, sql["create_meta"]),
        ):
            await cur.execute(sql["columns"], (meta.schema_name, table))
            if not await cur.fetchall():
                log.info("state.mysql: creating table %s.%s", meta.schema_name, table)
                await cur.execute(ddl)
        await cur.execute(sql["columns"], (meta.schema_name, meta.table_name))
        columns = {str(row[0]).lower() for row in await cur.fetchall()}
        if "expiredate" not in columns:
            # Tables created by Dapr before 1.11 lack the TTL column.
            log.info("state.mysql: adding column expiredate to %s", meta.table_name)
            await cur.execute(sql["add_expiredate"])
            columns.add("expiredate")
        missing = {"id", "value", "isbinary", "etag"} - columns
        if missing:
            raise StateError(
                f"table {meta.schema_name}.{meta.table_name} lacks columns {sorted(missing)}; "
                "it is not a Dapr state table"
            )

    async def close(self) -> None:
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
            self._cleanup_task = None
        if self._killers:
            await asyncio.wait(set(self._killers), timeout=self._timeout)
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        try:
            async with asyncio.timeout(self._timeout):
                await pool.wait_closed()
        except TimeoutError:
            pool.terminate()

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    def max_ops(self) -> int:
        return 0

    # -- reads -------------------------------------------------------------------------------

    async def get(self, req: GetRequest) -> GetResponse | None:
        async def fetch(cur: Any) -> Any:
            await cur.execute(self._sql["get"], (req.key,))
            return await cur.fetchone()

        row = await self._run(f"get {req.key!r}", fetch)
        if row is None:
            return None
        value, etag, isbinary, expire = row
        try:
            data = decode_value(value, isbinary)
        except (ValueError, binascii.Error) as exc:
            raise StateError(f"mysql get {req.key!r}: undecodable stored value: {exc}") from exc
        return GetResponse(data, etag, expiry_metadata(None if expire is None else int(expire)))

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        keys = list(dict.fromkeys(r.key for r in reqs))
        rows: dict[str, tuple[Any, ...]] = {}

        async def fetch(cur: Any) -> None:
            for start in range(0, len(keys), _BULK_CHUNK):
                chunk = keys[start : start + _BULK_CHUNK]
                marks = ", ".join(["%s"] * len(chunk))
                await cur.execute(self._sql["bulk_get"].format(marks=marks), chunk)
                for row in await cur.fetchall():
                    rows[row[0]] = row[1:]

        if keys:
            await self._run("bulk get", fetch)
        out: list[BulkGetItem] = []
        for r in reqs:
            row = rows.get(r.key)
            if row is None:
                out.append(BulkGetItem(r.key))
                continue
            value, etag, isbinary, expire = row
            try:
                data = decode_value(value, isbinary)
            except (ValueError, binascii.Error) as exc:
                out.append(BulkGetItem(r.key, error=f"undecodable stored value: {exc}"))
                continue
            meta = expiry_metadata(None if expire is None else int(expire))
            out.append(BulkGetItem(r.key, data, etag, meta))
        return out

    # -- writes ------------------------------------------------------------------------------

    async def set(self, req: SetRequest) -> None:
        ttl = self._check_set(req)
        await self._run(f"set {req.key!r}", lambda cur: self._apply_set(cur, req, ttl))

    async def delete(self, req: DeleteRequest) -> None:
        await self._run(f"delete {req.key!r}", lambda cur: self._apply_delete(cur, req))

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        if not ops:
            return
        ttls: list[int | None] = []
        for op in ops:
            if isinstance(op, SetRequest):
                ttls.append(self._check_set(op))
            elif isinstance(op, DeleteRequest):
                ttls.append(None)
            else:
                raise ValueError(f"unsupported transaction operation {op!r}")

        async def apply(cur: Any) -> None:
            for op, ttl in zip(ops, ttls, strict=True):
                if isinstance(op, SetRequest):
                    await self._apply_set(cur, op, ttl)
                else:
                    await self._apply_delete(cur, op)

        await self._run(f"transaction of {len(ops)} operations", apply, transaction=True)

    @staticmethod
    def _check_set(req: SetRequest) -> int | None:
        """The request's TTL; raises on a bad TTL or an over-long key before any I/O."""
        _check_key(req.key)
        ttl = parse_ttl(req.metadata) if req.metadata else None
        _check_ttl(ttl)
        return ttl

    async def _apply_set(self, cur: Any, req: SetRequest, ttl: int | None) -> None:
        sql, exp = self._sql, _expiry_sql(ttl)
        value, etag = encode_value(req.value), str(uuid.uuid4())
        if req.concurrency == Concurrency.LAST_WRITE or (
            not req.etag and req.concurrency != Concurrency.FIRST_WRITE
        ):
            await cur.execute(sql["upsert"].format(exp=exp), (req.key, value, etag))
        elif req.etag:
            await cur.execute(sql["update_if"].format(exp=exp), (value, etag, req.key, req.etag))
            if cur.rowcount == 0:
                raise ETagMismatch(f"etag mismatch for key {req.key!r}")
        else:
            # Inserts, replaces an expired row (2 rows affected) or leaves a live one (0).
            await cur.execute(sql["insert_new"].format(exp=exp), (req.key, value, etag))
            if cur.rowcount == 0:
                raise ETagMismatch(f"key {req.key!r} already exists (first-write)")

    async def _apply_delete(self, cur: Any, req: DeleteRequest) -> None:
        if req.etag and req.concurrency != Concurrency.LAST_WRITE:
            await cur.execute(self._sql["delete_if"], (req.key, req.etag))
            if cur.rowcount == 0:
                raise ETagMismatch(f"etag mismatch for key {req.key!r}")
        else:
            await cur.execute(self._sql["delete"], (req.key,))

    # -- running statements ------------------------------------------------------------------

    async def _run(
        self, what: str, fn: Callable[[Any], Awaitable[T]], transaction: bool = False
    ) -> T:
        """Run `fn(cursor)` on a pooled connection within timeoutInSeconds.

        With `transaction`, inside BEGIN/COMMIT, rolled back on any error. Deadlocks are
        retried (they undo everything); driver errors and timeouts become StateError.
        """
        pool = self._pool
        if pool is None:
            raise StateError("state store is not open")
        attempt = 0
        while True:
            abandoned: list[Any] = []
            try:
                async with asyncio.timeout(self._timeout):
                    async with pool.acquire() as conn:
                        try:
                            await self._prepare(conn)
                            return await _in_cursor(conn, fn, transaction)
                        except asyncio.CancelledError:
                            # Timed out or cancelled mid-exchange: the connection cannot go
                            # back to the pool, and its statement may still be running.
                            conn.close()
                            abandoned.append(conn)
                            raise
            except StateError:
                raise
            except pymysql.err.MySQLError as exc:
                if _code(exc) in _RETRY_CODES and attempt < _RETRIES:
                    attempt += 1
                    await asyncio.sleep(random.uniform(0.001, 0.005 * 2**attempt))
                    continue
                raise StateError(f"mysql {what}: {_describe(exc, self._timeout)}") from exc
            except TimeoutError as exc:
                if abandoned:
                    await self._kill(abandoned[0])
                raise StateError(f"mysql {what}: {_describe(exc, self._timeout)}") from exc
            except asyncio.CancelledError:
                if abandoned:
                    task = asyncio.get_running_loop().create_task(self._kill(abandoned[0]))
                    self._killers.add(task)
                    task.add_done_callback(self._killers.discard)
                raise
            except (OSError, RuntimeError) as exc:
                # RuntimeError: aiomysql refusing a pool that is closing.
                raise StateError(f"mysql {what}: {_describe(exc, self._timeout)}") from exc

    async def _kill(self, conn: Any) -> None:
        """End the server thread of an abandoned connection (best effort).

        Closing the socket is not enough: a server thread waiting for a row lock notices the
        client is gone only after the wait, and then an autocommit write still commits. Killing
        it makes a timed-out write fail rather than land later.
        """
        try:
            thread = conn.thread_id()
            async with asyncio.timeout(min(self._timeout, 5.0)):
                killer = await aiomysql.connect(**self._connect)
                try:
                    async with killer.cursor() as cur:
                        await cur.execute("KILL CONNECTION %s", (int(thread),))
                finally:
                    killer.close()
        except Exception as exc:  # gone already, or the server unreachable: nothing to do
            log.debug("state.mysql: could not kill abandoned connection: %s", exc)

    async def _prepare(self, conn: Any) -> None:
        if conn in self._ready:
            return
        async with conn.cursor() as cur:
            for stmt in self._session_sql:
                await cur.execute(stmt)
        self._ready.add(conn)

    # -- expiry ------------------------------------------------------------------------------

    async def _cleanup_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.cleanup_expired()
            except StateError as exc:
                log.warning("state.mysql: purging expired rows failed: %s", exc)

    async def cleanup_expired(self) -> int:
        """Delete expired rows unless some sidecar did so within the cleanup interval.

        Sidecars sharing the metadata table take turns through its `last-cleanup` row, with
        Dapr's statement, so pillion and daprd processes coordinate too. Returns how many rows
        went (0 also when it was not this process's turn).
        """
        interval = self._meta().cleanup_seconds or 3600.0
        # Dapr's 100 ms of slack, so a timer firing on the dot still finds its turn due.
        slack_us = max(int((interval - 0.1) * 1_000_000), 0)

        async def claim(cur: Any) -> int:
            await cur.execute(self._sql["claim_cleanup"], (_LAST_CLEANUP, slack_us))
            return int(cur.rowcount)

        if not await self._run("claim cleanup", claim):
            return 0

        async def purge(cur: Any) -> int:
            await cur.execute(self._sql["purge"], (_CLEANUP_CHUNK,))
            return int(cur.rowcount)

        total = 0
        while True:
            n = await self._run("cleanup", purge)
            total += n
            if n < _CLEANUP_CHUNK:
                break
        if total:
            log.debug("state.mysql: purged %d expired rows", total)
        return total

    # -- helpers -----------------------------------------------------------------------------

    def _meta(self) -> MySQLMetadata:
        if self.meta is None:
            raise StateError("state store is not open")
        return self.meta


async def _in_cursor(conn: Any, fn: Callable[[Any], Awaitable[T]], transaction: bool) -> T:
    if not transaction:
        async with conn.cursor() as cur:
            return await fn(cur)
    await conn.begin()
    try:
        async with conn.cursor() as cur:
            result = await fn(cur)
        await conn.commit()
    except Exception:
        if not conn.closed:
            with contextlib.suppress(Exception):
                await conn.rollback()
        raise
    return result


def _check_key(key: str) -> None:
    if len(key) > _MAX_KEY_CHARS:
        raise StateError(f"key {key[:40]!r}... is longer than {_MAX_KEY_CHARS} characters")


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s (timeoutInSeconds)"
    return str(exc) or type(exc).__name__


def _statements(schema: str, table: str, meta_table: str) -> dict[str, str]:
    t, m = f"`{schema}`.`{table}`", f"`{schema}`.`{meta_table}`"
    live = "(expiredate IS NULL OR expiredate > CURRENT_TIMESTAMP)"
    expired = "(expiredate IS NOT NULL AND expiredate <= CURRENT_TIMESTAMP)"
    # CAST(... AS BINARY): etags match byte for byte, whatever the column's collation.
    etag_is = "eTag = CAST(%s AS BINARY)"
    return {
        "columns": (
            "SELECT COLUMN_NAME FROM information_schema.columns "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s"
        ),
        # Dapr's layout; `id` gets a binary collation so keys are case- and space-exact.
        "create_state": f"""
            CREATE TABLE IF NOT EXISTS {t} (
                id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {{collation}} NOT NULL PRIMARY KEY,
                value JSON NOT NULL,
                isbinary BOOLEAN NOT NULL,
                insertDate TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                updateDate TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
                    ON UPDATE CURRENT_TIMESTAMP,
                eTag VARCHAR(36) NOT NULL,
                expiredate TIMESTAMP NULL,
                INDEX expiredate_idx (expiredate)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
        """,
        "create_meta": (
            f"CREATE TABLE IF NOT EXISTS {m} "
            "(id VARCHAR(255) NOT NULL PRIMARY KEY, value TEXT NOT NULL) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        ),
        "add_expiredate": (
            f"ALTER TABLE {t} ADD COLUMN expiredate TIMESTAMP NULL, "
            "ADD INDEX expiredate_idx (expiredate)"
        ),
        "get": (
            "SELECT value, eTag, isbinary, UNIX_TIMESTAMP(expiredate) "
            f"FROM {t} WHERE id = %s AND {live}"
        ),
        "bulk_get": (
            "SELECT id, value, eTag, isbinary, UNIX_TIMESTAMP(expiredate) "
            f"FROM {t} WHERE id IN ({{marks}}) AND {live}"
        ),
        "upsert": (
            f"INSERT INTO {t} (id, value, isbinary, eTag, expiredate) "
            "VALUES (%s, %s, TRUE, %s, {exp}) ON DUPLICATE KEY UPDATE "
            "value = VALUES(value), isbinary = VALUES(isbinary), eTag = VALUES(eTag), "
            "expiredate = VALUES(expiredate)"
        ),
        "update_if": (
            f"UPDATE {t} SET value = %s, isbinary = TRUE, eTag = %s, expiredate = {{exp}} "
            f"WHERE id = %s AND {etag_is} AND {live}"
        ),
        # First-write: insert, or take over a row that has expired (expired counts as absent).
        # expiredate is assigned last: the assignments before it test its old value.
        "insert_new": (
            f"INSERT INTO {t} (id, value, isbinary, eTag, expiredate) "
            "VALUES (%s, %s, TRUE, %s, {exp}) ON DUPLICATE KEY UPDATE "
            f"value = IF({expired}, VALUES(value), value), "
            f"isbinary = IF({expired}, VALUES(isbinary), isbinary), "
            f"eTag = IF({expired}, VALUES(eTag), eTag), "
            f"expiredate = IF({expired}, VALUES(expiredate), expiredate)"
        ),
        "delete_if": f"DELETE FROM {t} WHERE id = %s AND {etag_is} AND {live}",
        "delete": f"DELETE FROM {t} WHERE id = %s",
        # Dapr's turn-taking statement: the row changes only when the last cleanup is older
        # than the interval (less Dapr's 100 ms), and then this process purges.
        "claim_cleanup": (
            f"INSERT INTO {m} (id, value) VALUES (%s, CURRENT_TIMESTAMP) "
            "ON DUPLICATE KEY UPDATE value = IF(CURRENT_TIMESTAMP > "
            "DATE_ADD(value, INTERVAL %s MICROSECOND), CURRENT_TIMESTAMP, value)"
        ),
        "purge": f"DELETE FROM {t} WHERE {expired} LIMIT %s",
    }
