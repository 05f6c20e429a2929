"""Bindings end to end: localstorage over HTTP and the SDK's gRPC, cron delivered to an HTTP app."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dapr.clients import DaprClient

from pillion.testing.procs import Sidecar, free_port, start_sidecar
from tests.e2e.conftest import call

COMPONENTS = """
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: files
spec:
  type: bindings.localstorage
  version: v1
  metadata:
  - name: rootPath
    value: "{root}"
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: ticker
spec:
  type: bindings.cron
  version: v1
  metadata:
  - name: schedule
    value: "@every 1s"
"""


class _App(BaseHTTPRequestHandler):
    events: list[tuple[str, str]] = []

    def do_OPTIONS(self) -> None:
        self.events.append(("OPTIONS", self.path))
        self.send_response(200 if self.path == "/ticker" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.events.append(("POST", self.path))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[tuple[Sidecar, Path]]:
    d = tmp_path_factory.mktemp("bindings")
    res = d / "resources"
    res.mkdir()
    (res / "components.yaml").write_text(COMPONENTS.format(root=d / "root"))
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sc = start_sidecar("binder", home=home, resources=[res], app_port=port, wait="ready")
    yield sc, d / "root"
    sc.proc.stop()
    server.shutdown()


def test_http_localstorage(sidecar: tuple[Sidecar, Path]) -> None:
    sc, root = sidecar
    body = {"data": {"a": 1}, "metadata": {"fileName": "x.json"}, "operation": "create"}
    r = call(sc.http_port, "POST", "/v1.0/bindings/files", body=json.dumps(body))
    assert r.status == 200 and r.json() == {"fileName": "x.json"}
    assert (root / "x.json").read_bytes() == b'{"a":1}'
    body = {"metadata": {"fileName": "x.json"}, "operation": "get"}
    r = call(sc.http_port, "PUT", "/v1.0/bindings/files", body=json.dumps(body))
    assert r.status == 200 and r.json() == {"a": 1}
    body = {"metadata": {"fileName": "x.json"}, "operation": "delete"}
    assert call(sc.http_port, "POST", "/v1.0/bindings/files", body=json.dumps(body)).status == 204
    r = call(sc.http_port, "POST", "/v1.0/bindings/files", body='{"operation": "nope"}')
    assert r.status == 500 and r.json()["errorCode"] == "ERR_INVOKE_OUTPUT_BINDING"
    assert "does not support operation nope" in r.json()["message"]
    r = call(sc.http_port, "POST", "/v1.0/bindings/ghost", body='{"operation": "create"}')
    assert r.json()["message"] == (
        "error invoking output binding ghost: couldn't find output binding ghost"
    )


def test_sdk_grpc_localstorage(
    sidecar: tuple[Sidecar, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sc, _ = sidecar
    monkeypatch.setenv("DAPR_HTTP_PORT", str(sc.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(sc.grpc_port))
    with DaprClient() as client:
        client.invoke_binding("files", "create", b"raw bytes", {"fileName": "g.bin"})
        resp = client.invoke_binding("files", "get", b"", {"fileName": "g.bin"})
        assert resp.data == b"raw bytes"


def test_cron_reaches_the_http_app(sidecar: tuple[Sidecar, Path]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(1 for e in _App.events if e == ("POST", "/ticker")) >= 2:
            break
        time.sleep(0.1)
    assert ("OPTIONS", "/ticker") in _App.events
    assert sum(1 for e in _App.events if e == ("POST", "/ticker")) >= 2


def test_metadata_lists_bindings(sidecar: tuple[Sidecar, Path]) -> None:
    sc, _ = sidecar
    comps = {c["name"]: c for c in call(sc.http_port, "GET", "/v1.0/metadata").json()["components"]}
    assert comps["files"]["capabilities"] == ["OUTPUT_BINDING"]
    assert comps["ticker"]["capabilities"] == ["INPUT_BINDING"]
