"""SQLite state store specifics: group commit, sharing a file, lock waits, cleanup, metadata."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from pillion.components.state.api import (
    TTL_KEY,
    DeleteRequest,
    ETagMismatch,
    GetRequest,
    SetRequest,
    StateError,
)
from pillion.components.state.sqlite import SCHEMA_VERSION, SQLiteStateStore

REPO = Path(__file__).resolve().parents[3]


def info(**props: str) -> ComponentInfo:
    return ComponentInfo(
        name="statestore",
        type="state.sqlite",
        version="v1",
        app_id="app",
        properties=Properties(props),
    )


async def open_store(db: Path | str, **props: str) -> SQLiteStateStore:
    store = SQLiteStateStore()
    await store.init(info(connectionString=str(db), **props))
    return store


def raw_count(db: Path, table: str = "state") -> int:
    with sqlite3.connect(db) as conn:
        n: int = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    return n


def test_concurrent_writes_share_a_commit(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        try:
            before = store.commits
            await asyncio.gather(
                *(store.set(SetRequest(f"app||k{i}", str(i).encode())) for i in range(200))
            )
            assert store.commits - before <= 5, store.commits - before
            items = await store.bulk_get([GetRequest(f"app||k{i}") for i in range(200)])
            assert [i.data for i in items] == [str(n).encode() for n in range(200)]
            # A lone write still commits on its own, promptly.
            before = store.commits
            await store.set(SetRequest("app||lone", b"1"))
            assert store.commits == before + 1
        finally:
            await store.close()

    asyncio.run(main())


def test_large_bursts_are_split_into_bounded_batches(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        try:
            before = store.commits
            await asyncio.gather(*(store.set(SetRequest(f"app||{i}", b"v")) for i in range(2500)))
            assert store.commits - before == 3
        finally:
            await store.close()

    asyncio.run(main())
    assert raw_count(tmp_path / "s.db") == 2500


def test_failure_in_a_batch_fails_only_that_unit(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        try:
            await store.set(SetRequest("app||x", b"x0"))
            stale = (await store.get(GetRequest("app||x"))).etag  # type: ignore[union-attr]
            await store.set(SetRequest("app||x", b"x1"))
            before = store.commits
            results = await asyncio.gather(
                store.set(SetRequest("app||a", b"a")),
                store.set(SetRequest("app||x", b"x2", etag=stale)),
                store.multi([SetRequest("app||t1", b"t"), DeleteRequest("app||x", etag=stale)], {}),
                store.multi([SetRequest("app||t2", b"t"), DeleteRequest("app||a")], {}),
                store.delete(DeleteRequest("app||x", etag=stale)),
                store.set(SetRequest("app||b", b"b")),
                return_exceptions=True,
            )
            assert store.commits == before + 1
            assert results[0] is None and results[3] is None and results[5] is None
            for r in (results[1], results[2], results[4]):
                assert isinstance(r, ETagMismatch), r
            got = {
                i.key: i.data
                for i in await store.bulk_get(
                    [GetRequest(f"app||{n}") for n in ("a", "b", "x", "t1", "t2")]
                )
            }
            # The second transaction deleted "a" after the first set in the same batch.
            assert got == {
                "app||a": None,
                "app||b": b"b",
                "app||x": b"x1",
                "app||t1": None,
                "app||t2": b"t",
            }
        finally:
            await store.close()

    asyncio.run(main())


def test_ttl_error_is_raised_before_batching(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        try:
            results = await asyncio.gather(
                store.set(SetRequest("app||ok", b"1")),
                store.set(SetRequest("app||bad", b"1", metadata={TTL_KEY: "0"})),
                return_exceptions=True,
            )
            assert results[0] is None
            assert isinstance(results[1], ValueError)
            assert await store.get(GetRequest("app||ok")) is not None
        finally:
            await store.close()

    asyncio.run(main())


def test_two_instances_on_one_file_see_each_other(tmp_path: Path) -> None:
    async def main() -> None:
        a = await open_store(tmp_path / "shared.db")
        b = await open_store(tmp_path / "shared.db")
        try:
            await a.set(SetRequest("app||k", b"from-a"))
            got = await b.get(GetRequest("app||k"))
            assert got is not None and got.data == b"from-a"
            await b.set(SetRequest("app||k", b"from-b", etag=got.etag))
            with pytest.raises(ETagMismatch):
                await a.set(SetRequest("app||k", b"late", etag=got.etag))
            await asyncio.gather(
                a.set(SetRequest("app||a", b"1")), b.set(SetRequest("app||b", b"2"))
            )
            items = await a.bulk_get([GetRequest("app||a"), GetRequest("app||b")])
            assert [i.data for i in items] == [b"1", b"2"]
            await a.delete(DeleteRequest("app||k"))
            assert await b.get(GetRequest("app||k")) is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


_CHILD = """
import asyncio, sys
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import SetRequest
from pillion.components.state.sqlite import SQLiteStateStore

