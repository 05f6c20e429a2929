"""Pub/sub end to end over gRPC: an SDK App subscriber, SDK publishing, streaming subscriptions."""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dapr.clients import DaprClient
from dapr.clients.grpc._response import TopicEventResponse
from dapr.clients.grpc.subscription import Subscription
from dapr.common.pubsub.subscription import SubscriptionMessage

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
"""


@dataclass
class GrpcPubSub:
    pub: Sidecar  # no app: the SDK client's sidecar
    sub: Sidecar  # --app-protocol grpc, in front of apps/grpc_subscriber.py
    events_file: Path
    procs: list[Proc]

    def rows(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        lines = self.events_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def received(self, handler: str) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r.get("handler") == handler]

    def batches(self, topic: str) -> list[int]:
        return [r["batch"] for r in self.rows() if "batch" in r and r["topic"] == topic]


@pytest.fixture(scope="module")
def gps(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[GrpcPubSub]:
    res = tmp_path_factory.mktemp("gps-resources")
    (res / "pubsub.yaml").write_text(RESOURCES.format(db=res / "pubsub.db"))
    events = res / "events.jsonl"
    port = free_port()
    app = Proc.start(
        "app gsub",
        [sys.executable, "-W", "ignore", str(APPS / "grpc_subscriber.py"), str(port)],
        env={**os.environ, "EVENTS_FILE": str(events)},
    )
    procs = [app]
    try:
        app.wait_for_line("listening", 15)
        sub = start_sidecar(
            "gsub",
            home=home,
            resources=[res],
            app_port=port,
            extra=["--app-protocol", "grpc"],
            wait="ready",
            timeout=30,
        )
        procs.append(sub.proc)
        pub = start_sidecar("gpub", home=home, resources=[res])
        procs.append(pub.proc)
        yield GrpcPubSub(pub, sub, events, procs)
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the processes' output when the test failed (conftest does this only for `pair`)."""
    failed = request.session.testsfailed
    yield
    env = request.node.funcargs.get("gps")
    if request.session.testsfailed == failed or not isinstance(env, GrpcPubSub):
        return
    capman = request.config.pluginmanager.getplugin("capturemanager")
    text = "".join(f"\n----- output of {p.name} -----\n{p.output[-6000:]}\n" for p in env.procs)
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(text)


