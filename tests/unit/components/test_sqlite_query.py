"""The query API of `state.sqlite`: filters over JSON paths, sorting, paging, rejects."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import TTL_KEY, InvalidQuery, SetRequest
from pillion.components.state.sqlite import SQLiteStateStore

DOCS: dict[str, Any] = {
    "a": {"city": "Oslo", "n": 1, "tags": ["x", "y"], "addr": {"zip": "0150", "no": 3}},
    "b": {"city": "Rome", "n": 2.5, "tags": ["y"], "addr": {"zip": "00100", "no": 7}},
    "c": {"city": "Oslo", "n": 10, "tags": [], "ok": True},
    "d": {"city": "Lima", "n": "10", "ok": False, "nothing": None},
    "e": {"city": "Rome", "n": -3, "tags": ["z", "x"]},
}


def run(tmp_path: Path, body: Callable[[SQLiteStateStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = SQLiteStateStore()
        props = {"connectionString": str(tmp_path / "q.db")}
        await store.init(ComponentInfo("s", "state.sqlite", "v1", "app", Properties(props)))
        try:
            for k, v in DOCS.items():
                await store.set(SetRequest(k, json.dumps(v).encode()))
            await store.set(SetRequest("bin", b"\xff\x00not json"))
            await store.set(SetRequest("text", b"plain text"))
            await store.set(SetRequest("nul", b'{"city": "Oslo"}\x00junk'))
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def keys(store: SQLiteStateStore, q: Any) -> list[str]:
    return [i.key for i in (await store.query(q, {})).results]


@pytest.mark.parametrize(
    ("flt", "want"),
    [
        ({"EQ": {"city": "Oslo"}}, ["a", "c"]),
        ({"EQ": {"n": 10}}, ["c"]),  # the number, not the string "10"
        ({"EQ": {"n": 10.0}}, ["c"]),
        ({"EQ": {"n": "10"}}, ["d"]),
        ({"EQ": {"addr.zip": "00100"}}, ["b"]),
        ({"EQ": {"tags.0": "x"}}, ["a"]),
        ({"EQ": {"tags.1": "x"}}, ["e"]),
        ({"EQ": {"ok": True}}, ["c"]),
        ({"EQ": {"ok": False}}, ["d"]),
        ({"EQ": {"nothing": None}}, ["d"]),
        ({"EQ": {"tags": ["y"]}}, ["b"]),
        ({"NEQ": {"city": "Oslo"}}, ["b", "d", "e"]),
        ({"NEQ": {"ok": True}}, ["d"]),  # missing fields never match
        ({"IN": {"city": ["Rome", "Lima"]}}, ["b", "d", "e"]),
        ({"IN": {"n": [1, "10"]}}, ["a", "d"]),
        ({"GT": {"n": 1}}, ["b", "c"]),  # "10" is a string: no range match
        ({"GTE": {"n": 1}}, ["a", "b", "c"]),
        ({"LT": {"n": 2.5}}, ["a", "e"]),
        ({"LTE": {"addr.no": 3}}, ["a"]),
        ({"AND": [{"EQ": {"city": "Rome"}}, {"GT": {"n": 0}}]}, ["b"]),
        ({"OR": [{"EQ": {"city": "Lima"}}, {"EQ": {"addr.no": 3}}]}, ["a", "d"]),
        (
            {
                "AND": [
                    {"OR": [{"EQ": {"city": "Oslo"}}, {"EQ": {"city": "Rome"}}]},
                    {"LT": {"n": 5}},
                ]
            },
            ["a", "b", "e"],
        ),
    ],
)
def test_filters(tmp_path: Path, flt: Any, want: list[str]) -> None:
    async def body(store: SQLiteStateStore) -> None:
        assert await keys(store, {"filter": flt}) == want

    run(tmp_path, body)


def test_all_json_rows_and_stored_bytes(tmp_path: Path) -> None:
    async def body(store: SQLiteStateStore) -> None:
        resp = await store.query(b"{}", {})
        assert [i.key for i in resp.results] == ["a", "b", "c", "d", "e"]  # not bin/text/nul
        assert resp.results[0].data == json.dumps(DOCS["a"]).encode()
        assert resp.results[0].etag and resp.token == ""

    run(tmp_path, body)


def test_sort_and_pages(tmp_path: Path) -> None:
    async def body(store: SQLiteStateStore) -> None:
        # Strings before numbers (jsonb's type order), missing values last; then the key.
        assert await keys(store, {"sort": [{"key": "n"}]}) == ["d", "e", "a", "b", "c"]
        assert await keys(store, {"sort": [{"key": "n", "order": "DESC"}]}) == [
            "c",
            "b",
            "a",
            "e",
            "d",
        ]
        assert await keys(store, {"sort": [{"key": "city"}, {"key": "n", "order": "DESC"}]}) == [
            "d",
            "c",
            "a",
            "b",
            "e",
        ]
        # Missing values sort last ascending, so first descending.
        assert await keys(store, {"sort": [{"key": "addr.no", "order": "DESC"}]}) == [
            "c",
            "d",
            "e",
            "b",
            "a",
        ]
        seen: list[str] = []
        token = ""
        for _ in range(5):
            page: dict[str, Any] = {"limit": 2, **({"token": token} if token else {})}
            resp = await store.query({"sort": [{"key": "n"}], "page": page}, {})
            seen += [i.key for i in resp.results]
            token = resp.token
            if not resp.results:
                break
        assert seen == ["d", "e", "a", "b", "c"]
        assert token == "5"

    run(tmp_path, body)


def test_expired_rows_are_skipped(tmp_path: Path) -> None:
    async def body(store: SQLiteStateStore) -> None:
        await store.set(SetRequest("gone", b'{"city": "Oslo"}', metadata={TTL_KEY: "1"}))
        assert "gone" in await keys(store, {"filter": {"EQ": {"city": "Oslo"}}})
        await asyncio.sleep(1.1)
        assert await keys(store, {"filter": {"EQ": {"city": "Oslo"}}}) == ["a", "c"]

    run(tmp_path, body)


def test_injection_attempts_are_plain_values(tmp_path: Path) -> None:
    async def body(store: SQLiteStateStore) -> None:
        await store.set(SetRequest("i", b'{"name": "x\' OR 1=1 --", "a\'b": {"c": 1}, "$": 2}'))
        assert await keys(store, {"filter": {"EQ": {"name": "x' OR 1=1 --"}}}) == ["i"]
        assert await keys(store, {"filter": {"EQ": {"name": "' OR ''='"}}}) == []
        assert await keys(store, {"filter": {"EQ": {"a'b.c": 1}}}) == ["i"]
        assert await keys(store, {"filter": {"EQ": {"$": 2}}}) == ["i"]
        assert await keys(store, {"filter": {"EQ": {"') OR 1=1; DROP TABLE state; --": 1}}}) == []
        assert len(await keys(store, {"sort": [{"key": "'); DROP TABLE state; --"}]})) == 6
        with pytest.raises(InvalidQuery):
            await store.query({"filter": {"EQ": {'a"].x': 1}}}, {})
        with sqlite3.connect(tmp_path / "q.db") as conn:
            assert conn.execute("SELECT count(*) FROM state").fetchone() == (9,)

    run(tmp_path, body)


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
        {"filter": {"EQ": {"a": float("nan")}}},
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
def test_invalid_queries_are_rejected(tmp_path: Path, q: Any) -> None:
    async def body(store: SQLiteStateStore) -> None:
        with pytest.raises(InvalidQuery):
            await store.query(q, {})

    run(tmp_path, body)
