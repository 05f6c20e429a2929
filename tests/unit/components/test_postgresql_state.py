"""PostgreSQL state store specifics: Dapr's schema, xmin etags, values, TTL, races, queries."""

from __future__ import annotations

import asyncio
import base64
import calendar
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.state.api import (
    TTL_EXPIRE_KEY,
    TTL_KEY,
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    GetRequest,
    InvalidQuery,
    Operation,
    Querier,
    QueryResponse,
    SetRequest,
    StateError,
)
from pillion.components.state.postgresql import (
    SCHEMA_VERSION,
    PostgreSQLMetadata,
    PostgreSQLStateStore,
    _split_conninfo,
    decode_value,
    encode_value,
    is_jsonb_text,
)
from tests.conformance.conftest import require_server

PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("statestore", "state.postgresql", "v1", "app", Properties(props))


def raw(sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description else []


class Tables:
    """A unique state/metadata table pair, dropped after the test."""

    def __init__(self) -> None:
        run = uuid.uuid4().hex[:12]
        self.table = f"pgstate_{run}"
        self.meta = f"pgstate_md_{run}"

    def props(self, **extra: str) -> dict[str, str]:
        return {
            "connectionString": PG,
            "tableName": self.table,
            "metadataTableName": self.meta,
            **extra,
        }

    async def open(self, **extra: str) -> PostgreSQLStateStore:
        store = PostgreSQLStateStore()
        await store.init(info(**self.props(**extra)))
        return store

    def drop(self) -> None:
        raw(f'DROP TABLE IF EXISTS "{self.table}"')
        raw(f'DROP TABLE IF EXISTS "{self.meta}"')


@pytest.fixture
def pg() -> Iterator[Tables]:
    require_server("postgresql", "127.0.0.1", 5432)
    t = Tables()
    try:
        yield t
    finally:
        t.drop()


def run(pg: Tables, body: Callable[[PostgreSQLStateStore], Awaitable[None]], **extra: str) -> None:
    """Open a store on `pg`'s tables, run `body` with it, close it."""

    async def main() -> None:
        store = await pg.open(**extra)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def etag_of(store: PostgreSQLStateStore, key: str) -> str:
    resp = await store.get(GetRequest(key))
    assert resp is not None and resp.etag
    return resp.etag


# -- metadata -----------------------------------------------------------------------------------


def test_metadata_defaults_and_aliases() -> None:
    m = decode(PostgreSQLMetadata, Properties({"url": PG}))
    m.validate()
    assert (m.table_name, m.metadata_table_name) == ("state", "dapr_metadata")
    assert (float(m.timeout), float(m.cleanup_interval)) == (20.0, 3600.0)
    m = decode(
        PostgreSQLMetadata,
        Properties(
            {
                "connectionString": PG,
                "timeoutInSeconds": "30",
                "cleanupIntervalInSeconds": "-1",
                "maxConns": "7",
                "connectionMaxIdleTime": "5m",
                "queryExecMode": "simple_protocol",
                "actorStateStore": "true",
                "keyPrefix": "name",
            }
        ),
    )
    m.validate()
    assert (float(m.timeout), float(m.cleanup_interval), m.max_conns) == (30.0, -1.0, 7)
    assert float(m.connection_max_idle_time) == 300.0


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({"connectionString": " "}, "connectionString"),
        ({"tableName": "bad-name"}, "tableName"),
        ({"tableName": "a.b.c"}, "tableName"),
        ({"tableName": "x; DROP TABLE y"}, "tableName"),
        ({"metadataTableName": "State"}, "metadataTableName"),  # folds onto tableName "state"
        ({"timeout": "500ms"}, "timeout"),
        ({"queryExecMode": "fast"}, "queryExecMode"),
        ({"useAzureAD": "true"}, "useAzureAD"),
        ({"useAWSIAM": "true"}, "useAWSIAM"),
        ({"connectionString": PG + " pool_max_conns=many"}, "connectionString"),
        ({"connectionString": "host='unterminated"}, "connectionString"),
    ],
)
def test_bad_metadata_is_rejected(props: dict[str, str], field: str) -> None:
    full = {"connectionString": PG, **props}

    async def main() -> None:
        with pytest.raises(ComponentConfigError) as err:
            await PostgreSQLStateStore().init(info(**full))
        assert err.value.field == field

    asyncio.run(main())


