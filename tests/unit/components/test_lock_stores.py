"""lock.sqlite and lock.redis details the conformance suite does not cover: metadata, busy waits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from pillion.components.lock.api import LockError, UnlockStatus
from pillion.components.lock.redis import RedisLockMetadata, RedisLockStore
from pillion.components.lock.sqlite import SQLiteLockStore
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode


async def open_sqlite(db: Path | str, **md: str) -> SQLiteLockStore:
    store = SQLiteLockStore()
    props = Properties({"connectionString": str(db), **md})
    await store.init(ComponentInfo("lockstore", "lock.sqlite", "v1", "app", props))
    return store


# --- lock.sqlite -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("md", "field"),
    [
        ({}, "connectionString"),
        ({"connectionString": "  "}, "connectionString"),
        ({"connectionString": "x.db", "tableName": "bad name"}, "tableName"),
        ({"connectionString": "x.db", "busyTimeout": "-1s"}, "busyTimeout"),
        ({"connectionString": "x.db", "timeout": "0s"}, "timeout"),
        ({"connectionString": "x.db", "cleanupInterval": "-1s"}, "cleanupInterval"),
    ],
)
def test_sqlite_metadata_errors(md: dict[str, str], field: str) -> None:
    store = SQLiteLockStore()
    info = ComponentInfo("lockstore", "lock.sqlite", "v1", "app", Properties(md))
    with pytest.raises(ComponentConfigError) as ei:
        asyncio.run(store.init(info))
    assert ei.value.field == field


def test_sqlite_database_file_alias_and_table_name(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteLockStore()
        props = Properties({"databaseFile": str(tmp_path / "l.db"), "tableName": "my_locks"})
        await store.init(ComponentInfo("lockstore", "lock.sqlite", "v1", "app", props))
        try:
            assert await store.try_lock("r", "o", 5)
        finally:
            await store.close()
        with sqlite3.connect(tmp_path / "l.db") as c:
            (owner, expires) = c.execute("SELECT owner, expires FROM my_locks").fetchone()
        assert owner == "o"
        assert time.time() + 3 < expires <= time.time() + 5

    asyncio.run(main())


def test_sqlite_waits_for_another_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "l.db"

    async def main() -> None:
        store = await open_sqlite(db, busyTimeout="5s")
        other = sqlite3.connect(db, isolation_level=None)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        try:
            other.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
            started = time.monotonic()
            assert await store.try_lock("r", "o", 5)
            waited = time.monotonic() - started
            assert 0.25 <= waited < 3, waited
            assert ticks >= 10, "the event loop was blocked while waiting for the lock"
        finally:
            ticker.cancel()
            other.close()
            await store.close()

    asyncio.run(main())


def test_sqlite_writer_held_past_busy_timeout_is_a_lock_error(tmp_path: Path) -> None:
    db = tmp_path / "l.db"

    async def main() -> None:
        store = await open_sqlite(db, busyTimeout="200ms")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            for aw in (store.try_lock("r", "o", 5), store.unlock("r", "o")):
                with pytest.raises(LockError, match="locked"):
                    await aw
            other.execute("COMMIT")
            assert await store.try_lock("r", "o", 5)
            assert await store.unlock("r", "o") == UnlockStatus.SUCCESS
        finally:
            other.close()
            await store.close()

    asyncio.run(main())


def test_sqlite_cleanup_deletes_expired_rows(tmp_path: Path) -> None:
    db = tmp_path / "l.db"

    async def main() -> None:
        store = await open_sqlite(db, cleanupInterval="100ms")
        try:
            assert await store.try_lock("short", "o", 1)
            deadline = time.monotonic() + 5
            while True:
                # Each acquire may clean up; "short" goes once its expiry has passed.
                assert await store.try_lock(f"probe-{time.monotonic()}", "o", 60)
                with sqlite3.connect(db) as c:
                    left = c.execute("SELECT 1 FROM locks WHERE resource = 'short'").fetchall()
                if not left:
                    break
                assert time.monotonic() < deadline, "expired row never cleaned up"
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    asyncio.run(main())


def test_sqlite_closed_store_is_a_lock_error(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_sqlite(tmp_path / "l.db")
        await store.close()
        await store.close()  # a second close is harmless
        with pytest.raises(LockError):
            await store.try_lock("r", "o", 5)

    asyncio.run(main())


# --- lock.redis --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("md", "field"),
    [
        ({}, "redisHost"),
        ({"redisHost": "a:6379,b:6379"}, "redisHost"),
        ({"redisHost": "localhost:6379", "redisType": "cluster"}, "redisType"),
        ({"redisHost": "localhost:6379", "failover": "true"}, "failover"),
        ({"redisHost": "localhost:6379", "clientCert": "x"}, "clientCert"),
        ({"redisHost": "localhost:6379", "redisDB": "-1"}, "redisDB"),
    ],
)
def test_redis_metadata_errors(md: dict[str, str], field: str) -> None:
    store = RedisLockStore()
    info = ComponentInfo("lockstore", "lock.redis", "v1", "app", Properties(md))
    with pytest.raises(ComponentConfigError) as ei:
        asyncio.run(store.init(info))
    assert ei.value.field == field


def test_redis_metadata_defaults() -> None:
    meta = decode(RedisLockMetadata, {"redisHost": "127.0.0.1", "enableTLS": "true"})
    meta.validate()
    assert meta.address() == ("127.0.0.1", 6379)
    assert (meta.redis_db, meta.enable_tls, meta.retries()) == (0, True, 3)


def test_redis_unreachable_is_a_lock_error() -> None:
    store = RedisLockStore()
    props = Properties({"redisHost": "127.0.0.1:1", "redisMaxRetries": "-1", "dialTimeout": "1s"})
    with pytest.raises(LockError, match=r"cannot connect to redis at 127\.0\.0\.1:1"):
        asyncio.run(store.init(ComponentInfo("lockstore", "lock.redis", "v1", "app", props)))
