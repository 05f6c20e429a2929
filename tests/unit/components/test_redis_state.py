"""Redis state store specifics: Dapr's layout, numeric etags, races, TTLs, rollbacks, reconnects."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.state.api import (
    TTL_EXPIRE_KEY,
    TTL_KEY,
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    GetRequest,
    Operation,
    SetRequest,
    StateError,
)
from pillion.components.state.redis import (
    DATA_FIELD,
    SEQUENCE_KEY,
    VERSION_FIELD,
    RedisStateMetadata,
    RedisStateStore,
    _millis_integers,
)
from tests.conformance.conftest import require_server
from tests.polling import run

HOST, PORT = "127.0.0.1", 6379
# This module's own database: flushed before and after each test (the conformance suite
# uses 15).
DB = 14


def _flush() -> None:
    r = redis.Redis(host=HOST, port=PORT, db=DB)
    try:
        r.flushdb()
    finally:
        r.close()


@pytest.fixture
def db() -> Iterator[None]:
    require_server("redis", HOST, PORT)
    _flush()
    yield
    _flush()


def info(**props: str) -> ComponentInfo:
    return ComponentInfo(
        name="statestore",
        type="state.redis",
        version="v1",
        app_id="app",
        properties=Properties(props),
    )


async def open_store(port: int = PORT, /, **props: str) -> RedisStateStore:
    store = RedisStateStore()
    await store.init(info(**{"redisHost": f"{HOST}:{port}", "redisDB": str(DB), **props}))
    return store


@contextlib.asynccontextmanager
async def stores(n: int = 1, **props: str) -> AsyncIterator[list[RedisStateStore]]:
    """`n` stores on the same database, like sidecars sharing one Redis."""
    opened: list[RedisStateStore] = []
    try:
        for _ in range(n):
            opened.append(await open_store(**props))
        yield opened
    finally:
        for s in opened:
            await s.close()


@contextlib.asynccontextmanager
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test database, for looking at what the store wrote."""
    client = aioredis.Redis(host=HOST, port=PORT, db=DB)
    try:
        yield client
    finally:
        await client.aclose()


async def etag_of(store: RedisStateStore, key: str) -> str:
    resp = await store.get(GetRequest(key))
    assert resp is not None and resp.etag is not None
    return resp.etag


# -- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "redisHost"),
        ({"redisHost": "  "}, "redisHost"),
        ({"redisHost": "localhost:port"}, "redisHost"),
        ({"redisHost": "a:6379,b:6379"}, "redisHost"),
        ({"redisHost": "localhost:6379", "redisPort": "6380"}, "redisPort"),
        ({"redisHost": "localhost", "redisDB": "one"}, "redisDB"),
        ({"redisHost": "localhost", "redisDB": "-1"}, "redisDB"),
        ({"redisHost": "localhost", "enableTLS": "maybe"}, "enableTLS"),
        ({"redisHost": "localhost", "redisType": "cluster"}, "redisType"),
        ({"redisHost": "localhost", "failover": "true"}, "failover"),
        ({"redisHost": "localhost", "clientCert": "PEM"}, "clientCert"),
        ({"redisHost": "localhost", "maxRetries": "-2"}, "redisMaxRetries"),
        ({"redisHost": "localhost", "maxRetryBackoff": "soon"}, "maxRetryBackoff"),
        ({"redisHost": "localhost", "dialTimeout": "soon"}, "dialTimeout"),
        ({"redisHost": "localhost", "poolSize": "-1"}, "poolSize"),
        ({"redisHost": "localhost", "ttlInSeconds": "1.5"}, "ttlInSeconds"),
    ],
)
def test_bad_metadata_names_the_field(props: dict[str, str], field: str) -> None:
    async def main() -> None:
        with pytest.raises(ComponentConfigError) as err:
            await RedisStateStore().init(info(**props))
        assert err.value.field == field

    run(main)