def test_pgx_connection_string_settings_are_split_off() -> None:
    libpq_part = "host = db port=5432 password='it\\'s \\\\ x' application_name=a\\ b"
    pgx_part = (
        " pool_max_conns=9 pool_min_conns=2 pool_max_conn_idle_time=5m"
        " pool_health_check_period=1m default_query_exec_mode=exec"
    )
    conninfo, opts = _split_conninfo(libpq_part + pgx_part)
    # What remains means to libpq exactly what the original's libpq part did.
    expected = psycopg.conninfo.conninfo_to_dict(libpq_part)
    assert expected["password"] == "it's \\ x" and expected["application_name"] == "a b"
    assert psycopg.conninfo.conninfo_to_dict(conninfo) == expected
    assert (opts.max_size, opts.min_size, opts.max_idle, opts.exec_mode) == (9, 2, 300, "exec")

    conninfo, opts = _split_conninfo(
        "postgres://u:p@h1:5432,h2:5433/db?sslmode=disable&pool_max_conns=3&pool_max_conn_lifetime=1h"
    )
    assert conninfo == "postgres://u:p@h1:5432,h2:5433/db?sslmode=disable"
    assert (opts.max_size, opts.max_lifetime) == (3, 3600)
    # Strings without pgx settings pass through untouched.
    assert _split_conninfo(PG) == (PG, _split_conninfo(PG)[1])
    assert _split_conninfo(PG)[1].max_size is None


def test_pool_size_from_connection_string(pg: Tables) -> None:
    async def main() -> None:
        store = await pg.open(connectionString=PG + " pool_max_conns=3")
        try:
            assert store._pool is not None and store._pool.max_size == 3
            await store.set(SetRequest("k", b"v"))
        finally:
            await store.close()
        store = await pg.open(maxConns="5", queryExecMode="exec")
        try:
            assert store._pool is not None and store._pool.max_size == 5
            for _ in range(8):  # past psycopg's prepare threshold: nothing gets prepared
                await store.set(SetRequest("k", b"v"))
        finally:
            await store.close()

    asyncio.run(main())


# -- schema -------------------------------------------------------------------------------------


def test_creates_dapr_v1_schema(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        cols = raw(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            (pg.table,),
        )
        assert cols == [
            ("key", "text", "NO"),
            ("value", "jsonb", "NO"),
            ("isbinary", "boolean", "NO"),
            ("insertdate", "timestamp with time zone", "NO"),
            ("updatedate", "timestamp with time zone", "YES"),
            ("expiredate", "timestamp with time zone", "YES"),
        ]
        meta = dict(raw(f'SELECT key, value FROM "{pg.meta}"'))
        assert meta == {"lock": "lock", "migrations": str(SCHEMA_VERSION)}

    run(pg, body)
    run(pg, body)  # idempotent


def test_concurrent_sidecars_create_the_tables_once(pg: Tables) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(pg.open() for _ in range(8)))
        try:
            await stores[0].set(SetRequest("k", b"v"))
            for s in stores:
                assert (await s.get(GetRequest("k"))) is not None
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    asyncio.run(main())
    assert raw(f"SELECT value FROM \"{pg.meta}\" WHERE key = 'migrations'") == [("2",)]


def test_migrates_a_level_1_dapr_table(pg: Tables) -> None:
    # What Dapr's first v1 migration left behind: no expiredate column yet.
    raw(f'CREATE TABLE "{pg.meta}" (key text NOT NULL PRIMARY KEY, value text NOT NULL)')
    raw(f"INSERT INTO \"{pg.meta}\" VALUES ('migrations', '1')")
    raw(
        f'CREATE TABLE "{pg.table}" (key text NOT NULL PRIMARY KEY, value jsonb NOT NULL, '
        "isbinary boolean NOT NULL, insertdate TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(), "
        "updatedate TIMESTAMP WITH TIME ZONE NULL)"
    )
    raw(f"INSERT INTO \"{pg.table}\" VALUES ('app||old', '{{\"a\":1}}', false)")

    async def body(store: PostgreSQLStateStore) -> None:
        resp = await store.get(GetRequest("app||old"))
        assert resp is not None and resp.data == b'{"a": 1}'
        await store.set(SetRequest("app||new", b"x", metadata={TTL_KEY: "60"}))
        assert raw(f"SELECT value FROM \"{pg.meta}\" WHERE key = 'migrations'") == [("2",)]

    run(pg, body)


