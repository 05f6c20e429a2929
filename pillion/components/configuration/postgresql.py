"""The `configuration.postgresql` store: a KEY/VALUE/VERSION/METADATA table and LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pillion.components.configuration.api import (
    ConfigurationError,
    ConfigurationItem,
    ConfigurationStore,
    ConfigurationSubscription,
    Feature,
    UpdateHandler,
)
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode

log = logging.getLogger(__name__)

NOTIFY_CHANNEL_KEY = "pgNotifyChannel"
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


@dataclass(frozen=True)
class PostgresConfigurationMetadata:
    """Dapr's `configuration.postgresql` metadata."""

    connection_string: str = field(default="", metadata={"name": "connectionString"})
    table: str = field(default="", metadata={"name": "table"})


def _metadata(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw else {}
        except ValueError:
            return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def _item(value: Any, version: Any, metadata: Any) -> ConfigurationItem:
    return ConfigurationItem(
        "" if value is None else str(value),
        "" if version is None else str(version),
        _metadata(metadata),
    )


class PostgresConfigurationStore(ConfigurationStore):
    """Reads the table on each get; subscriptions LISTEN on `pgNotifyChannel`.

    As in Dapr, the user creates the trigger that NOTIFYs the channel with a JSON payload
    `{"table", "action", "data": <row as JSON>}`; a DELETE notifies an empty item.
    """

    def __init__(self) -> None:
        self._conninfo = ""
        self._table: sql.Composable = sql.SQL("")
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._subs: set[_PgSubscription] = set()

    async def init(self, info: ComponentInfo) -> None:
        md = decode(PostgresConfigurationMetadata, info.properties)
        if not md.connection_string:
            raise ComponentConfigError("connectionString", "is required")
        if not md.table:
            raise ComponentConfigError("table", "is required")
        if not _TABLE.match(md.table):
            raise ComponentConfigError("table", f"invalid table name {md.table!r}")
        self._conninfo = md.connection_string
        self._table = sql.Identifier(*md.table.split("."))
        try:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await self._conn.execute(sql.SQL("SELECT 1 FROM {} WHERE false").format(self._table))
        except psycopg.Error as exc:
            raise ConfigurationError(f"postgresql store: {exc}") from exc

    def features(self) -> frozenset[Feature]:
        return frozenset()

    async def get(
        self, keys: Sequence[str], metadata: Mapping[str, str]
    ) -> dict[str, ConfigurationItem]:
        if self._conn is None:
            raise ConfigurationError("the store is not initialised")
        query = sql.SQL("SELECT KEY, VALUE, VERSION, METADATA FROM {}").format(self._table)
        params: tuple[Any, ...] = ()
        if keys:
            query = query + sql.SQL(" WHERE KEY = ANY(%s)")
            params = (list(keys),)
        try:
            async with self._lock:
                cur = await self._conn.execute(query, params)
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise ConfigurationError(str(exc)) from exc
        return {str(k): _item(v, ver, md) for k, v, ver, md in rows}

    async def subscribe(
        self, keys: Sequence[str], metadata: Mapping[str, str], handler: UpdateHandler
    ) -> ConfigurationSubscription:
        channel = metadata.get(NOTIFY_CHANNEL_KEY, "")
        if not channel:
            raise ConfigurationError(f"subscribe metadata {NOTIFY_CHANNEL_KEY} is required")
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            raise ConfigurationError(str(exc)) from exc
        sub = _PgSubscription(self, conn, frozenset(keys), handler)
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class _PgSubscription(ConfigurationSubscription):
    def __init__(
        self,
        store: PostgresConfigurationStore,
        conn: psycopg.AsyncConnection[Any],
        keys: frozenset[str],
        handler: UpdateHandler,
    ) -> None:
        self._store = store
        self._conn = conn
        self._keys = keys
        self._handler = handler
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for n in self._conn.notifies():
                update = self._parse(n.payload)
                if update is None:
                    continue
                try:
                    await self._handler(update)
                except Exception:
                    log.exception("configuration.postgresql: update handler failed")
        except psycopg.Error as exc:
            log.warning("configuration.postgresql: subscription ended: %s", exc)

    def _parse(self, payload: str) -> dict[str, ConfigurationItem] | None:
        try:
            doc = json.loads(payload)
            data = doc["data"]
            row = {str(k).lower(): v for k, v in data.items()}
            key = str(row["key"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("configuration.postgresql: ignoring a malformed notification")
            return None
        if self._keys and key not in self._keys:
            return None
        if str(doc.get("action", "")).upper() == "DELETE":
            return {key: ConfigurationItem()}
        return {key: _item(row.get("value"), row.get("version"), row.get("metadata"))}

    async def close(self) -> None:
        if self not in self._store._subs:
            return
        self._store._subs.discard(self)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(Exception):
            await self._conn.close()
