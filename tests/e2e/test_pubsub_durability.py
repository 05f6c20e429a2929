"""At-least-once across crashes: 2,000 messages while the subscriber's sidecar is SIGKILLed twice.

Run on the embedded broker and on every real broker on 127.0.0.1: nothing may be lost;
duplicates are allowed (they keep the CloudEvent id) and reported.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pillion.testing.procs import Proc, free_port, start_sidecar, wait_until
from tests.conformance.conftest import delete_jetstream_streams, require_server
from tests.e2e.conftest import APPS, call

TOTAL = 2000

BROKERS: dict[str, tuple[int | None, dict[str, str]]] = {
    "pubsub.sqlite": (None, {"processingTimeout": "3s", "redeliverInterval": "1s"}),
    "pubsub.redis": (
        6379,
        {"redisHost": "127.0.0.1:6379", "processingTimeout": "3s", "redeliverInterval": "1s"},
    ),
    "pubsub.rabbitmq": (
        5672,
        {
            "connectionString": "amqp://guest:guest@127.0.0.1:5672",
            "durable": "true",
            "deletedWhenUnused": "false",
            "deliveryMode": "2",
            "requeueInFailure": "true",
            "publisherConfirm": "true",
        },
    ),
    "pubsub.mqtt3": (1883, {"url": "tcp://127.0.0.1:1883", "qos": "1", "cleanSession": "false"}),
    "pubsub.jetstream": (4222, {"natsURL": "nats://127.0.0.1:4222", "ackWait": "3s"}),
}


def _resources(d: Path, broker: str, topic: str, sub_id: str) -> None:
    _, md = BROKERS[broker]
    md = dict(md)
    if broker == "pubsub.sqlite":
        md["connectionString"] = str(d / "pubsub.db")
    items = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in md.items())
    (d / "pubsub.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: pubsub\nspec:\n"
        f"  type: {broker}\n  version: v1\n  metadata:\n{items}"
        "---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata:\n  name: load\nspec:\n"
        f"  pubsubname: pubsub\n  topic: {topic}\n  routes:\n    default: /load\n"
        f"scopes: [{sub_id}]\n"
    )


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_no_loss_across_sidecar_kills(broker: str, tmp_path: Path, home: Path) -> None:
    port_needed, _ = BROKERS[broker]
    if port_needed is not None:
        require_server(broker, "127.0.0.1", port_needed)
    run = uuid.uuid4().hex[:8]
    topic, sub_id = f"load-{run}", f"durable-{run}"
    _resources(tmp_path, broker, topic, sub_id)
    app_port = free_port()
    app = Proc.start(
        "app sub",
        [sys.executable, str(APPS / "subscriber.py"), str(app_port)],
        env={**os.environ, "PUBSUB_NAME": "pubsub"},
    )
    procs = [app]
    try:
        app.wait_for_line("listening", 20)
        sub = start_sidecar(
            sub_id, home=home, resources=[tmp_path], app_port=app_port, wait="ready", timeout=30
        )
        procs.append(sub.proc)
        pub = start_sidecar(f"publisher-{run}", home=home, resources=[tmp_path], timeout=30)
        procs.append(pub.proc)
        published = 0
        errors: list[str] = []

        def publisher() -> None:
            nonlocal published
            conn = http.client.HTTPConnection("127.0.0.1", pub.http_port, timeout=30)
            for n in range(TOTAL):
                conn.request(
                    "POST",
                    f"/v1.0/publish/pubsub/{topic}",
                    body=json.dumps({"n": n}),
                    headers={"content-type": "application/json"},
                )
                r = conn.getresponse()
                r.read()
                if r.status != 204:
                    errors.append(f"{n}: {r.status}")
                published = n + 1
                time.sleep(0.002)
            conn.close()

        t = threading.Thread(target=publisher, daemon=True)
        t.start()
        for mark in (TOTAL // 3, 2 * TOTAL // 3):
            wait_until(lambda m=mark: published >= m, 60, f"{mark} published")
            sub.proc.kill()  # SIGKILL: no drain, no clean deregistration
            sub = start_sidecar(
                sub_id, home=home, resources=[tmp_path], app_port=app_port, wait="ready", timeout=30
            )
            procs.append(sub.proc)
        t.join(120)
        assert not errors, errors[:5]

        def got() -> list[int]:
            return [
                r["data"]["n"]
                for r in call(app_port, "GET", "/received").json()
                if r["route"] == "load" and isinstance(r["data"], dict)
            ]

        wait_until(lambda: set(got()) >= set(range(TOTAL)), 90, f"all {TOTAL} messages")
        ns = got()
        dups = len(ns) - len(set(ns))
        print(f"{broker}: {TOTAL} published, {len(set(ns))} received, 0 lost, {dups} duplicates")
    finally:
        for p in reversed(procs):
            p.kill()
        if broker == "pubsub.jetstream":
            asyncio.run(delete_jetstream_streams([topic]))  # the server keeps streams for ever