def test_refuses_a_foreign_table(pg: Tables) -> None:
    raw(f'CREATE TABLE "{pg.table}" (key text PRIMARY KEY, value bytea)')
    raw(f'CREATE TABLE "{pg.meta}" (key text NOT NULL PRIMARY KEY, value text NOT NULL)')
    raw(f"INSERT INTO \"{pg.meta}\" VALUES ('migrations', '2')")

    async def main() -> None:
        with pytest.raises(StateError, match=r"not a Dapr state\.postgresql v1 table"):
            await pg.open()

    asyncio.run(main())


def test_schema_qualified_and_mixed_case_names(pg: Tables) -> None:
    async def main() -> None:
        # Dapr writes names unquoted, so PostgreSQL folds them; pillion must reach the same table.
        store = await pg.open(tableName=f"public.{pg.table.upper()}", metadataTableName=pg.meta)
        try:
            await store.set(SetRequest("k", b"v"))
        finally:
            await store.close()
        assert raw(f'SELECT count(*) FROM public."{pg.table}"') == [(1,)]

    asyncio.run(main())


# -- etags --------------------------------------------------------------------------------------


def test_etag_is_the_rows_xmin(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("k", b"1"))
        etag = await etag_of(store, "k")
        [(xmin, isbinary, updated)] = raw(
            f"SELECT xmin::text, isbinary, updatedate FROM \"{pg.table}\" WHERE key = 'k'"
        )
        assert (etag, isbinary, updated) == (xmin, True, None)
        await store.set(SetRequest("k", b"2", etag=etag))
        new = await etag_of(store, "k")
        assert new != etag
        [(xmin, updated)] = raw(f'SELECT xmin::text, updatedate FROM "{pg.table}"')
        assert new == xmin and updated is not None
        # A write by someone else (here: plain SQL) changes the etag too.
        raw(f"UPDATE \"{pg.table}\" SET updatedate = now() WHERE key = 'k'")
        with pytest.raises(ETagMismatch):
            await store.set(SetRequest("k", b"3", etag=new))
        # Writes in one transaction share its xmin.
        await store.multi([SetRequest("a", b"a"), SetRequest("b", b"b")], {})
        assert await etag_of(store, "a") == await etag_of(store, "b")

    run(pg, body)


@pytest.mark.parametrize("etag", ["abc", "-1", "+1", "1.5", "4294967296", " 7", "٣"])
def test_malformed_etags_are_invalid(pg: Tables, etag: str) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("k", b"1"))
        with pytest.raises(ETagInvalid):
            await store.set(SetRequest("k", b"2", etag=etag))
        with pytest.raises(ETagInvalid):
            await store.set(SetRequest("k", b"2", etag=etag, concurrency=Concurrency.FIRST_WRITE))
        with pytest.raises(ETagInvalid):
            await store.delete(DeleteRequest("k", etag=etag))
        with pytest.raises(ETagInvalid):
            await store.multi([SetRequest("other", b"x"), DeleteRequest("k", etag=etag)], {})
        assert (await store.get(GetRequest("other"))) is None
        resp = await store.get(GetRequest("k"))
        assert resp is not None and resp.data == b"1"
        # last-write ignores the etag altogether.
        await store.set(SetRequest("k", b"3", etag=etag, concurrency=Concurrency.LAST_WRITE))
        await store.delete(DeleteRequest("k", etag=etag, concurrency=Concurrency.LAST_WRITE))
        assert (await store.get(GetRequest("k"))) is None

    run(pg, body)


def test_largest_xid_is_a_valid_etag(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("k", b"1"))
        with pytest.raises(ETagMismatch):
            await store.set(SetRequest("k", b"2", etag="4294967295"))
        with pytest.raises(ETagMismatch):
            await store.delete(DeleteRequest("k", etag="0"))

    run(pg, body)


# -- values -------------------------------------------------------------------------------------