def test_metadata_uses_daprs_names_and_units() -> None:
    def meta(**props: str) -> RedisStateMetadata:
        return decode(RedisStateMetadata, _millis_integers(Properties(props)))

    m = meta(
        redisHost="redis.local",
        REDISPASSWORD="pw",
        maxRetries="5",
        maxRetryBackoff="2s",
        dialTimeout="250",  # Dapr's redis durations: a bare integer is milliseconds
        readTimeout="-1",
        ttlInSeconds="600",
        actorStateStore="true",
        keyPrefix="name",
        queryIndexes="[]",
    )
    assert m.address() == ("redis.local", 6379)
    assert m.redis_password == "pw"
    assert (m.max_retries, m.retries(), m.max_retry_interval) == (5, 5, 2.0)
    assert m.dial_timeout == pytest.approx(0.25)
    assert m.read_timeout < 0
    assert m.default_ttl() == 600
    # redisMaxRetryInterval wins over its alias; -1 disables retries, 0 means go-redis's 3.
    both = meta(redisHost="h", redisMaxRetryInterval="1s", maxRetryBackoff="9s")
    assert both.max_retry_interval == 1.0
    assert meta(redisHost="h", redisMaxRetries="-1").retries() == 0
    assert meta(redisHost="h", maxRetries="0").retries() == 3
    assert meta(redisHost="h").retries() == 3
    # Dapr applies no default TTL for 0 or a negative one.
    assert meta(redisHost="h", ttlInSeconds="0").default_ttl() == 0
    assert meta(redisHost="h", ttlInSeconds="-1").default_ttl() == 0


def test_unreachable_server_fails_init_with_state_error() -> None:
    async def main() -> None:
        store = RedisStateStore()
        with pytest.raises(StateError, match=r"cannot connect to redis at 127\.0\.0\.1:1"):
            await store.init(info(redisHost="127.0.0.1:1", dialTimeout="1s", maxRetries="-1"))
        with pytest.raises(StateError, match="closed"):
            await store.get(GetRequest("app||k"))

    run(main)


# -- layout and etags -------------------------------------------------------------------------


