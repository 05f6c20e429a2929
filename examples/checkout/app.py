"""checkout: places orders with order-processor by app id, using the official Dapr SDK."""

from __future__ import annotations

import json
import time

from dapr.clients import DaprClient

ITEMS = ["book", "lamp", "kettle", "chair", "plant"]

with DaprClient() as client:
    for i, item in enumerate(ITEMS, start=1):
        order = {"id": i, "item": item}
        resp = client.invoke_method(
            "order-processor",
            "orders",
            data=json.dumps(order),
            http_verb="POST",
            content_type="application/json",
        )
        print(f"placed order {i} ({item}): {resp.status_code} {resp.json()['status']}", flush=True)
    back = client.invoke_method("order-processor", "orders/3", data=b"", http_verb="GET").json()
    print(f"order 3 read back from state: {back['item']}", flush=True)
    stats = client.invoke_method("order-processor", "stats", data=b"", http_verb="GET").json()
    print(f"order-processor has {stats['orders']} orders in its state store", flush=True)
    # Pub/sub: one event per order on the embedded broker; order-processor subscribes.
    for i in range(1, len(ITEMS) + 1):
        client.publish_event(
            "pubsub", "shipments", json.dumps({"id": i}), data_content_type="application/json"
        )
    print(f"published {len(ITEMS)} shipment events", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shipped = client.invoke_method("order-processor", "stats", data=b"", http_verb="GET")
        if shipped.json()["shipped"] >= len(ITEMS):
            break
        time.sleep(0.1)
    print(f"order-processor received {shipped.json()['shipped']} shipment events", flush=True)