JSON_VALUES = {
    "compact": b'{"b":1,"a":[1,2.50,1e2,-0]}',
    "spaced": b'{ "b" : 1 ,\n "a" : [ ] }',
    "duplicate-keys": b'{"a":1,"a":2}',
    "escapes": b'"caf\\u00e9 \\ud83d\\ude00 \\/ \\n"',
    "raw-unicode": '{"k":"été 😀"}'.encode(),
    "string": b'"hello"',
    "number": b"12345678901234567890123456789",
    "literal": b"null",
    "whitespace-around": b"  true \n",
}
NOT_JSONB = {
    "nul-escape": b'"a\\u0000b"',  # JSON, but jsonb refuses \u0000
    "lone-surrogate": b'"\\ud800"',  # JSON to Python, not to PostgreSQL
    "nan": b"NaN",
    "huge-exponent": b"1e100000",
    "binary": bytes(range(256)),
    "latin-1": "café".encode("latin-1"),
    "bom": b'\xef\xbb\xbf{"a":1}',
    "text": b"hello",
    "empty": b"",
    "trailing-garbage": b'{"a":1} x',
}


def test_jsonb_detection() -> None:
    for name, value in JSON_VALUES.items():
        assert is_jsonb_text(value), name
    for name, value in NOT_JSONB.items():
        assert not is_jsonb_text(value), name
    assert not is_jsonb_text(b"[" * 5000 + b"]" * 5000)  # too deep for Python's parser
    for value in (*JSON_VALUES.values(), *NOT_JSONB.values()):
        text = encode_value(value)
        assert text.endswith("\n") == is_jsonb_text(value)
        assert decode_value(text, True) == value
    assert decode_value('{"a": 1}', False) == b'{"a": 1}'
    with pytest.raises(StateError):
        decode_value("not base64!", True)


def test_values_round_trip_byte_for_byte(pg: Tables) -> None:
    values = {**JSON_VALUES, **NOT_JSONB, "large": bytes(range(256)) * 4096}

    async def body(store: PostgreSQLStateStore) -> None:
        for name, value in values.items():
            await store.set(SetRequest(f"app||{name}", value))
        for name, value in values.items():
            resp = await store.get(GetRequest(f"app||{name}"))
            assert resp is not None and resp.data == value, name
        items = await store.bulk_get([GetRequest(f"app||{n}") for n in values])
        assert [i.data for i in items] == list(values.values())
        # Stored as Dapr stores binary values: a base64 JSON string with isbinary = true.
        for key, value, isbinary in raw(f'SELECT key, value, isbinary FROM "{pg.table}"'):
            name = key.removeprefix("app||")
            assert isbinary is True
            assert base64.b64decode(value) == values[name]
            assert value.endswith("\n") == (name in JSON_VALUES), name
        # Every row marked as JSON decodes in SQL: the query API sees exactly those.
        found = await store.query({}, {})
        assert {i.key.removeprefix("app||") for i in found.results} == set(JSON_VALUES)
        assert all(i.data == values[i.key.removeprefix("app||")] for i in found.results)

    run(pg, body)


