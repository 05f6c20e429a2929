"""Pub/sub end to end: publish over HTTP and gRPC, a DaprApp subscriber, routing, retries, DLQ."""

from __future__ import annotations

import json
import os
import sys
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
