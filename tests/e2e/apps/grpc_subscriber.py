"""A gRPC pub/sub subscriber written with the official SDK's `dapr.ext.grpc.App`.

Usage: grpc_subscriber.py PORT; every event a handler sees is appended as one JSON line to the
file named by the EVENTS_FILE environment variable.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from dapr.ext.grpc import App, Rule, SubscriptionMessage, TopicEventResponse
from dapr.ext.grpc._servicer import _CallbackServicer
from dapr.proto.runtime.v1 import appcallback_pb2

_lock = threading.Lock()  # the SDK's server runs handlers on a thread pool
_attempts: dict[str, int] = {}


def write(row: dict[str, Any]) -> None:
    with _lock, open(os.environ["EVENTS_FILE"], "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# Each OnBulkTopicEvent call is also written down (as {"batch": ...}) before the SDK handles it,
# so the test can tell bulk deliveries from single ones. Patched before App() registers it.
_sdk_bulk = _CallbackServicer.OnBulkTopicEvent


def _bulk_seen(self: _CallbackServicer, request: Any, context: Any) -> Any:
    write({"batch": len(request.entries), "topic": request.topic, "type": request.type})
    return _sdk_bulk(self, request, context)


_CallbackServicer.OnBulkTopicEvent = _bulk_seen  # type: ignore[method-assign]

app = App()


def record(handler: str, event: SubscriptionMessage) -> int:
    """Append the event to EVENTS_FILE; the how-many-th time this handler saw this event id."""
    row: dict[str, Any] = {
        "handler": handler,
        "id": event.id(),
        "type": event.type(),
        "source": event.source(),
        "topic": event.topic(),
        "pubsub": event.pubsub_name(),
        "content_type": event.data_content_type(),
        "data": event.raw_data().decode("utf-8", "replace"),
        "extensions": event.extensions(),
        "metadata": {k: v for k, v in event.metadata().items() if isinstance(v, str)},
    }
    with _lock:
        key = f"{handler}/{event.id()}"
        _attempts[key] = row["attempt"] = _attempts.get(key, 0) + 1
    write(row)
    return int(row["attempt"])


@app.subscribe(pubsub_name="pubsub", topic="orders")
def orders(event: SubscriptionMessage) -> None:
    record("orders", event)


@app.subscribe(pubsub_name="pubsub", topic="routed", rule=Rule('event.type == "x"', 1))
def routed_x(event: SubscriptionMessage) -> None:
    record("routed_x", event)


@app.subscribe(pubsub_name="pubsub", topic="routed", rule=Rule('event.type == "y"', 2))
def routed_y(event: SubscriptionMessage) -> None:
    record("routed_y", event)


@app.subscribe(pubsub_name="pubsub", topic="flaky")
def flaky(event: SubscriptionMessage) -> TopicEventResponse:
    """RETRY the first time an event id is seen, SUCCESS after."""
    first = record("flaky", event) == 1
    return TopicEventResponse("retry" if first else "success")


@app.subscribe(pubsub_name="pubsub", topic="poison", dead_letter_topic="poison-dlq")
def poison(event: SubscriptionMessage) -> TopicEventResponse:
    record("poison", event)
    return TopicEventResponse("retry")


@app.subscribe(pubsub_name="pubsub", topic="poison-dlq")
def poison_dlq(event: SubscriptionMessage) -> None:
    record("poison_dlq", event)


@app.subscribe(pubsub_name="pubsub", topic="bulk")
def bulk(event: SubscriptionMessage) -> None:
    record("bulk", event)


# App.subscribe has no bulkSubscribe option; ListTopicSubscriptions carries it, so set it on the
# subscription the SDK registered. Its OnBulkTopicEvent then calls `bulk` once per entry.
for _sub in app._servicer._registered_topics:
    if _sub.topic == "bulk":
        _sub.bulk_subscribe.CopyFrom(
            appcallback_pb2.BulkSubscribeConfig(
                enabled=True, max_messages_count=10, max_await_duration_ms=300
            )
        )


if __name__ == "__main__":
    port = int(sys.argv[1])
    print(f"grpc subscriber listening on {port}", flush=True)
    app.run(port, "127.0.0.1")
