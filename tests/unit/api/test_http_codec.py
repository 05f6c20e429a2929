"""HTTP codec: state request bodies decoded into block requests and responses encoded back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pillion.api.http import codec
from pillion.blocks.state import SaveItem, TxOperation
from pillion.components.state.api import BulkGetItem, Concurrency, Consistency
from pillion.errors import PillionError


def decode_error(fn: Any, *args: Any) -> PillionError:
    with pytest.raises(PillionError) as info:
        fn(*args)
    return info.value


def save(items: Any, query_md: dict[str, str] | None = None) -> list[SaveItem]:
    return codec.decode_save(json.dumps(items).encode(), query_md or {})


# --- save ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("hello", b'"hello"'),
        ({"a": 1, "b": [1, 2, {"c": None}]}, b'{"a":1,"b":[1,2,{"c":null}]}'),
        (42, b"42"),
        (True, b"true"),
        (None, b"null"),
        ("", b'""'),
        ("é ✓", '"é ✓"'.encode()),
        ('quote " and \\', b'"quote \\" and \\\\"'),
    ],
)
def test_value_is_stored_as_compact_json_text(value: Any, stored: bytes) -> None:
    (item,) = save([{"key": "k", "value": value}])
    assert item.value == stored


def test_save_item_fields() -> None:
    (item,) = save(
        [
            {
                "key": "k",
                "value": 1,
                "etag": "7",
                "metadata": {"ttlInSeconds": "10"},
                "options": {"concurrency": "first-write", "consistency": "strong"},
            }
        ]
    )
    assert item == SaveItem(
        "k", b"1", "7", {"ttlInSeconds": "10"}, Concurrency.FIRST_WRITE, Consistency.STRONG
    )


def test_save_defaults() -> None:
    (item,) = save([{"key": "k", "value": 1}])
    assert (item.etag, dict(item.metadata), item.concurrency, item.consistency) == (
        None,
        {},
        Concurrency.UNSPECIFIED,
        Consistency.UNSPECIFIED,
    )


def test_empty_etag_and_options_are_absent() -> None:
    (item,) = save([{"key": "k", "value": 1, "etag": "", "options": {"concurrency": ""}}])
    assert item.etag is None and item.concurrency is Concurrency.UNSPECIFIED
    (item,) = save([{"key": "k", "value": 1, "etag": None, "options": None, "metadata": None}])
    assert item.etag is None and dict(item.metadata) == {}


def test_query_metadata_is_merged_and_wins() -> None:
    (item,) = save(
        [{"key": "k", "value": 1, "metadata": {"a": "body", "b": "body"}}],
        {"b": "query", "c": "query"},
    )
    assert dict(item.metadata) == {"a": "body", "b": "query", "c": "query"}


def test_query_metadata_applies_to_every_item() -> None:
    items = save([{"key": "a", "value": 1}, {"key": "b", "value": 2}], {"ttlInSeconds": "5"})
    assert [dict(i.metadata) for i in items] == [{"ttlInSeconds": "5"}] * 2


def test_non_string_metadata_values_become_json_text() -> None:
    (item,) = save([{"key": "k", "value": 1, "metadata": {"n": 5, "b": True}}])
    assert dict(item.metadata) == {"n": "5", "b": "true"}


def test_empty_array_is_no_items() -> None:
    assert codec.decode_save(b"[]", {}) == []


@pytest.mark.parametrize("item", [{"value": 1}, {"key": "", "value": 1}, {"key": None}])
def test_missing_key(item: dict[str, Any]) -> None:
    err = decode_error(save, [item])
    assert (err.code, err.http_status) == ("ERR_MALFORMED_REQUEST", 400)
    assert err.message == '"key" is a required field'


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b"{not json", "failed to parse JSON request body"),
        (b'{"key": "k"}', "expected a JSON array"),
        (b'["k"]', "each state item must be an object"),
        (b'[{"key": 5}]', '"key" must be a string'),
        (b'[{"key": "k", "etag": 5}]', '"etag" must be a string'),
        (b'[{"key": "k", "options": [1]}]', '"options" must be an object'),
        (b'[{"key": "k", "options": "x"}]', '"options" must be an object'),
        (b'[{"key": "k", "metadata": []}]', '"metadata" must be an object'),
        (b'[{"key": "k", "options": {"concurrency": "sometimes"}}]', "invalid concurrency"),
        (b'[{"key": "k", "options": {"consistency": "always"}}]', "invalid consistency"),
        (b'[{"key": "k", "options": {"consistency": 1}}]', '"consistency" must be a string'),
        (b"\xff\xfe[", "failed to parse JSON request body"),
    ],
)
def test_save_body_errors(body: bytes, fragment: str) -> None:
    err = decode_error(codec.decode_save, body, {})
    assert (err.code, err.http_status) == ("ERR_MALFORMED_REQUEST", 400)
    assert fragment in err.message


# --- bulk get -----------------------------------------------------------------------------------


def test_decode_bulk_get() -> None:
    keys, md = codec.decode_bulk_get(
        b'{"keys": ["a", "b"], "parallelism": 10, "metadata": {"m": "1"}}'
    )
    assert (keys, md) == (["a", "b"], {"m": "1"})
    assert codec.decode_bulk_get(b"{}") == ([], {})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "is empty"),
        (b"[]", 'expected {"keys": [...]}'),
        (b'{"keys": "a"}', '"keys" must be an array of strings'),
        (b'{"keys": ["a", 1]}', '"keys" must be an array of strings'),
        (b'{"keys": [], "metadata": "x"}', '"metadata" must be an object'),
        (b"nope", "failed to parse JSON request body"),
    ],
)
def test_bulk_get_errors(body: bytes, fragment: str) -> None:
    err = decode_error(codec.decode_bulk_get, body)
    assert (err.code, err.http_status) == ("ERR_MALFORMED_REQUEST", 400)
    assert fragment in err.message


# --- transaction --------------------------------------------------------------------------------


def test_decode_transaction() -> None:
    ops, md = codec.decode_transaction(
        json.dumps(
            {
                "operations": [
                    {"operation": "upsert", "request": {"key": "a", "value": {"x": 1}}},
                    {"operation": "delete", "request": {"key": "b", "etag": "3"}},
                ],
                "metadata": {"partitionKey": "p"},
            }
        ).encode()
    )
    assert ops == [
        TxOperation("upsert", SaveItem("a", b'{"x":1}')),
        TxOperation("delete", SaveItem("b", b"", "3")),
    ]
    assert md == {"partitionKey": "p"}


@pytest.mark.parametrize("body", [b"{}", b'{"operations": null}', b'{"operations": []}'])
def test_transaction_without_operations(body: bytes) -> None:
    assert codec.decode_transaction(body) == ([], {})


@pytest.mark.parametrize("op", ["merge", "Upsert", "DELETE", ""])
def test_unknown_transaction_operation(op: str) -> None:
    body = json.dumps({"operations": [{"operation": op, "request": {"key": "a"}}]}).encode()
    err = decode_error(codec.decode_transaction, body)
    assert (err.code, err.http_status) == ("ERR_NOT_SUPPORTED_STATE_OPERATION", 400)
    assert err.message == f"operation type {op} not supported"


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"[]", "ERR_MALFORMED_REQUEST", 'expected {"operations": [...]}'),
        (b'{"operations": {}}', "ERR_MALFORMED_REQUEST", '"operations" must be an array'),
        (b'{"operations": [1]}', "ERR_MALFORMED_REQUEST", "operation 0 must be an object"),
        (
            b'{"operations": [{"request": {}}]}',
            "ERR_MALFORMED_REQUEST",
            '"operation" is a required',
        ),
        (b'{"operations": [{"operation": "upsert"}]}', "ERR_MALFORMED_REQUEST", "operation 0:"),
        (
            b'{"operations": [{"operation": "upsert", "request": {"value": 1}}]}',
            "ERR_MALFORMED_REQUEST",
            '"key" is a required field',
        ),
    ],
)
def test_transaction_errors(body: bytes, code: str, fragment: str) -> None:
    err = decode_error(codec.decode_transaction, body)
    assert (err.code, err.http_status) == (code, 400)
    assert fragment in err.message


# --- responses ----------------------------------------------------------------------------------


def test_query_metadata() -> None:
    q = {
        "metadata.ttlInSeconds": "5",
        "metadata.": "empty",
        "consistency": "strong",
        "metadatax": "1",
    }
    assert codec.query_metadata(q) == {"ttlInSeconds": "5", "": "empty"}


def test_error_response() -> None:
    err = PillionError("ERR_X", "m", 409)
    resp = codec.error(err)
    assert resp.status == 409
    assert resp.headers == [(b"content-type", b"application/json")]
    assert json.loads(resp.body) == {"errorCode": "ERR_X", "message": "m"}


def test_json_response_is_compact() -> None:
    resp = codec.json_response({"a": [1, 2]}, 201)
    assert (resp.status, resp.body) == (201, b'{"a":[1,2]}')
    assert resp.headers == [(b"content-type", b"application/json")]


def test_no_content() -> None:
    r = codec.no_content()
    assert r is not codec.no_content()
    assert (r.status, r.headers, r.body) == (
        204,
        [],
        b"",
    )


def test_bulk_get_response_embeds_json_and_strings() -> None:
    resp = codec.bulk_get_response(
        [
            BulkGetItem("obj", b'{"a":1}', "1", {"ttlExpireTime": "2030-01-01T00:00:00Z"}),
            BulkGetItem("str", b'"quoted"', "2"),
            BulkGetItem("raw", b"hello world", "3"),
            BulkGetItem("missing"),
            BulkGetItem("bad", error="cannot read"),
            BulkGetItem("empty", b"", "4"),
        ]
    )
    assert resp.status == 200
    assert resp.headers == [(b"content-type", b"application/json")]
    assert json.loads(resp.body) == [
        {
            "key": "obj",
            "data": {"a": 1},
            "etag": "1",
            "metadata": {"ttlExpireTime": "2030-01-01T00:00:00Z"},
        },
        {"key": "str", "data": "quoted", "etag": "2"},
        {"key": "raw", "data": "hello world", "etag": "3"},
        {"key": "missing"},
        {"key": "bad", "error": "cannot read"},
        {"key": "empty", "data": "", "etag": "4"},
    ]


def test_bulk_get_response_keeps_json_bytes_verbatim() -> None:
    resp = codec.bulk_get_response([BulkGetItem("k", b'{"b": 2,  "a": 1}')])
    assert resp.body == b'[{"key":"k","data":{"b": 2,  "a": 1}}]'


def test_bulk_get_response_non_utf8_bytes_still_give_json() -> None:
    resp = codec.bulk_get_response([BulkGetItem("k", b"\xff\x00ab")])
    assert json.loads(resp.body) == [{"key": "k", "data": "\ufffd\x00ab"}]


def test_bulk_get_response_empty() -> None:
    assert codec.bulk_get_response([]).body == b"[]"


def _strict_loads(data: bytes) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(data.decode("utf-8"), parse_constant=reject)


@pytest.mark.parametrize(
    "data",
    [b"NaN", b"-Infinity", b'\xef\xbb\xbf{"a":1}', '{"a":1}'.encode("utf-16")],
    ids=["nan", "infinity", "utf8-bom", "utf16"],
)
def test_bulk_get_response_is_always_valid_json(data: bytes) -> None:
    _strict_loads(codec.bulk_get_response([BulkGetItem("k", data)]).body)
