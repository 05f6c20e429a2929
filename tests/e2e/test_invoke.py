"""Service invocation between two real sidecars and apps, with the official SDK as a client."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprHttpError

from pillion.testing.procs import start_sidecar, wait_until
from tests.e2e.conftest import Pair, call, start_app

VERBS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@pytest.fixture
def sdk_port(pair: Pair) -> Iterator[int]:
    old = os.environ.get("DAPR_HTTP_PORT")
    os.environ["DAPR_HTTP_PORT"] = str(pair.alpha.http_port)
    yield pair.alpha.http_port
    if old is None:
        os.environ.pop("DAPR_HTTP_PORT", None)
    else:
        os.environ["DAPR_HTTP_PORT"] = old


def test_sdk_invoke_method(pair: Pair, sdk_port: int) -> None:
    with DaprClient() as d:
        resp = d.invoke_method(
            "beta",
            "orders/42",
            data=b'{"n": 1}',
            http_verb="POST",
            content_type="application/json",
            metadata=(("x-custom", "yes"),),
            http_querystring=(("a", "1"), ("b", "two words")),
        )
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["app"] == "beta"
    assert echo["method"] == "POST"
    assert echo["path"] == "/orders/42"
    assert echo["query"] == "a=1&b=two+words"
    assert echo["body"] == '{"n": 1}'
    h = echo["headers"]
    assert h["x-custom"] == "yes"
    assert h["content-type"] == "application/json"
    assert h["dapr-caller-app-id"] == "alpha"
    assert h["dapr-callee-app-id"] == "beta"
    assert "dapr-api-token" not in h and "dapr-app-id" not in h
    assert resp.content_type == "application/json"


def test_sdk_invoke_error_status(pair: Pair, sdk_port: int) -> None:
    with DaprClient() as d, pytest.raises(DaprHttpError) as ei:
        d.invoke_method("nobody-here", "x", data=b"", http_verb="GET")
    assert ei.value.status_code == 500
    assert ei.value.error_code == "ERR_DIRECT_INVOKE"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb(pair: Pair, verb: str) -> None:
    r = call(pair.alpha.http_port, verb, "/v1.0/invoke/beta/method/verbs?q=1", body="payload")
    assert r.status == 200, r.body
    echo = r.json()
    assert echo["method"] == verb
    assert echo["query"] == "q=1"
    assert echo["body"] == "payload"


def test_head_has_no_body(pair: Pair) -> None:
    r = call(pair.alpha.http_port, "HEAD", "/v1.0/invoke/beta/method/x")
    assert r.status == 200
    assert r.body == b""
    assert r.headers["x-echo-app"] == "beta"


@pytest.mark.parametrize(
    ("code", "reason"),
    [(201, "Created"), (404, "Nope"), (418, "Teapot"), (500, "Broken"), (503, "Later")],
)
def test_status_and_reason_pass_through(pair: Pair, code: int, reason: str) -> None:
    r = call(pair.alpha.http_port, "GET", f"/v1.0/invoke/beta/method/status/{code}?reason={reason}")
    assert r.status == code
    assert r.reason == reason
    assert r.body == f"status {code}".encode()
    assert r.headers["content-type"] == "text/plain"
    assert r.headers["x-echo-app"] == "beta"


def test_headers_both_ways(pair: Pair) -> None:
    r = call(
        pair.alpha.http_port,
        "POST",
        "/v1.0/invoke/beta/method/h",
        body="{}",
        headers={
            "content-type": "application/vnd.test+json",
            "x-trace-me": "abc",
            "dapr-api-token": "secret",
            "connection": "keep-alive, x-hop",
            "x-hop": "must-not-pass",
            "dapr-caller-app-id": "spoofed",
        },
    )
    assert r.status == 200
    h = r.json()["headers"]
    assert h["content-type"] == "application/vnd.test+json"
    assert h["x-trace-me"] == "abc"
    assert "dapr-api-token" not in h
    assert h["dapr-caller-app-id"] == "alpha"
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert "for=127.0.0.1" in h["forwarded"]
    assert r.headers["set-cookie"] == "a=1"
    assert "transfer-encoding" not in r.headers


def test_header_form_and_namespace(pair: Pair) -> None:
    r = call(pair.alpha.http_port, "PUT", "/items/7?x=y", body="b", headers={"dapr-app-id": "beta"})
    assert r.status == 200
    echo = r.json()
    assert (echo["path"], echo["query"], echo["method"]) == ("/items/7", "x=y", "PUT")
    assert "dapr-app-id" not in echo["headers"]
    r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/beta.default/method/ns")
    assert r.status == 200 and r.json()["app"] == "beta"


def test_self_invocation(pair: Pair) -> None:
    r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/alpha/method/me")
    assert r.status == 200 and r.json()["app"] == "alpha"


def test_unknown_app_and_bad_ids(pair: Pair) -> None:
    r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/ghost/method/x")
    assert r.status == 500
    assert r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    assert "ghost" in r.json()["message"]
    r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/a.b.c/method/x")
    assert r.status == 500 and r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    assert "invalid app id a.b.c" in r.json()["message"]
    r = call(pair.alpha.http_port, "POST", "/not/an/api")
    assert r.status == 404
    assert r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    assert "dapr-app-id" in r.json()["message"]


def test_large_and_oversize_bodies(pair: Pair) -> None:
    big = "x" * (1024 * 1024)
    r = call(pair.alpha.http_port, "POST", "/v1.0/invoke/beta/method/big", body=big)
    assert r.status == 200 and len(r.json()["body"]) == len(big)
    r = call(pair.alpha.http_port, "POST", "/v1.0/invoke/beta/method/big", body="y" * (5 << 20))
    assert r.status == 413
    assert r.json()["errorCode"] == "ERR_BODY_TOO_LARGE"


def test_chunked_request_body(pair: Pair) -> None:
    with socket.create_connection(("127.0.0.1", pair.alpha.http_port), timeout=10) as s:
        s.sendall(
            b"POST /v1.0/invoke/beta/method/chunks HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"body": "hello world"' in data


def test_dead_target_sidecar(pair: Pair, home: Path, resources: Path) -> None:
    app, port = start_app("gamma")
    sc = start_sidecar("gamma", home=home, resources=[resources], app_port=port, wait="ready")
    try:
        r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/gamma/method/x")
        assert r.status == 200 and r.json()["app"] == "gamma"
        sc.proc.kill()  # SIGKILL: no clean deregistration
        wait_until(
            lambda: call(pair.alpha.http_port, "GET", "/v1.0/invoke/gamma/method/x").status == 500,
            10,
            "calls to a dead sidecar to fail",
        )
        r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/gamma/method/x")
        assert r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    finally:
        sc.proc.kill()
        app.stop()