@pytest.fixture
def client(gps: GrpcPubSub, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(gps.pub.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(gps.pub.grpc_port))
    with DaprClient() as d:
        yield d


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as p:
        yield p


def receive(
    pool: concurrent.futures.ThreadPoolExecutor, sub: Subscription, timeout: float = 10
) -> SubscriptionMessage:
    """The next streamed message; the SDK's own read has no timeout."""
    msg: SubscriptionMessage = pool.submit(sub.next_message).result(timeout)
    return msg


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def wait_for_rows(
    what: str, find: Callable[[], list[dict[str, Any]]], n: int = 1, timeout: float = 10
) -> list[dict[str, Any]]:
    wait_until(lambda: len(find()) >= n, timeout, what)
    return find()


# --- the gRPC app (OnTopicEvent / OnBulkTopicEvent) ----------------------------------------------


def test_sdk_publish_reaches_the_grpc_app(gps: GrpcPubSub, client: DaprClient) -> None:
    marker = unique("order")
    client.publish_event(
        "pubsub", "orders", json.dumps({"marker": marker}), data_content_type="application/json"
    )
    (ev,) = wait_for_rows(
        "the order at the gRPC app",
        lambda: [r for r in gps.received("orders") if marker in r["data"]],
    )
    assert json.loads(ev["data"]) == {"marker": marker}
    assert (ev["type"], ev["source"], ev["content_type"]) == (
        "com.dapr.event.sent",
        "gpub",  # the publisher's app id
        "application/json",
    )
    assert (ev["topic"], ev["pubsub"]) == ("orders", "pubsub")
    assert len(ev["id"]) >= 32
    ext = ev["extensions"]
    assert (ext["topic"], ext["pubsubname"]) == ("orders", "pubsub")
    assert "time" in ext and not {"id", "data", "type", "source"} & set(ext)
    assert ev["metadata"]["pubsubname"] == "pubsub"


def test_routing_rules_pick_the_handler(gps: GrpcPubSub, client: DaprClient) -> None:
    marker = unique("route")
    for t in ("x", "y", "z"):
        client.publish_event(
            "pubsub", "routed", f"{marker}-{t}", publish_metadata={"cloudevent.type": t}
        )
    x = wait_for_rows(
        "the x event", lambda: [r for r in gps.received("routed_x") if marker in r["data"]]
    )
    y = wait_for_rows(
        "the y event", lambda: [r for r in gps.received("routed_y") if marker in r["data"]]
    )
    assert [(r["data"], r["type"]) for r in x] == [(f"{marker}-x", "x")]
    assert [(r["data"], r["type"]) for r in y] == [(f"{marker}-y", "y")]
    # "z" matches no rule and there is no default route: dropped, never delivered.
    time.sleep(0.3)
    assert not [r for r in gps.rows() if r.get("data") == f"{marker}-z"]


def test_retry_then_success(gps: GrpcPubSub, client: DaprClient) -> None:
    marker = unique("flaky")
    client.publish_event("pubsub", "flaky", marker)
    rows = wait_for_rows(
        "the redelivered event",
        lambda: [r for r in gps.received("flaky") if r["data"] == marker],
        2,
    )
    assert [r["attempt"] for r in rows] == [1, 2]
    assert rows[0]["id"] == rows[1]["id"]
    time.sleep(0.3)  # the SUCCESS stuck: no third delivery
    assert len([r for r in gps.received("flaky") if r["data"] == marker]) == 2


def test_dead_letter_topic(gps: GrpcPubSub, client: DaprClient) -> None:
    marker = unique("poison")
    client.publish_event("pubsub", "poison", marker)
    (dead,) = wait_for_rows(
        "the dead-lettered event",
        lambda: [r for r in gps.received("poison_dlq") if r["data"] == marker],
        timeout=15,
    )
    tries = [r for r in gps.received("poison") if r["data"] == marker]
    # No resiliency policy: one attempt, then the dead-letter topic (as daprd does).
    assert len(tries) == 1
    assert dead["id"] == tries[0]["id"]
    # The envelope keeps its original topic; the app is told the subscription's.
    assert dead["extensions"]["topic"] == "poison"
    assert dead["topic"] == "poison-dlq"


def test_bulk_subscription_uses_on_bulk_topic_event(gps: GrpcPubSub, client: DaprClient) -> None:
    marker = unique("bulk")
    for i in range(6):
        client.publish_event("pubsub", "bulk", f"{marker}-{i}")
    rows = wait_for_rows(
        "the bulk-delivered events",
        lambda: [r for r in gps.received("bulk") if r["data"].startswith(marker)],
        6,
    )
    assert sorted(r["data"] for r in rows) == [f"{marker}-{i}" for i in range(6)]
    batches = gps.batches("bulk")
    assert sum(batches) >= 6 and max(batches) > 1, batches  # several events per call
    assert {r["type"] for r in gps.rows() if "batch" in r} == {"com.dapr.event.sent.bulk"}
    # Entries carry the message metadata (the SDK merges it into the event's).
    assert all(r["metadata"].get("pubsubName") == "pubsub" for r in rows)


def test_metadata_lists_the_grpc_apps_subscriptions(gps: GrpcPubSub) -> None:
    md = call(gps.sub.http_port, "GET", "/v1.0/metadata").json()
    subs = {s["topic"]: s for s in md["subscriptions"]}
    assert set(subs) >= {"orders", "routed", "flaky", "poison", "poison-dlq", "bulk"}
    assert {subs[t]["type"] for t in subs} == {"PROGRAMMATIC"}
    assert all(subs[t]["pubsubname"] == "pubsub" for t in subs)
    assert subs["routed"]["rules"] == [
        {"match": 'event.type == "x"', "path": "routed_x"},
        {"match": 'event.type == "y"', "path": "routed_y"},
    ]
    assert subs["poison"]["deadLetterTopic"] == "poison-dlq"


# --- streaming subscriptions through the publisher's sidecar -------------------------------------


def test_streaming_subscription(
    gps: GrpcPubSub, client: DaprClient, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    topic = unique("stream")
    sub = client.subscribe(pubsub_name="pubsub", topic=topic)
    try:
        md = call(gps.pub.http_port, "GET", "/v1.0/metadata").json()
        assert {"pubsubname": "pubsub", "topic": topic, "type": "STREAMING"}.items() <= next(
            s for s in md["subscriptions"] if s["topic"] == topic
        ).items()
        for i in range(3):
            client.publish_event(
                "pubsub", topic, json.dumps({"n": i}), data_content_type="application/json"
            )
        got = [receive(pool, sub) for _ in range(3)]
        assert sorted(m.data()["n"] for m in got) == [0, 1, 2]
        assert {(m.topic(), m.pubsub_name(), m.source()) for m in got} == {
            (topic, "pubsub", "gpub")
        }
        for m in got:
            sub.respond_success(m)

        client.publish_event("pubsub", topic, "again")
        first = receive(pool, sub)
        sub.respond_retry(first)
        second = receive(pool, sub)  # redelivered: same event
        assert (second.id(), second.data()) == (first.id(), "again")
        sub.respond_success(second)
    finally:
        sub.close()
    wait_until(
        lambda: (
            topic
            not in {
                s["topic"]
                for s in call(gps.pub.http_port, "GET", "/v1.0/metadata")
                .json()
                .get("subscriptions", [])
            }
        ),
        10,
        "the streaming subscription to go away",
    )


def test_streaming_subscribe_with_handler(gps: GrpcPubSub, client: DaprClient) -> None:
    topic = unique("handled")
    seen: list[Any] = []
    lock = threading.Lock()

    def handler(msg: SubscriptionMessage) -> TopicEventResponse:
        with lock:
            seen.append(msg.data())
        return TopicEventResponse("success")

    close = client.subscribe_with_handler("pubsub", topic, handler)
    try:
        for i in range(3):
            client.publish_event("pubsub", topic, f"h{i}")
        wait_until(lambda: len(seen) >= 3, 10, "the handler's events")
    finally:
        close()
    assert sorted(seen) == ["h0", "h1", "h2"]