async def main():
    store = SQLiteStateStore()
    props = Properties({"connectionString": sys.argv[1], "busyTimeout": "10s"})
    await store.init(ComponentInfo("statestore", "state.sqlite", "v1", "child", props))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    errors = 0
    async def worker(w):
        nonlocal errors
        for i in range(w, 500, 8):
            try:
                await store.set(SetRequest(f"child||{i}", b"c"))
                await store.set(SetRequest("shared||k", b"child"))
            except Exception as exc:
                errors += 1
                print("error", exc, file=sys.stderr)
    await asyncio.gather(*(worker(w) for w in range(8)))
    await store.close()
    print("errors", errors, flush=True)

asyncio.run(main())
"""


def test_second_process_writes_concurrently(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"

    async def main() -> None:
        store = await open_store(db, busyTimeout="10s")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == b"ready\n", line
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            errors: list[BaseException] = []

            async def worker(w: int) -> None:
                for i in range(w, 500, 8):
                    try:
                        await store.set(SetRequest(f"parent||{i}", b"p"))
                        await store.set(SetRequest("shared||k", b"parent"))
                    except StateError as exc:
                        errors.append(exc)

            await asyncio.gather(*(worker(w) for w in range(8)))
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip().endswith("errors 0"), (out + err).decode()
            assert errors == []
            items = await store.bulk_get(
                [GetRequest(f"{who}||{i}") for who in ("parent", "child") for i in range(500)]
            )
            assert all(i.data is not None for i in items)
            print(f"parent: {store.commits} commits, {store.lock_waits} lock waits")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await store.close()

    asyncio.run(main())
    assert raw_count(db) == 1001


def test_waits_for_another_process_lock_without_blocking_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "s.db"

    async def main() -> None:
        store = await open_store(db, busyTimeout="5s")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another "process" holds the write lock
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, other.execute, "COMMIT")
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            tick_task = asyncio.create_task(ticker())
            started = time.monotonic()
            await store.set(SetRequest("app||k", b"1"))
            waited = time.monotonic() - started
            tick_task.cancel()
            assert 0.25 <= waited < 3, waited
            assert ticks >= 10, "the event loop was blocked while waiting for the lock"
            assert (await store.get(GetRequest("app||k"))) is not None
        finally:
            other.close()
            await store.close()

    asyncio.run(main())


def test_lock_held_past_busy_timeout_fails_with_state_error(tmp_path: Path) -> None:
    db = tmp_path / "s.db"

    async def main() -> None:
        store = await open_store(db, busyTimeout="200ms")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            results = await asyncio.gather(
                store.set(SetRequest("app||a", b"1")),
                store.multi([SetRequest("app||b", b"1")], {}),
                return_exceptions=True,
            )
            for r in results:
                assert isinstance(r, StateError) and not isinstance(r, ETagMismatch), r
                assert "locked" in str(r)
            other.execute("COMMIT")
            await store.set(SetRequest("app||a", b"2"))
            got = await store.get(GetRequest("app||a"))
            assert got is not None and got.data == b"2"
        finally:
            other.close()
            await store.close()

    asyncio.run(main())


def test_cleanup_purges_expired_rows(tmp_path: Path) -> None:
    async def main() -> None:
        cleaning = await open_store(tmp_path / "a.db", cleanupInterval="200ms")
        idle = await open_store(tmp_path / "b.db", cleanupInterval="0")
        try:
            for store in (cleaning, idle):
                await store.set(SetRequest("app||short", b"1", metadata={TTL_KEY: "1"}))
                await store.set(SetRequest("app||keep", b"1"))
            deadline = time.monotonic() + 10
            while raw_count(tmp_path / "a.db") != 1:
                assert time.monotonic() < deadline, "expired row never purged"
                await asyncio.sleep(0.05)
            # Expired but, with cleanup disabled, still on disk (and invisible to reads).
            assert raw_count(tmp_path / "b.db") == 2
            assert await idle.get(GetRequest("app||short")) is None
            assert await cleaning.get(GetRequest("app||keep")) is not None
        finally:
            await cleaning.close()
            await idle.close()

    asyncio.run(main())


def test_cleanup_takes_turns_across_instances(tmp_path: Path) -> None:
    async def main() -> None:
        # The background rounds would only run in an hour; the test drives rounds itself.
        a = await open_store(tmp_path / "s.db", cleanupInterval="1h")
        b = await open_store(tmp_path / "s.db", cleanupInterval="1h")
        try:
            await a.set(SetRequest("app||x", b"1", metadata={TTL_KEY: "1"}))
            with sqlite3.connect(tmp_path / "s.db") as conn:
                conn.execute('UPDATE "state" SET expiration_time = ?', (time.time() - 1,))
            assert await a.cleanup_expired() == 1
            await a.set(SetRequest("app||y", b"1", metadata={TTL_KEY: "1"}))
            with sqlite3.connect(tmp_path / "s.db") as conn:
                conn.execute('UPDATE "state" SET expiration_time = ?', (time.time() - 1,))
            # b finds a's recent cleanup recorded and skips its turn.
            assert await b.cleanup_expired() == 0
            assert raw_count(tmp_path / "s.db") == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_schema_and_pragmas(tmp_path: Path) -> None:
    db = tmp_path / "s.db"

    async def main() -> None:
        store = await open_store(db, tableName="custom", metadataTableName="custom_meta")
        await store.set(SetRequest("app||k", b"v"))
        await store.close()
        again = await open_store(db, tableName="custom", metadataTableName="custom_meta")
        got = await again.get(GetRequest("app||k"))
        assert got is not None and got.data == b"v"
        await again.close()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM custom_meta WHERE key = 'schema-version'")
        assert version.fetchone()[0] == str(SCHEMA_VERSION)
        assert conn.execute("SELECT COUNT(*) FROM custom").fetchone()[0] == 1


def test_disable_wal_and_uri(tmp_path: Path) -> None:
    db = tmp_path / "s.db"

    async def main() -> None:
        store = await open_store(f"file:{db}?mode=rwc", disableWAL="true")
        await store.set(SetRequest("app||k", b"v"))
        assert await store.get(GetRequest("app||k")) is not None
        await store.close()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        assert conn.execute("SELECT COUNT(*) FROM state").fetchone()[0] == 1


def test_in_memory_database(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(":memory:")
        await store.set(SetRequest("app||k", b"v"))
        got = await store.get(GetRequest("app||k"))
        assert got is not None and got.data == b"v"
        await store.close()

    asyncio.run(main())


def test_database_file_alias(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStateStore()
        await store.init(info(databaseFile=str(tmp_path / "alias.db")))
        await store.set(SetRequest("app||k", b"v"))
        await store.close()

    asyncio.run(main())
    assert raw_count(tmp_path / "alias.db") == 1


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "connectionString"),
        ({"connectionString": "  "}, "connectionString"),
        ({"tableName": "state; DROP TABLE x"}, "tableName"),
        ({"tableName": "1abc"}, "tableName"),
        ({"metadataTableName": "a-b"}, "metadataTableName"),
        ({"busyTimeout": "soon"}, "busyTimeout"),
        ({"disableWAL": "maybe"}, "disableWAL"),
    ],
)
def test_bad_metadata(tmp_path: Path, props: dict[str, str], field: str) -> None:
    if field != "connectionString":
        props = {"connectionString": str(tmp_path / "s.db"), **props}

    async def main() -> None:
        await SQLiteStateStore().init(info(**props))

    with pytest.raises(ComponentConfigError) as err:
        asyncio.run(main())
    assert err.value.field == field


def test_unopenable_file_is_a_state_error(tmp_path: Path) -> None:
    async def main() -> None:
        await open_store(tmp_path / "no" / "such" / "dir" / "s.db")

    with pytest.raises(StateError, match="unable to open"):
        asyncio.run(main())


def test_closed_store_rejects_calls(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        await store.close()
        with pytest.raises(StateError):
            await store.set(SetRequest("app||k", b"v"))
        with pytest.raises(StateError):
            await store.get(GetRequest("app||k"))

    asyncio.run(main())


def test_close_commits_queued_writes(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "s.db")
        tasks = [asyncio.ensure_future(store.set(SetRequest(f"app||{i}", b"v"))) for i in range(5)]
        await asyncio.sleep(0)  # the sets are queued, the flush not yet run
        await store.close()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert raw_count(tmp_path / "s.db") == 5
