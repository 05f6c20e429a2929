"""The transactional outbox end to end: state.sqlite + pubsub.sqlite, a DaprApp subscriber."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
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
    value: "{dir}/pubsub.db"
  - name: redeliverInterval
    value: 1s
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: statestore
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    value: "{dir}/state.db"
  - name: outboxPublishPubsub
    value: pubsub
  - name: outboxPublishTopic
    value: orders
"""


@pytest.fixture(scope="module")
def outbox(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[tuple[Sidecar, int]]:
    res = tmp_path_factory.mktemp("outbox-resources")
    (res / "components.yaml").write_text(RESOURCES.format(dir=res))
    port = free_port()
    app = Proc.start(
        "app outbox",
        [sys.executable, str(APPS / "subscriber.py"), str(port)],
        env={**os.environ, "PUBSUB_NAME": "pubsub"},
    )
    app.wait_for_line("listening", 20)
    sc = start_sidecar("outbox", home=home, resources=[res], app_port=port, wait="ready")
    yield sc, port
    for p in (sc.proc, app):
        p.stop()


def received(port: int) -> list[dict[str, Any]]:
    return [r for r in call(port, "GET", "/received").json() if r["route"] == "orders"]


def transaction(sc: Sidecar, ops: list[dict[str, Any]]) -> int:
    return call(
        sc.http_port,
        "POST",
        "/v1.0/state/statestore/transaction",
        body=json.dumps({"operations": ops}),
        headers={"content-type": "application/json"},
    ).status


def test_committed_transaction_publishes_the_value(outbox: tuple[Sidecar, int]) -> None:
    sc, port = outbox
    ops = [{"operation": "upsert", "request": {"key": "order-1", "value": {"id": 1, "q": 2}}}]
    assert transaction(sc, ops) == 204
    wait_until(lambda: any(r["data"] == {"id": 1, "q": 2} for r in received(port)), 15, "event")
    ev = next(r for r in received(port) if r["data"] == {"id": 1, "q": 2})
    assert ev["topic"] == "orders" and ev["type"] == "com.dapr.event.sent"


def test_failed_transaction_publishes_nothing(outbox: tuple[Sidecar, int]) -> None:
    sc, port = outbox
    ops = [
        {"operation": "upsert", "request": {"key": "order-2", "value": {"id": 2}}},
        {"operation": "upsert", "request": {"key": "order-3", "value": {"id": 3}, "etag": "bad"}},
    ]
    assert transaction(sc, ops) == 500
    # A later committed transaction is delivered; the failed one's events never are.
    ok = [{"operation": "upsert", "request": {"key": "order-4", "value": {"id": 4}}}]
    assert transaction(sc, ok) == 204
    wait_until(lambda: any(r["data"] == {"id": 4} for r in received(port)), 15, "event 4")
    time.sleep(1.0)
    datas = [r["data"] for r in received(port)]
    assert {"id": 2} not in datas and {"id": 3} not in datas
    assert call(sc.http_port, "GET", "/v1.0/state/statestore/order-2").status == 204
