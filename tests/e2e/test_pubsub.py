"""Pub/sub end to end: publish over HTTP and gRPC, a DaprApp subscriber, routing, retries, DLQ."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pillion.testing.procs import Proc, Sidecar, free_port, start_sidecar, wait_until
from tests.e2e.conftest import APPS, call

RESOURCES = """
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.sqlite
  version: v1
  metadata:
  - name: connectionString
    value: "{db}"
  - name: redeliverInterval
    value: 1s
  - name: processingTimeout
    value: 3s
---
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: routed
spec:
  pubsubname: pubsub
  topic: routed
  routes:
    rules:
    - match: event.type == "order.v2" && event.data.n > 5
      path: /routed/v2
    default: /routed/default
scopes: [sub]
---
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: bulk
spec:
  pubsubname: pubsub
  topic: bulk
  routes:
    default: /bulk
  bulkSubscribe:
    enabled: true
    maxMessagesCount: 10
    maxAwaitDurationMs: 200
scopes: [sub]
"""


@dataclass
class PubSubEnv:
    pub: Sidecar
    sub: Sidecar
    app_port: int
    procs: list[Proc]

    def received(self, route: str | None = None) -> list[dict[str, Any]]:
        items = call(self.app_port, "GET", "/received").json()
        return [i for i in items if route is None or i["route"] == route]


@pytest.fixture(scope="module")
def ps(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[PubSubEnv]:
    res = tmp_path_factory.mktemp("ps-resources")
    (res / "pubsub.yaml").write_text(RESOURCES.format(db=res / "pubsub.db"))
    port = free_port()
    app = Proc.start(
        "app sub",
        [sys.executable, str(APPS / "subscriber.py"), str(port)],
        env={**os.environ, "PUBSUB_NAME": "pubsub"},
    )
    app.wait_for_line("listening", 20)
    sub = start_sidecar("sub", home=home, resources=[res], app_port=port, wait="ready", timeout=30)
    pub = start_sidecar("pub", home=home, resources=[res])
    env = PubSubEnv(pub, sub, port, [app, sub.proc, pub.proc])
    yield env
    for p in (pub.proc, sub.proc, app):
        p.stop()


def publish(
    env: PubSubEnv, topic: str, body: Any, ctype: str = "application/json", query: str = ""
) -> int:
    data = body if isinstance(body, str) else json.dumps(body)
    return call(
        env.pub.http_port,
        "POST",
        f"/v1.0/publish/pubsub/{topic}{query}",
        body=data,
        headers={"content-type": ctype},
    ).status


def test_http_publish_reaches_daprapp(ps: PubSubEnv) -> None:
    assert publish(ps, "orders", {"order": 1}) == 204
    wait_until(
        lambda: any(r["data"] == {"order": 1} for r in ps.received("orders")), 10, "the order event"
    )
    ev = next(r for r in ps.received("orders") if r["data"] == {"order": 1})
    assert ev["type"] == "com.dapr.event.sent" and ev["topic"] == "orders"


def test_sdk_publish_over_grpc(ps: PubSubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from dapr.clients import DaprClient

    monkeypatch.setenv("DAPR_HTTP_PORT", str(ps.pub.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(ps.pub.grpc_port))
    with DaprClient() as d:
        d.publish_event(
            "pubsub", "orders", json.dumps({"sdk": True}), data_content_type="application/json"
        )
    wait_until(
        lambda: any(r["data"] == {"sdk": True} for r in ps.received("orders")),
        10,
        "the SDK's event",
    )


def test_routing_rules(ps: PubSubEnv) -> None:
    v2 = {
        "specversion": "1.0",
        "id": "r-1",
        "source": "test",
        "type": "order.v2",
        "datacontenttype": "application/json",
        "data": {"n": 7},
    }
    small = dict(v2, id="r-2", data={"n": 1})
    other = dict(v2, id="r-3", type="order.v1")
    for ev in (v2, small, other):
        assert publish(ps, "routed", ev, "application/cloudevents+json") == 204
    wait_until(
        lambda: len(ps.received("routed-v2")) + len(ps.received("routed-default")) >= 3,
        10,
        "routed events",
    )
    assert [r["id"] for r in ps.received("routed-v2")] == ["r-1"]
    assert sorted(r["id"] for r in ps.received("routed-default")) == ["r-2", "r-3"]


def test_retry_then_success(ps: PubSubEnv) -> None:
    assert publish(ps, "flaky", {"f": 1}) == 204
    wait_until(lambda: len(ps.received("flaky")) >= 2, 15, "a retried delivery")
    ids = [r["id"] for r in ps.received("flaky")]
    assert len(set(ids)) == 1 and len(ids) == 2


def test_dead_letter_topic(ps: PubSubEnv) -> None:
    assert publish(ps, "poison", {"p": 1}) == 204
    wait_until(lambda: ps.received("dlq"), 20, "the dead-lettered event")
    dead = ps.received("dlq")[0]
    assert dead["data"] == {"p": 1}
    assert dead["topic"] == "poison"  # the original topic is kept
    assert len(ps.received("poison")) >= 1


def test_metadata_lists_subscriptions(ps: PubSubEnv) -> None:
    md = call(ps.sub.http_port, "GET", "/v1.0/metadata").json()
    subs = {(s["topic"], s["type"]) for s in md["subscriptions"]}
    assert ("routed", "DECLARATIVE") in subs and ("orders", "PROGRAMMATIC") in subs
    routed = next(s for s in md["subscriptions"] if s["topic"] == "routed")
    assert routed["rules"][0]["path"] == "/routed/v2"
    poison = next(s for s in md["subscriptions"] if s["topic"] == "poison")
    assert poison["deadLetterTopic"] == "poison-dlq"


def test_publish_errors(ps: PubSubEnv) -> None:
    r = call(ps.pub.http_port, "POST", "/v1.0/publish/nopubsub/orders", body="{}")
    assert r.status == 404 and r.json()["errorCode"] == "ERR_PUBSUB_NOT_FOUND"
    r = call(
        ps.pub.http_port, "POST", "/v1.0/publish/pubsub/orders?metadata.rawPayload=maybe", body="{}"
    )
    assert r.status == 400 and r.json()["errorCode"] == "ERR_PUBSUB_REQUEST_METADATA"
    r = call(
        ps.pub.http_port,
        "POST",
        "/v1.0/publish/pubsub/orders",
        body="not a ce",
        headers={"content-type": "application/cloudevents+json"},
    )
    assert r.status == 500 and r.json()["errorCode"] == "ERR_PUBSUB_CLOUD_EVENTS_SER"


def test_bulk_publish_http(ps: PubSubEnv) -> None:
    entries = [
        {"entryId": str(i), "event": {"bulk": i}, "contentType": "application/json"}
        for i in range(5)
    ]
    r = call(
        ps.pub.http_port,
        "POST",
        "/v1.0-alpha1/publish/bulk/pubsub/orders",
        body=json.dumps(entries),
    )
    assert r.status == 204, r.body
    wait_until(
        lambda: (
            sum(
                1
                for x in ps.received("orders")
                if isinstance(x["data"], dict) and "bulk" in x["data"]
            )
            == 5
        ),
        10,
        "bulk events",
    )
    dup = [{"entryId": "a", "event": 1, "contentType": "application/json"}] * 2
    r = call(
        ps.pub.http_port, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", body=json.dumps(dup)
    )
    assert r.status == 400 and r.json()["errorCode"] == "ERR_PUBSUB_EVENTS_SER"


def test_bulk_subscribe(ps: PubSubEnv) -> None:
    for i in range(8):
        assert publish(ps, "bulk", {"b": i}) == 204
    wait_until(lambda: len(ps.received("bulk")) >= 8, 15, "bulk-delivered events")
    assert sorted(r["data"]["b"] for r in ps.received("bulk")) == list(range(8))
    batches = call(ps.app_port, "GET", "/batches").json()
    assert sum(batches) == 8 and max(batches) > 1, batches  # several events per request


def test_unhealthy_app_pauses_delivery(tmp_path: Path, home: Path) -> None:
    (tmp_path / "pubsub.yaml").write_text(RESOURCES.format(db=tmp_path / "pubsub.db"))
    port = free_port()
    app = Proc.start(
        "app sub2",
        [sys.executable, str(APPS / "subscriber.py"), str(port)],
        env={**os.environ, "PUBSUB_NAME": "pubsub"},
    )
    procs = [app]
    try:
        app.wait_for_line("listening", 20)
        sub = start_sidecar(
            "sub2",
            home=home,
            resources=[tmp_path],
            app_port=port,
            wait="ready",
            timeout=30,
            extra=[
                "--enable-app-health-check",
                "--app-health-probe-interval",
                "1",
                "--app-health-threshold",
                "1",
            ],
        )
        pub = start_sidecar("pub2", home=home, resources=[tmp_path])
        procs += [sub.proc, pub.proc]
        env = PubSubEnv(pub, sub, port, procs)
        assert publish(env, "orders", {"phase": "healthy"}) == 204
        wait_until(
            lambda: any(r["data"] == {"phase": "healthy"} for r in env.received("orders")),
            10,
            "delivery while healthy",
        )
        call(port, "POST", "/health/off")
        sub.proc.wait_for_line("App entered un-healthy status", 10)
        assert publish(env, "orders", {"phase": "paused"}) == 204

        def paused_seen() -> bool:
            return any(r["data"] == {"phase": "paused"} for r in env.received("orders"))

        deadline = time.monotonic() + 2.0  # nothing may arrive while the app is unhealthy
        while time.monotonic() < deadline:
            assert not paused_seen()
            time.sleep(0.1)
        call(port, "POST", "/health/on")
        sub.proc.wait_for_line("App entered healthy status", 10)
        wait_until(paused_seen, 15, "the event held while the app was unhealthy")
    finally:
        for p in reversed(procs):
            p.stop()