def test_stored_layout_is_daprs(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            await store.set(SetRequest("app||k", b'{"a": 1}'))
            assert await r.type("app||k") == b"hash"
            assert await r.hgetall("app||k") == {b"data": b'{"a": 1}', b"version": b"1"}
            assert await r.ttl("app||k") == -1
            # Raw bytes go in as they are.
            await store.set(SetRequest("app||bin", bytes(range(256))))
            assert await r.hget("app||bin", DATA_FIELD) == bytes(range(256))
            resp = await store.get(GetRequest("app||k"))
            assert resp is not None
            assert (resp.data, resp.etag, dict(resp.metadata)) == (b'{"a": 1}', "1", {})

    run(main)


def test_numeric_etags_increment_per_write(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            seen = []
            for i in range(5):
                await store.set(SetRequest("app||counter", str(i).encode()))
                seen.append(await etag_of(store, "app||counter"))
                assert await r.hget("app||counter", VERSION_FIELD) == seen[-1].encode()
            assert seen == ["1", "2", "3", "4", "5"]
            # Etag-checked, first-write and transactional writes count the same way.
            await store.set(SetRequest("app||counter", b"x", etag="5"))
            await store.multi([SetRequest("app||counter", b"y", etag="6")], {})
            assert await etag_of(store, "app||counter") == "7"
            await store.set(SetRequest("app||fresh", b"f", concurrency=Concurrency.FIRST_WRITE))
            assert int(await etag_of(store, "app||fresh")) > 0

    run(main)


def test_recreated_key_starts_above_its_old_versions(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            for _ in range(5):
                await store.set(SetRequest("app||k", b"v"))
            await store.delete(DeleteRequest("app||k"))
            await store.set(SetRequest("app||k", b"again"))
            assert int(await etag_of(store, "app||k")) == 6
            for stale in ("1", "5"):
                with pytest.raises(ETagMismatch):
                    await store.set(SetRequest("app||k", b"x", etag=stale))
            # Expiry is a delete Redis does by itself; the sequence covers it too.
            await store.set(SetRequest("app||k", b"short", metadata={TTL_KEY: "1"}))
            expired = await etag_of(store, "app||k")
            assert expired == "7"
            await r.pexpire("app||k", 1)
            await asyncio.sleep(0.01)
            await store.set(SetRequest("app||k", b"reborn"))
            assert int(await etag_of(store, "app||k")) > int(expired)
            assert int(await r.get(SEQUENCE_KEY) or 0) >= 8

    run(main)


@pytest.mark.parametrize(
    "etag", ["not-a-number", "1.0", "0x1", " 1", "\u0661", "99999999999999999999"]
)
def test_non_numeric_etag_is_invalid(db: None, etag: str) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            await store.set(SetRequest("app||k", b"1"))
            with pytest.raises(ETagInvalid):
                await store.set(SetRequest("app||k", b"2", etag=etag))
            with pytest.raises(ETagInvalid):
                await store.delete(DeleteRequest("app||k", etag=etag))
            ops: list[Operation] = [
                SetRequest("app||other", b"o"),
                SetRequest("app||k", b"3", etag=etag),
            ]
            with pytest.raises(ETagInvalid):
                await store.multi(ops, {})
            assert await r.hgetall("app||k") == {b"data": b"1", b"version": b"1"}
            assert not await r.exists("app||other")
            # Last-write ignores even a malformed etag.
            await store.set(
                SetRequest("app||k", b"4", etag=etag, concurrency=Concurrency.LAST_WRITE)
            )
            assert await etag_of(store, "app||k") == "2"

    run(main)


def test_etags_parse_like_go_atoi(db: None) -> None:
    async def main() -> None:
        async with stores() as [store]:
            await store.set(SetRequest("app||k", b"1"))
            await store.set(SetRequest("app||k", b"2", etag="+01"))  # Atoi reads 1
            with pytest.raises(ETagMismatch):
                await store.set(SetRequest("app||k", b"3", etag="-2"))
            assert await etag_of(store, "app||k") == "2"

    run(main)


def test_shares_keys_with_dapr_sidecars(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            # What Dapr's set script leaves after a first-write save.
            await r.hset("app||d", mapping={"data": b'"dapr"', "version": 7, "first-write": 0})
            resp = await store.get(GetRequest("app||d"))
            assert resp is not None and (resp.data, resp.etag) == (b'"dapr"', "7")
            await store.set(SetRequest("app||d", b'"pillion"', etag="7"))
            assert await r.hgetall("app||d") == {
                b"data": b'"pillion"',
                b"version": b"8",
                b"first-write": b"0",
            }
            # Dapr's next write: HSET data, HINCRBY version 1.
            await r.hset("app||d", "data", b'"dapr again"')
            assert await r.hincrby("app||d", "version", 1) == 9
            with pytest.raises(ETagMismatch):
                await store.set(SetRequest("app||d", b"x", etag="8"))
            await store.delete(DeleteRequest("app||d", etag="9"))
            assert not await r.exists("app||d")
            # The deleted key's version still bounds what a new key may start at.
            await store.set(SetRequest("app||d", b"new"))
            assert int(await etag_of(store, "app||d")) > 9

    run(main)


def test_keys_that_are_not_state_hashes(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            # A plain string (very old Dapr versions): read back without an etag, as Dapr does.
            await r.set("app||plain", b"legacy")
            resp = await store.get(GetRequest("app||plain"))
            assert resp is not None and (resp.data, resp.etag) == (b"legacy", None)
            with pytest.raises(ETagMismatch):
                await store.set(SetRequest("app||plain", b"x", etag="1"))
            await store.set(SetRequest("app||plain", b"new"))  # replaced, as Dapr's script does
            assert await r.hgetall("app||plain") == {b"data": b"new", b"version": b"1"}
            # Another type is an error for that key alone.
            await r.rpush("app||list", b"x")
            await r.hset("app||bare", "other", b"y")
            with pytest.raises(StateError, match="list"):
                await store.get(GetRequest("app||list"))
            with pytest.raises(StateError, match="'version'"):
                await store.get(GetRequest("app||bare"))
            items = await store.bulk_get(
                [GetRequest(k) for k in ("app||list", "app||plain", "app||bare", "app||none")]
            )
            assert [i.data for i in items] == [None, b"new", None, None]
            assert items[0].error and "list" in items[0].error
            assert items[2].error and "'version'" in items[2].error
            assert items[1].error is None and items[3].error is None
            with pytest.raises(ETagMismatch):
                await store.set(SetRequest("app||list", b"x", concurrency=Concurrency.FIRST_WRITE))
            await store.delete(DeleteRequest("app||list"))
            assert not await r.exists("app||list")

    run(main)


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_writers_with_one_etag_have_one_winner(db: None) -> None:
    async def main() -> None:
        # Two stores: the writers race across connections and "sidecars", not just a pool.
        async with stores(2) as both:
            key = "app||race"
            await both[0].set(SetRequest(key, b"start"))
            for rnd in range(20):
                etag = await etag_of(both[0], key)
                results = await asyncio.gather(
                    *(
                        both[i % 2].set(SetRequest(key, f"{rnd}-{i}".encode(), etag=etag))
                        for i in range(50)
                    ),
                    return_exceptions=True,
                )
                winners = [i for i, res in enumerate(results) if res is None]
                losers = [res for res in results if isinstance(res, ETagMismatch)]
                assert len(winners) == 1, results
                assert len(losers) == 49, results
                resp = await both[1].get(GetRequest(key))
                assert resp is not None
                assert resp.data == f"{rnd}-{winners[0]}".encode()
                assert resp.etag == str(int(etag) + 1)

    run(main)


def test_cas_counter_counts_every_success(db: None) -> None:
    async def main() -> None:
        async with stores(2) as both:
            key = "app||counter"
            await both[0].set(SetRequest(key, b"0"))
            successes = 0

            async def worker(store: RedisStateStore, attempts: int) -> None:
                nonlocal successes
                for _ in range(attempts):
                    resp = await store.get(GetRequest(key))
                    assert resp is not None
                    value = int(resp.data) + 1
                    try:
                        await store.set(SetRequest(key, str(value).encode(), etag=resp.etag))
                    except ETagMismatch:
                        continue
                    successes += 1

            await asyncio.gather(*(worker(both[i % 2], 40) for i in range(16)))
            resp = await both[0].get(GetRequest(key))
            assert resp is not None
            assert 0 < successes < 16 * 40  # there was contention, and progress
            assert int(resp.data) == successes
            assert resp.etag == str(1 + successes)

    run(main)


# -- TTL --------------------------------------------------------------------------------------


def test_ttl_expire_and_persist(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            before = time.time()
            await store.set(SetRequest("app||t", b"1", metadata={TTL_KEY: "100"}))
            assert 99_000 < await r.pttl("app||t") <= 100_000
            resp = await store.get(GetRequest("app||t"))
            assert resp is not None
            text = resp.metadata[TTL_EXPIRE_KEY]
            expires = calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
            assert before + 98 <= expires <= time.time() + 101
            # An update without a TTL clears it, like the other stores (Dapr's own keeps it).
            await store.set(SetRequest("app||t", b"2"))
            assert await r.ttl("app||t") == -1
            await store.set(SetRequest("app||t", b"3", metadata={TTL_KEY: "100"}))
            await store.set(SetRequest("app||t", b"4", metadata={TTL_KEY: "-1"}))
            assert await r.ttl("app||t") == -1
            # Transactions set and clear expiries per operation.
            ops: list[Operation] = [
                SetRequest("app||a", b"a", metadata={TTL_KEY: "50"}),
                SetRequest("app||t", b"5", metadata={TTL_KEY: "60"}),
                SetRequest("app||t", b"6"),
            ]
            await store.multi(ops, {})
            assert 49 <= await r.ttl("app||a") <= 50
            assert await r.ttl("app||t") == -1

    run(main)


def test_component_default_ttl(db: None) -> None:
    async def main() -> None:
        async with stores(ttlInSeconds="30") as [store], raw() as r:
            await store.set(SetRequest("app||d", b"1"))
            assert 29 <= await r.ttl("app||d") <= 30
            await store.multi([SetRequest("app||m", b"1")], {})
            assert 29 <= await r.ttl("app||m") <= 30
            await store.set(SetRequest("app||d", b"2", metadata={TTL_KEY: "300"}))
            assert 299 <= await r.ttl("app||d") <= 300
            await store.set(SetRequest("app||d", b"3", metadata={TTL_KEY: "-1"}))
            assert await r.ttl("app||d") == -1
            with pytest.raises(ValueError):
                await store.set(SetRequest("app||d", b"4", metadata={TTL_KEY: "0"}))

    run(main)


# -- transactions -----------------------------------------------------------------------------


async def snapshot(r: aioredis.Redis) -> dict[Any, Any]:
    """Every key of the database with its type, contents and expiry."""
    out: dict[Any, Any] = {}
    for key in sorted(await r.keys("*")):
        kind = await r.type(key)
        value = await r.hgetall(key) if kind == b"hash" else await r.get(key)
        out[key] = (kind, value, await r.ttl(key))
    return out


def test_transaction_rolls_back_on_a_mismatch(db: None) -> None:
    async def main() -> None:
        async with stores() as [store], raw() as r:
            await store.set(SetRequest("app||a", b"a0", metadata={TTL_KEY: "500"}))
            await store.set(SetRequest("app||b", b"b0"))
            await store.set(SetRequest("app||c", b"c0"))
            stale = await etag_of(store, "app||c")
            await store.set(SetRequest("app||c", b"c1"))
            before = await snapshot(r)
            failing: list[list[Operation]] = [
                # A check late in the transaction fails after earlier writes were planned.
                [
                    SetRequest("app||a", b"a1"),
                    DeleteRequest("app||b"),
                    SetRequest("app||new", b"n", metadata={TTL_KEY: "5"}),
                    SetRequest("app||c", b"c2", etag=stale),
                ],
                # A later operation checks against what an earlier one in it wrote.
                [
                    SetRequest("app||b", b"b1"),
                    SetRequest("app||b", b"b2", etag=await etag_of(store, "app||b")),
                ],
                [DeleteRequest("app||a"), SetRequest("app||a", b"x", etag="1")],
                [
                    SetRequest("app||x", b"x"),
                    SetRequest("app||b", b"x", concurrency=Concurrency.FIRST_WRITE),
                ],
                [SetRequest("app||x", b"x"), DeleteRequest("app||gone", etag="1")],
            ]
            for ops in failing:
                with pytest.raises(ETagMismatch):
                    await store.multi(ops, {})
                assert await snapshot(r) == before, ops
            # The same shapes go through when the checks hold.
            eb = await etag_of(store, "app||b")
            await store.multi(
                [
                    SetRequest("app||b", b"b1", etag=eb),
                    SetRequest("app||b", b"b2", etag=str(int(eb) + 1)),
                    DeleteRequest("app||a"),
                    SetRequest("app||a", b"a2", concurrency=Concurrency.FIRST_WRITE),
                ],
                {},
            )
            assert await r.hget("app||b", "data") == b"b2"
            assert await r.hget("app||a", "data") == b"a2"
            assert await r.ttl("app||a") == -1

    run(main)


def test_bulk_get_reports_versions_and_expiry(db: None) -> None:
    async def main() -> None:
        async with stores() as [store]:
            await store.set(SetRequest("app||x", b"x", metadata={TTL_KEY: "100"}))
            await store.set(SetRequest("app||y", b"y"))
            await store.set(SetRequest("app||y", b"y2"))
            items = await store.bulk_get([GetRequest(k) for k in ("app||y", "app||x", "app||z")])
            assert [(i.key, i.data, i.etag) for i in items] == [
                ("app||y", b"y2", "3"),
                ("app||x", b"x", "1"),
                ("app||z", None, None),
            ]
            assert TTL_EXPIRE_KEY in items[1].metadata and not items[0].metadata

    run(main)


# -- connections ------------------------------------------------------------------------------


async def kill_connections(store: RedisStateStore) -> int:
    async with raw() as r:
        ids = [c["id"] for c in await r.client_list() if c.get("name") == store.client_name]
        for client_id in ids:
            await r.client_kill_filter(_id=client_id)
        left = [c for c in await r.client_list() if c.get("name") == store.client_name]
        assert not left
    return len(ids)


@pytest.mark.parametrize("retries", ["3", "-1"])
def test_reconnects_after_client_kill(db: None, retries: str) -> None:
    async def main() -> None:
        async with stores(maxRetries=retries) as [store]:
            await asyncio.gather(*(store.set(SetRequest(f"app||k{i}", b"v")) for i in range(20)))
            assert await kill_connections(store) >= 1
            resp = await store.get(GetRequest("app||k0"))
            assert resp is not None and resp.data == b"v"
            items = await store.bulk_get([GetRequest(f"app||k{i}") for i in range(20)])
            assert await kill_connections(store) >= 1
            await asyncio.gather(*(store.set(SetRequest(i.key, b"w", etag=i.etag)) for i in items))
            assert await kill_connections(store) >= 1
            items = await store.bulk_get([GetRequest(f"app||k{i}") for i in range(20)])
            assert {i.data for i in items} == {b"w"}
            assert await kill_connections(store) >= 1
            await store.multi([DeleteRequest("app||k0", etag=items[0].etag)], {})
            assert await store.get(GetRequest("app||k0")) is None

    run(main)


class Proxy:
    """A TCP relay to Redis that can be taken down and brought back on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        self._writers += (writer, up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_outage_raises_state_error_then_recovers(db: None) -> None:
    async def main() -> None:
        proxy = Proxy()
        await proxy.start()
        store = await open_store(
            proxy.port, maxRetries="2", maxRetryBackoff="20ms", dialTimeout="1s"
        )
        try:
            await store.set(SetRequest("app||k", b"v"))
            await proxy.stop()
            calls: list[Coroutine[Any, Any, object]] = [
                store.get(GetRequest("app||k")),
                store.bulk_get([GetRequest("app||k")]),
                store.set(SetRequest("app||k", b"w")),
                store.delete(DeleteRequest("app||k")),
                store.multi([SetRequest("app||k", b"w")], {}),
            ]
            for call in calls:
                with pytest.raises(StateError, match=rf"cannot reach redis at {HOST}:{proxy.port}"):
                    await call
            await proxy.start()
            resp = await store.get(GetRequest("app||k"))
            assert resp is not None and resp.data == b"v"
            await store.set(SetRequest("app||k", b"w", etag="1"))
        finally:
            await store.close()
            await proxy.stop()

    run(main)


def test_scripts_missing_on_the_server_are_loaded_again(db: None) -> None:
    async def main() -> None:
        async with stores() as [store]:
            await store.set(SetRequest("app||k", b"v"))
            # As after a server restart or SCRIPT FLUSH (not run here: the server is shared):
            # the cached digests name scripts the server does not have.
            for script in (store._read, store._write):
                assert script is not None
                script.sha = "0" * 40
            items = await store.bulk_get([GetRequest("app||k"), GetRequest("app||none")])
            assert [i.data for i in items] == [b"v", None]
            resp = await store.get(GetRequest("app||k"))
            assert resp is not None and resp.data == b"v"
            await store.set(SetRequest("app||k", b"w", etag=resp.etag))
            await store.multi([DeleteRequest("app||k", etag=str(int(resp.etag or 0) + 1))], {})
            assert await store.get(GetRequest("app||k")) is None

    run(main)