def test_rows_written_by_daprd_are_read(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        # daprd stores HTTP (JSON) values as jsonb and gRPC bytes as base64 with isbinary.
        raw(
            f'INSERT INTO "{pg.table}" (key, value, isbinary) VALUES '
            "('app||json', '{\"b\":1,\"a\":[1,2]}', false), ('app||bin', %s, true)",
            (json.dumps(base64.b64encode(b"\x00\xffdata").decode()),),
        )
        resp = await store.get(GetRequest("app||json"))
        assert resp is not None and resp.data == b'{"a": [1, 2], "b": 1}'  # jsonb's own text
        resp = await store.get(GetRequest("app||bin"))
        assert resp is not None and resp.data == b"\x00\xffdata"
        await store.set(
            SetRequest(
                "app||json",
                b'{"c":3}',
            )
        )
        etag = await etag_of(store, "app||bin")
        await store.set(SetRequest("app||bin", b"new", etag=etag))
        assert raw(f"SELECT value FROM \"{pg.table}\" WHERE key = 'app||bin'") == [
            (base64.b64encode(b"new").decode(),)
        ]
        # Dapr's own JSON rows are visible to queries too.
        found = await store.query({"filter": {"EQ": {"c": 3}}}, {})
        assert [i.key for i in found.results] == ["app||json"]

    run(pg, body)


# -- TTL ----------------------------------------------------------------------------------------


def expire(pg: Tables, key: str) -> None:
    """Make `key` expired without waiting for it."""
    raw(
        f"UPDATE \"{pg.table}\" SET expiredate = now() - interval '1 second' WHERE key = %s",
        (key,),
    )


def test_ttl_sets_expiredate_and_hides_expired_rows(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("k", b"v", metadata={TTL_KEY: "100"}))
        [(seconds,)] = raw(
            f"SELECT extract(epoch FROM expiredate - now()) FROM \"{pg.table}\" WHERE key = 'k'"
        )
        assert 95 < float(seconds) <= 100
        resp = await store.get(GetRequest("k"))
        assert resp is not None
        expires = calendar.timegm(
            time.strptime(resp.metadata[TTL_EXPIRE_KEY], "%Y-%m-%dT%H:%M:%SZ")
        )
        assert abs(expires - (time.time() + 100)) < 5
        etag = await etag_of(store, "k")
        expire(pg, "k")
        assert await store.get(GetRequest("k")) is None
        assert [i.data for i in await store.bulk_get([GetRequest("k")])] == [None]
        assert (await store.query({}, {})).results == []
        with pytest.raises(ETagMismatch):
            await store.set(SetRequest("k", b"w", etag=etag))
        with pytest.raises(ETagMismatch):
            await store.delete(DeleteRequest("k", etag=etag))
        # Expired counts as absent for first-write, which takes the row over.
        await store.set(SetRequest("k", b"again", concurrency=Concurrency.FIRST_WRITE))
        resp = await store.get(GetRequest("k"))
        assert resp is not None and resp.data == b"again" and TTL_EXPIRE_KEY not in resp.metadata

    run(pg, body)


def test_cleanup_purges_expired_rows_and_takes_turns(pg: Tables) -> None:
    async def main() -> None:
        a = await pg.open(cleanupInterval="0")
        b = await pg.open(cleanupInterval="1h")
        try:
            assert a._cleanup_task is None and b._cleanup_task is not None
            for i in range(2500):  # more than one purge batch
                await a.set(SetRequest(f"gone-{i}", b"x", metadata={TTL_KEY: "60"}))
            await a.set(SetRequest("live", b"x", metadata={TTL_KEY: "60"}))
            await a.set(SetRequest("forever", b"x"))
            raw(
                f"UPDATE \"{pg.table}\" SET expiredate = now() - interval '1 second' "
                "WHERE key LIKE 'gone-%'"
            )
            assert await b.cleanup_expired() == 2500
            assert raw(f'SELECT count(*) FROM "{pg.table}"') == [(2,)]
            # b just ran: within the interval neither it nor another sidecar runs again.
            expire(pg, "live")
            assert await b.cleanup_expired() == 0
            [(stamp,)] = raw(f"SELECT value FROM \"{pg.meta}\" WHERE key = 'last-cleanup'")
            # The turn is recorded as daprd records it, so daprd sidecars join the rotation.
            raw(
                f"UPDATE \"{pg.meta}\" SET value = (now() - interval '2 hours')::text "
                "WHERE key = 'last-cleanup'"
            )
            assert stamp
            assert await b.cleanup_expired() == 1
            assert raw(f'SELECT key FROM "{pg.table}"') == [("forever",)]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_background_cleanup_deletes_rows(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("short", b"x", metadata={TTL_KEY: "1"}))
        await store.set(SetRequest("keep", b"x"))
        deadline = time.monotonic() + 10
        while raw(f"SELECT count(*) FROM \"{pg.table}\" WHERE key = 'short'") != [(0,)]:
            assert time.monotonic() < deadline, "expired row still in the table after 10s"
            await asyncio.sleep(0.2)
        assert await store.get(GetRequest("keep")) is not None

    run(pg, body, cleanupInterval="1s")


# -- concurrency --------------------------------------------------------------------------------


def test_one_etag_many_writers_exactly_one_wins(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("hot", b"0"))
        for rnd in range(20):
            etag = await etag_of(store, "hot")

            async def write(i: int, etag: str = etag, rnd: int = rnd) -> bool:
                try:
                    await store.set(SetRequest("hot", f"{rnd}-{i}".encode(), etag=etag))
                except ETagMismatch:
                    return False
                return True

            outcomes = await asyncio.gather(*(write(i) for i in range(50)))
            assert outcomes.count(True) == 1, (rnd, outcomes.count(True))
            winner = outcomes.index(True)
            resp = await store.get(GetRequest("hot"))
            assert resp is not None and resp.data == f"{rnd}-{winner}".encode()

    # Enough connections that the writers really reach the server at once.
    run(pg, body, maxConns="16")


def test_compare_and_swap_counter(pg: Tables) -> None:
    workers, increments = 10, 20

    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("counter", b"0"))
        conflicts = 0

        async def worker() -> None:
            nonlocal conflicts
            for _ in range(increments):
                while True:
                    resp = await store.get(GetRequest("counter"))
                    assert resp is not None and resp.etag
                    n = int(resp.data) + 1
                    try:
                        await store.set(SetRequest("counter", str(n).encode(), etag=resp.etag))
                        break
                    except ETagMismatch:
                        conflicts += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
        resp = await store.get(GetRequest("counter"))
        assert resp is not None and int(resp.data) == workers * increments
        assert conflicts > 0  # the workers really did race

    run(pg, body, maxConns="10")


