"""Configuration end to end: a sidecar with configuration.redis over HTTP and the SDK's gRPC."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from dapr.clients import DaprClient

from pillion.testing.procs import Sidecar, free_port, start_sidecar
from tests.conformance.conftest import require_server
from tests.e2e.conftest import call

COMPONENTS = """
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: configstore
spec:
  type: configuration.redis
  version: v1
  metadata:
  - name: redisHost
    value: 127.0.0.1:6379
"""


@dataclass
class Setup:
    sidecar: Sidecar
    redis: redis.Redis
    prefix: str
    posts: queue.Queue[tuple[str, Any]]


class _App(BaseHTTPRequestHandler):
    posts: queue.Queue[tuple[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.posts.put((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Setup]:
    require_server("redis", "127.0.0.1", 6379)
    r = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    prefix = f"e2econf{uuid.uuid4().hex[:8]}"
    r.set(f"{prefix}a", "1||v1")
    r.set(f"{prefix}b", "plain")
    posts: queue.Queue[tuple[str, Any]] = queue.Queue()
    handler = type("App", (_App,), {"posts": posts})
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = tmp_path_factory.mktemp("configuration")
    (d / "components.yaml").write_text(COMPONENTS)
    sc = start_sidecar("configured", home=home, resources=[d], app_port=port, wait="ready")
    yield Setup(sc, r, prefix, posts)
    sc.proc.stop()
    server.shutdown()
    r.delete(*r.keys(f"{prefix}*"))
    r.close()


def get(s: Setup, path: str) -> tuple[int, Any]:
    r = call(s.sidecar.http_port, "GET", path)
    return r.status, (r.json() if r.body else None)


def test_http_get(conf: Setup) -> None:
    p = conf.prefix
    for version in ("v1.0", "v1.0-alpha1"):
        status, body = get(conf, f"/{version}/configuration/configstore?key={p}a&key={p}b")
        assert status == 200
        assert body == {
            f"{p}a": {"value": "1", "version": "v1", "metadata": {}},
            f"{p}b": {"value": "plain", "version": "", "metadata": {}},
        }
    status, body = get(conf, "/v1.0/configuration/configstore")
    assert status == 200 and f"{p}a" in body
    assert get(conf, f"/v1.0/configuration/configstore?key={p}none") == (204, None)


def test_http_errors(conf: Setup) -> None:
    status, body = get(conf, "/v1.0/configuration/nostore?key=a")
    assert status == 400 and body["errorCode"] == "ERR_CONFIGURATION_STORE_NOT_FOUND"
    assert get(conf, "/v1.0/configuration/configstore/nope/unsubscribe") == (
        500,
        {"ok": False, "message": "subscription with id nope does not exist"},
    )


def test_http_subscribe_posts_updates_to_the_app(conf: Setup) -> None:
    key = f"{conf.prefix}watched"
    status, body = get(conf, f"/v1.0/configuration/configstore/subscribe?key={key}")
    assert status == 200
    sub_id = body["id"]
    time.sleep(0.3)
    conf.redis.set(key, "on||3")
    path, event = conf.posts.get(timeout=5)
    assert path == f"/configuration/configstore/{key}"
    assert event == {"id": sub_id, "items": {key: {"value": "on", "version": "3", "metadata": {}}}}
    assert get(conf, f"/v1.0/configuration/configstore/{sub_id}/unsubscribe") == (
        200,
        {"ok": True},
    )
    conf.redis.set(key, "off||4")
    with pytest.raises(queue.Empty):
        conf.posts.get(timeout=0.5)


@pytest.fixture
def client(conf: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(conf.sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(conf.sidecar.grpc_port))
    with DaprClient() as d:
        yield d


def test_sdk_get_configuration(client: DaprClient, conf: Setup) -> None:
    p = conf.prefix
    resp = client.get_configuration("configstore", [f"{p}a", f"{p}b"])
    assert {k: (i.value, i.version) for k, i in resp.items.items()} == {
        f"{p}a": ("1", "v1"),
        f"{p}b": ("plain", ""),
    }


def test_sdk_subscribe_and_unsubscribe(client: DaprClient, conf: Setup) -> None:
    key = f"{conf.prefix}sdk"
    got: queue.Queue[tuple[str, dict[str, tuple[str, str]]]] = queue.Queue()

    def handler(sub_id: str, resp: Any) -> None:
        got.put((sub_id, {k: (i.value, i.version) for k, i in resp.items.items()}))

    sub_id = client.subscribe_configuration("configstore", [key], handler)
    assert sub_id
    time.sleep(0.3)
    conf.redis.set(key, "hello||9")
    assert got.get(timeout=5) == (sub_id, {key: ("hello", "9")})
    assert client.unsubscribe_configuration("configstore", sub_id) is True
    conf.redis.set(key, "bye||10")
    with pytest.raises(queue.Empty):
        got.get(timeout=0.5)
    assert client.unsubscribe_configuration("configstore", sub_id) is False
