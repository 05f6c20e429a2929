"""The `bindings.postgresql` output binding: Dapr's exec/query/close over a psycopg pool."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import AsyncRawCursor
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pillion.components.bindings.api import BindingError, BindingResponse, OutputBinding
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.state.postgresql import _EXEC_MODES, _split_conninfo

SQL_KEY = "sql"
PARAMS_KEY = "params"


@dataclass(frozen=True)
class PostgreSQLBindingMetadata:
    """Dapr's `bindings.postgresql` metadata (connection string auth only)."""

    connection_string: str = field(
        default="", metadata={"name": "connectionString", "aliases": ("url",)}
    )
    timeout: Seconds = field(
        default=Seconds(20), metadata={"name": "timeout", "aliases": ("timeoutInSeconds",)}
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
        if self.timeout <= 0:
            raise ComponentConfigError("timeout", "must be positive")
        if self.query_exec_mode and self.query_exec_mode not in _EXEC_MODES:
            raise ComponentConfigError(
                "queryExecMode",
                f"{self.query_exec_mode!r} is not one of {', '.join(sorted(_EXEC_MODES))}",
            )
        if self.use_azure_ad:
            raise ComponentConfigError("useAzureAD", "Azure AD authentication is not supported")
        if self.use_aws_iam:
            raise ComponentConfigError("useAWSIAM", "AWS IAM authentication is not supported")


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() of a duration (Dapr's `duration` response metadata)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{sign}{out}{_trim(rest, 1_000_000_000)}s"


def _trim(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def _rfc3339(t: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time."""
    text = t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def _param(value: Any) -> Any:
    """A JSON parameter as text of unknown type, so the server infers its type from the
    statement, as pgx's described statements do; null stays NULL."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    """A column value as Dapr's JSON encoding of pgx's value."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return _rfc3339(value)
    if isinstance(value, date):
        return f"{value.isoformat()}T00:00:00Z"
    if isinstance(value, dtime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # uuid, interval, inet, ...


class PostgreSQLBinding(OutputBinding):
    """`exec` and `query` run the `sql` request metadata with the `params` JSON array bound to
    `$1`, `$2`, ... (never interpolated into the text). `exec` answers `rows-affected`; `query`
    answers the rows as a JSON array of arrays. `close` closes the pool, as Dapr's does."""

    def __init__(self) -> None:
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] | None = None

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(PostgreSQLBindingMetadata, info.properties)
        meta.validate()
        conninfo, pool_opts = _split_conninfo(meta.connection_string)
        exec_mode = meta.query_exec_mode or pool_opts.exec_mode or ""
        max_size = meta.max_conns if meta.max_conns > 1 else pool_opts.max_size
        if max_size is None or max_size < 1:
            max_size = max(4, os.cpu_count() or 1)
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo,
            min_size=min(max(pool_opts.min_size or 1, 0), max_size),
            max_size=max_size,
            max_idle=meta.connection_max_idle_time or pool_opts.max_idle or 600.0,
            max_lifetime=pool_opts.max_lifetime or 3600.0,
            timeout=float(meta.timeout),
            kwargs={"autocommit": True, "prepare_threshold": _EXEC_MODES.get(exec_mode, 5)},
            open=False,
            name=f"bindings.postgresql {info.name}",
        )
        try:
            await pool.open(wait=True, timeout=float(meta.timeout))
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            raise BindingError(f"postgresql: opening the connection pool: {exc}") from exc
        self._pool = pool

    def operations(self) -> list[str]:
        return ["exec", "query", "close"]

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        if operation == "close":
            await self.close()
            return BindingResponse()
        sql = metadata.get(SQL_KEY, "")
        if not sql:
            raise BindingError(f"required metadata not set: {SQL_KEY}")
        args: list[Any] = []
        raw = metadata.get(PARAMS_KEY, "")
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                raise BindingError(
                    f"invalid metadata property {PARAMS_KEY}: failed to unmarshal JSON: {exc}"
                ) from exc
            if not isinstance(parsed, list):
                raise BindingError(
                    f"invalid metadata property {PARAMS_KEY}: failed to unmarshal JSON: "
                    "not an array"
                )
            args = [_param(v) for v in parsed]
        if operation not in ("exec", "query"):
            raise BindingError(
                f"invalid operation type: {operation}. Expected exec, query, or close"
            )
        pool = self._pool
        if pool is None:
            raise BindingError("postgresql: the binding is closed")
        start = datetime.now(UTC)
        t0 = time.perf_counter()
        out = {"operation": operation, "sql": sql, "start-time": _rfc3339(start)}
        body = b""
        try:
            async with pool.connection() as conn, AsyncRawCursor(conn) as cur:
                await cur.execute(sql, args or None)
                if operation == "exec":
                    out["rows-affected"] = str(max(cur.rowcount, 0))
                else:
                    rows = await cur.fetchall() if cur.description is not None else []
                    body = json.dumps(
                        [[_json_value(v) for v in row] for row in rows],
                        separators=(",", ":"),
                    ).encode()
        except (psycopg.Error, PoolTimeout) as exc:
            raise BindingError(f"error executing {operation}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        end = datetime.now(UTC)
        out["end-time"] = _rfc3339(end)
        out["duration"] = go_duration(elapsed)
        return BindingResponse(body, out)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