def test_concurrent_first_writes_insert_once(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        async def write(i: int) -> bool:
            try:
                await store.set(
                    SetRequest("once", str(i).encode(), concurrency=Concurrency.FIRST_WRITE)
                )
            except ETagMismatch:
                return False
            return True

        outcomes = await asyncio.gather(*(write(i) for i in range(30)))
        assert outcomes.count(True) == 1

    run(pg, body)


# -- transactions -------------------------------------------------------------------------------


def test_transaction_rolls_back_everything(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("a", b"a0"))
        await store.set(SetRequest("b", b"b0"))
        ea = await etag_of(store, "a")
        ops: list[Operation] = [
            SetRequest("a", b"a1", etag=ea),
            DeleteRequest("b"),
            SetRequest("new", b"n", metadata={TTL_KEY: "30"}),
            SetRequest("a", b"a2", etag=ea),  # the first op changed a's xmin
        ]
        with pytest.raises(ETagMismatch):
            await store.multi(ops, {})
        assert [i.data for i in await store.bulk_get([GetRequest(k) for k in "ab"])] == [
            b"a0",
            b"b0",
        ]
        assert await etag_of(store, "a") == ea
        assert await store.get(GetRequest("new")) is None
        # A database error mid-transaction (PostgreSQL text cannot hold NUL) rolls back too,
        # and surfaces as a StateError, not a psycopg exception.
        with pytest.raises(StateError) as err:
            await store.multi([SetRequest("a", b"a3"), SetRequest("bad\x00key", b"x")], {})
        assert not isinstance(err.value, psycopg.Error)
        assert [i.data for i in await store.bulk_get([GetRequest("a")])] == [b"a0"]
        # A bad TTL fails before anything runs.
        with pytest.raises(ValueError):
            await store.multi(
                [SetRequest("a", b"a4"), SetRequest("c", b"", metadata={TTL_KEY: "x"})], {}
            )
        # The store still works after the failures.
        await store.multi([SetRequest("a", b"a5"), DeleteRequest("a", etag=None)], {})
        assert await store.get(GetRequest("a")) is None

    run(pg, body)


# -- query API ----------------------------------------------------------------------------------

PEOPLE = {
    "app||1": {"person": {"org": "Dev Ops", "id": 1036}, "city": "Seattle", "state": "WA"},
    "app||2": {"person": {"org": "Hardware", "id": 1028}, "city": "Portland", "state": "OR"},
    "app||3": {"person": {"org": "Finance", "id": 1071}, "city": "Sacramento", "state": "CA"},
    "app||4": {"person": {"org": "Dev Ops", "id": 1042}, "city": "Spokane", "state": "WA"},
    "app||5": {"person": {"org": "Hardware", "id": 1007}, "city": "Los Angeles", "state": "CA"},
    "app||6": {"person": {"org": "Dev Ops", "id": 1054}, "city": "San Diego", "state": "CA"},
    "app||7": {"person": {"org": "Finance", "id": 1002}, "city": "San Francisco", "state": "CA"},
    "app||8": {"person": {"org": "Dev Ops", "id": 1015}, "city": "Phoenix", "state": "AZ"},
    "app||9": {"person": {"org": "Dev Ops", "id": 1.5e3}, "tags": ["x", "y"], "state": "5"},
}


async def keys(store: PostgreSQLStateStore, q: Any) -> list[str]:
    resp = await store.query(q, {})
    return [i.key for i in resp.results]


def test_query_filters_sort_and_pages(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        assert isinstance(store, Querier)
        raw_values = {k: json.dumps(v, indent=1).encode() for k, v in PEOPLE.items()}
        for k, v in raw_values.items():
            await store.set(SetRequest(k, v))
        await store.set(SetRequest("app||binary", b"\x00\x01"))
        await store.set(SetRequest("app||text", b"plain text"))
        await store.set(SetRequest("app||gone", b'{"state":"CA"}', metadata={TTL_KEY: "60"}))
        expire(pg, "app||gone")

        assert await keys(store, {"filter": {"EQ": {"state": "CA"}}}) == [
            "app||3",
            "app||5",
            "app||6",
            "app||7",
        ]
        assert await keys(store, {"filter": {"EQ": {"person.org": "Finance"}}}) == [
            "app||3",
            "app||7",
        ]
        # Typed comparisons: 1500 matches 1.5e3; the string "5" is not the number 5.
        assert await keys(store, {"filter": {"EQ": {"person.id": 1500}}}) == ["app||9"]
        assert await keys(store, {"filter": {"EQ": {"state": 5}}}) == []
        assert await keys(store, {"filter": {"EQ": {"tags.1": "y"}}}) == ["app||9"]
        assert await keys(store, {"filter": {"IN": {"state": ["AZ", "OR"]}}}) == [
            "app||2",
            "app||8",
        ]
        assert await keys(store, {"filter": {"NEQ": {"person.org": "Dev Ops"}}}) == [
            "app||2",
            "app||3",
            "app||5",
            "app||7",
        ]
        q = {
            "filter": {
                "OR": [
                    {"AND": [{"EQ": {"person.org": "Dev Ops"}}, {"EQ": {"state": "WA"}}]},
                    {"AND": [{"GTE": {"person.id": 1050}}, {"LT": {"person.id": 1100}}]},
                ]
            }
        }
        assert await keys(store, q) == ["app||1", "app||3", "app||4", "app||6"]

        sort = {"sort": [{"key": "state", "order": "DESC"}, {"key": "person.id"}]}
        expected = ["app||1", "app||4", "app||2", "app||7", "app||5", "app||6", "app||3"]
        expected += ["app||8", "app||9"]
        assert await keys(store, sort) == expected

        # Paging walks every row once, in order, following the tokens.
        seen: list[str] = []
        token = ""
        for _ in range(10):
            page: dict[str, Any] = {"limit": 2, **({"token": token} if token else {})}
            resp = await store.query({**sort, "page": page}, {})
            if not resp.results:
                break
            assert len(resp.results) <= 2
            seen += [i.key for i in resp.results]
            token = resp.token
            assert token == str(len(seen))
        assert seen == expected

        # Results carry the exact stored bytes and the etag.
        resp = await store.query(json.dumps({"filter": {"EQ": {"city": "Phoenix"}}}).encode(), {})
        [item] = resp.results
        assert isinstance(resp, QueryResponse) and resp.token == ""
        assert item.data == raw_values["app||8"] and item.etag == await etag_of(store, "app||8")

    run(pg, body)


def test_query_values_and_paths_are_parameters(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("app||a", b'{"name":"x\' OR 1=1 --","a\'b":{"c":1}}'))
        await store.set(SetRequest("app||b", b'{"name":"y"}'))
        assert await keys(store, {"filter": {"EQ": {"name": "x' OR 1=1 --"}}}) == ["app||a"]
        assert await keys(store, {"filter": {"EQ": {"name": "' OR ''='"}}}) == []
        assert await keys(store, {"filter": {"EQ": {"a'b.c": 1}}}) == ["app||a"]
        assert await keys(store, {"sort": [{"key": "'); DROP TABLE x; --"}]}) == [
            "app||a",
            "app||b",
        ]
        assert raw(f'SELECT count(*) FROM "{pg.table}"') == [(2,)]

    run(pg, body)


@pytest.mark.parametrize(
    "q",
    [
        b"not json",
        b"[]",
        {"filter": {"EQ": {"a": 1}, "IN": {"b": [1]}}},
        {"filter": {"LIKE": {"a": "x"}}},
        {"filter": {"EQ": {}}},
        {"filter": {"EQ": {"a": 1, "b": 2}}},
        {"filter": {"IN": {"a": []}}},
        {"filter": {"IN": {"a": "x"}}},
        {"filter": {"AND": []}},
        {"filter": {"OR": {"EQ": {"a": 1}}}},
        {"filter": {"GT": {"a": "10"}}},
        {"filter": {"GT": {"a": True}}},
        {"filter": {"EQ": {"a..b": 1}}},
        {"filter": {"EQ": {"": 1}}},
        {"sort": {"key": "a"}},
        {"sort": [{"key": "a", "order": "UP"}]},
        {"sort": [{"order": "ASC"}]},
        {"page": {"limit": -1}},
        {"page": {"limit": "10"}},
        {"page": {"limit": 10, "token": "abc"}},
        {"page": {"limit": 10, "token": "-5"}},
    ],
)
def test_invalid_queries_are_rejected(pg: Tables, q: Any) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        with pytest.raises(InvalidQuery):
            await store.query(q, {})

    run(pg, body)


# -- sharing and failures -----------------------------------------------------------------------


def test_two_sidecars_share_a_table(pg: Tables) -> None:
    async def main() -> None:
        a, b = await pg.open(), await pg.open()
        try:
            await a.set(SetRequest("app||k", b"from a"))
            ra, rb = await a.get(GetRequest("app||k")), await b.get(GetRequest("app||k"))
            assert ra is not None and rb is not None
            assert (ra.data, ra.etag) == (rb.data, rb.etag)
            await b.set(SetRequest("app||k", b"from b", etag=rb.etag))
            with pytest.raises(ETagMismatch):
                await a.set(SetRequest("app||k", b"stale", etag=ra.etag))
            resp = await a.get(GetRequest("app||k"))
            assert resp is not None and resp.data == b"from b"
            with pytest.raises(ETagMismatch):
                await a.set(SetRequest("app||k", b"x", concurrency=Concurrency.FIRST_WRITE))
            await a.multi([DeleteRequest("app||k", etag=resp.etag), SetRequest("app||j", b"j")], {})
            assert await b.get(GetRequest("app||k")) is None
            assert [i.key for i in (await b.query({}, {})).results] == []  # b"j" is not JSON
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_operations_time_out_and_recover(pg: Tables) -> None:
    async def body(store: PostgreSQLStateStore) -> None:
        await store.set(SetRequest("locked", b"v"))
        blocker = await psycopg.AsyncConnection.connect(PG)
        try:
            await blocker.execute(f"SELECT * FROM \"{pg.table}\" WHERE key = 'locked' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(StateError, match="timed out"):
                await store.set(SetRequest("locked", b"w"))
            assert time.monotonic() - started < 5
            # Other keys are unaffected, and the pool did not lose its connections.
            for i in range(10):
                await store.set(SetRequest(f"free-{i}", b"x"))
        finally:
            await blocker.rollback()
            await blocker.close()
        await store.set(SetRequest("locked", b"w"))
        resp = await store.get(GetRequest("locked"))
        assert resp is not None and resp.data == b"w"

    run(pg, body, timeout="1s")


def test_unreachable_server_fails_init_cleanly() -> None:
    async def main() -> None:
        store = PostgreSQLStateStore()
        props = {"connectionString": "host=127.0.0.1 port=1 user=postgres dbname=test"}
        with pytest.raises(StateError) as err:
            await store.init(info(**props, timeout="2s"))
        assert not isinstance(err.value, psycopg.Error)
        with pytest.raises(StateError, match="not open"):
            await store.get(GetRequest("k"))
        await store.close()

    asyncio.run(main())
