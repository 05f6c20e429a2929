"""Bad input never yields a traceback or a bodiless error: each answer carries a Dapr code."""

from __future__ import annotations

import random
import socket

import pytest

from tests.e2e.conftest import Pair, call

CASES = [
    ("POST", "/v1.0/state/statestore", "{not json", 400, "ERR_MALFORMED_REQUEST"),
    ("POST", "/v1.0/state/statestore", '{"key": 1}', 400, "ERR_MALFORMED_REQUEST"),
    ("POST", "/v1.0/state/statestore", '[{"key": 5, "value": 1}]', 400, "ERR_MALFORMED_REQUEST"),
    ("POST", "/v1.0/state/statestore", '[{"key": "k", "etag": 7}]', 400, "ERR_MALFORMED_REQUEST"),
    (
        "POST",
        "/v1.0/state/statestore",
        '[{"key": "k", "options": 3}]',
        400,
        "ERR_MALFORMED_REQUEST",
    ),
    (
        "POST",
        "/v1.0/state/statestore",
        '[{"key": "k", "value": 1, "options": {"concurrency": "sometimes"}}]',
        400,
        "ERR_MALFORMED_REQUEST",
    ),
    ("POST", "/v1.0/state/statestore/bulk", '{"keys": [1, 2]}', 400, "ERR_MALFORMED_REQUEST"),
    (
        "POST",
        "/v1.0/state/statestore/transaction",
        '{"operations": {}}',
        400,
        "ERR_MALFORMED_REQUEST",
    ),
    (
        "POST",
        "/v1.0/state/statestore/transaction",
        '{"operations": [7]}',
        400,
        "ERR_MALFORMED_REQUEST",
    ),
    ("GET", "/v1.0/state/unknown/k", None, 400, "ERR_STATE_STORE_NOT_FOUND"),
    ("DELETE", "/v1.0/state/unknown/k", None, 400, "ERR_STATE_STORE_NOT_FOUND"),
    ("GET", "/v1.0/state/statestore/a%7C%7Cb", None, 400, "ERR_MALFORMED_REQUEST"),
    ("GET", "/v1.0/invoke/nobody/method/x", None, 500, "ERR_DIRECT_INVOKE"),
    ("GET", "/v1.0/invoke/", None, 404, "ERR_BAD_REQUEST"),
    ("GET", "/v1.0/state/statestore", None, 405, "ERR_BAD_REQUEST"),
    ("DELETE", "/v1.0/metadata", None, 405, "ERR_BAD_REQUEST"),
    ("GET", "/v1.0/shutdown", None, 405, "ERR_BAD_REQUEST"),
    ("POST", "/v1.0/bindings/b", "{}", 500, "ERR_INVOKE_OUTPUT_BINDING"),
    ("POST", "/v1.0/bindings/b", "{", 400, "ERR_MALFORMED_REQUEST"),
    ("GET", "/v1.0/secrets/s/k", None, 500, "ERR_SECRET_STORES_NOT_CONFIGURED"),
    ("PUT", "/v1.0/actors/t/i/state", "[]", 501, "ERR_API_UNIMPLEMENTED"),
    ("GET", "/whatever", None, 404, "ERR_DIRECT_INVOKE"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), CASES)
def test_bad_requests(
    pair: Pair, method: str, path: str, body: str | None, status: int, code: str
) -> None:
    r = call(pair.alpha.http_port, method, path, body=body)
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/json"
    assert r.json()["errorCode"] == code
    assert r.json()["message"]


def test_malformed_http(pair: Pair) -> None:
    with socket.create_connection(("127.0.0.1", pair.alpha.http_port), timeout=10) as s:
        s.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400")
    assert b"ERR_MALFORMED_REQUEST" in data


def test_random_requests_never_break(pair: Pair) -> None:
    """A bounded random walk over paths, verbs and bodies: every error has a JSON body."""
    rng = random.Random(20261129)
    segments = [
        "v1.0",
        "v1.0-alpha1",
        "state",
        "statestore",
        "memstore",
        "bulk",
        "transaction",
        "invoke",
        "beta",
        "method",
        "metadata",
        "healthz",
        "",
        "%00",
        "..",
        "a||b",
        "x",
    ]
    bodies = [
        None,
        "",
        "{}",
        "[]",
        "null",
        "[{}]",
        '{"keys": null}',
        "\xff\xfe",
        "[" * 50,
        '[{"key": "k", "value": {"deep": [1, 2, {"x": null}]}}]',
        '{"operations": [{}]}',
    ]
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    for _ in range(300):
        path = "/" + "/".join(rng.choice(segments) for _ in range(rng.randint(1, 5)))
        if path.endswith("shutdown"):
            continue
        r = call(pair.alpha.http_port, rng.choice(methods), path, body=rng.choice(bodies))
        if r.status >= 400:
            assert r.body, (path, r.status)
            assert r.headers.get("content-type") == "application/json", (path, r.status)
            assert "errorCode" in r.json(), (path, r.body)
        assert b"Traceback" not in r.body
    assert call(pair.alpha.http_port, "GET", "/v1.0/healthz").status == 204
    for sc in (pair.alpha, pair.beta):
        assert "Traceback" not in sc.proc.output
        assert "level=error" not in sc.proc.output
