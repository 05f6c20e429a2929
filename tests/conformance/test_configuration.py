"""Configuration store conformance: `configuration.redis` and `.postgresql` on real servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pillion.components import registry
from pillion.components.configuration.api import ConfigurationItem, ConfigurationStore
from pillion.components.metadata import ComponentInfo, Properties
from tests.conformance.conftest import require_server

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
DEADLINE = 5.0


@dataclass
class Row:
    """One store under test: how to write and delete keys and what to subscribe with."""

    store: ConfigurationStore
    prefix: str
    set: Callable[[str, str, str], Awaitable[None]]
    delete: Callable[[str], Awaitable[None]]
    sub_metadata: dict[str, str]


def create_notify_trigger_sql(table: str, channel: str) -> str:
    """The trigger Dapr's docs ask users to create: NOTIFY `channel` with the row as JSON."""
    fn = f"{table}_notify"
    return f"""
CREATE OR REPLACE FUNCTION {fn}() RETURNS TRIGGER AS $$
    DECLARE
        data json;
        notification json;
    BEGIN
        IF (TG_OP = 'DELETE') THEN
            data = row_to_json(OLD);
        ELSE
            data = row_to_json(NEW);
        END IF;
        notification = json_build_object('table', TG_TABLE_NAME, 'action', TG_OP, 'data', data);
        PERFORM pg_notify('{channel}', notification::text);
        RETURN NULL;
    END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER {table}_trigger AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE PROCEDURE {fn}();
"""


async def _init(kind: str, props: dict[str, str]) -> ConfigurationStore:
    store: ConfigurationStore = registry.load(kind)()
    await store.init(ComponentInfo("configstore", kind, "v1", "app", Properties(props)))
    return store


@pytest.fixture(params=["redis", "postgresql"])
def row(request: pytest.FixtureRequest, aio: asyncio.Runner) -> Iterator[Row]:
    prefix = f"conf{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        require_server("redis", "127.0.0.1", 6379)
        import redis.asyncio as aioredis

        client = aioredis.Redis(host="127.0.0.1", port=6379, db=0)

        async def rset(key: str, value: str, version: str) -> None:
            await client.set(key, f"{value}||{version}" if version else value)

        async def rdel(key: str) -> None:
            await client.delete(key)

        store = aio.run(_init("configuration.redis", {"redisHost": "127.0.0.1:6379"}))
        yield Row(store, prefix, rset, rdel, {})
        aio.run(store.close())

        async def cleanup() -> None:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

        aio.run(cleanup())
        return
    require_server("postgresql", "127.0.0.1", 5432)
    import psycopg

    table = prefix
    channel = f"{prefix}_ch"
    conn: Any = aio.run(psycopg.AsyncConnection.connect(PG_DSN, autocommit=True))

    async def setup() -> None:
        await conn.execute(
            f"CREATE TABLE {table} (KEY VARCHAR NOT NULL PRIMARY KEY, VALUE VARCHAR NOT NULL, "
            "VERSION VARCHAR NOT NULL, METADATA JSON)"
        )
        await conn.execute(create_notify_trigger_sql(table, channel))

    async def pset(key: str, value: str, version: str) -> None:
        await conn.execute(
            f"INSERT INTO {table} (KEY, VALUE, VERSION, METADATA) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (KEY) DO UPDATE SET VALUE = EXCLUDED.VALUE, "
            "VERSION = EXCLUDED.VERSION, METADATA = EXCLUDED.METADATA",
            (key, value, version, '{"owner": "conf"}'),
        )

    async def pdel(key: str) -> None:
        await conn.execute(f"DELETE FROM {table} WHERE KEY = %s", (key,))

    aio.run(setup())
    store = aio.run(_init("configuration.postgresql", {"connectionString": PG_DSN, "table": table}))
    yield Row(store, prefix, pset, pdel, {"pgNotifyChannel": channel})
    aio.run(store.close())

    async def drop() -> None:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {table}_notify()")
        await conn.close()

    aio.run(drop())


async def _updates(
    row: Row, keys: list[str]
) -> tuple[Any, asyncio.Queue[dict[str, ConfigurationItem]]]:
    q: asyncio.Queue[dict[str, ConfigurationItem]] = asyncio.Queue()

    async def handler(batch: dict[str, ConfigurationItem]) -> None:
        q.put_nowait(batch)

    sub = await row.store.subscribe(keys, row.sub_metadata, handler)
    return sub, q


async def _next(q: asyncio.Queue[dict[str, ConfigurationItem]]) -> dict[str, ConfigurationItem]:
    return await asyncio.wait_for(q.get(), DEADLINE)


async def test_get_some_and_all_keys(row: Row, aio: asyncio.Runner) -> None:
    a, b = f"{row.prefix}a", f"{row.prefix}b"
    await row.set(a, "1", "v1")
    await row.set(b, "two", "")
    some = await row.store.get([a, f"{row.prefix}missing"], {})
    assert list(some) == [a]
    assert (some[a].value, some[a].version) == ("1", "v1")
    every = await row.store.get([], {})
    assert {a, b} <= set(every)
    assert (every[b].value, every[b].version) == ("two", "")
    assert row.store.features() == frozenset()


async def test_subscribe_receives_changes_until_closed(row: Row, aio: asyncio.Runner) -> None:
    a, other = f"{row.prefix}a", f"{row.prefix}other"
    sub, q = await _updates(row, [a])
    await asyncio.sleep(0.2)
    await row.set(other, "ignored", "1")
    await row.set(a, "new", "2")
    batch = await _next(q)
    assert list(batch) == [a]
    assert (batch[a].value, batch[a].version) == ("new", "2")
    await row.delete(a)
    batch = await _next(q)
    assert batch == {a: ConfigurationItem()}
    await sub.close()
    await sub.close()  # idempotent
    await row.set(a, "after", "3")
    await asyncio.sleep(0.5)
    assert q.empty()


async def test_subscribe_to_every_key(row: Row, aio: asyncio.Runner) -> None:
    sub, q = await _updates(row, [])
    await asyncio.sleep(0.2)
    key = f"{row.prefix}any"
    await row.set(key, "x", "7")
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:  # other tests' keys may change too on a shared server
        batch = await asyncio.wait_for(q.get(), deadline - asyncio.get_running_loop().time())
        if key in batch:
            break
    assert (batch[key].value, batch[key].version) == ("x", "7")
    await sub.close()
