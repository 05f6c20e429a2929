"""A FastAPI subscriber written with the official SDK's `DaprApp`; records what it receives."""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated, Any

import uvicorn
from dapr.ext.fastapi import DaprApp
from fastapi import Body, FastAPI, Response

PUBSUB = os.environ.get("PUBSUB_NAME", "pubsub")
Event = Annotated[dict[str, Any], Body()]
app = FastAPI()
dapr_app = DaprApp(app)
lock = threading.Lock()
received: list[dict[str, Any]] = []
attempts: dict[str, int] = {}


def record(route: str, event: dict[str, Any]) -> int:
    with lock:
        received.append(
            {
                "route": route,
                "id": event.get("id"),
                "topic": event.get("topic"),
                "data": event.get("data"),
                "type": event.get("type"),
            }
        )
        attempts[event["id"]] = attempts.get(event["id"], 0) + 1
        return attempts[event["id"]]


@dapr_app.subscribe(pubsub=PUBSUB, topic="orders")
def orders(event: Event) -> dict[str, str]:
    record("orders", event)
    return {"status": "SUCCESS"}


@dapr_app.subscribe(pubsub=PUBSUB, topic="flaky", route="/flaky")
def flaky(event: Event) -> dict[str, str]:
    n = record("flaky", event)
    return {"status": "RETRY" if n == 1 else "SUCCESS"}


@dapr_app.subscribe(pubsub=PUBSUB, topic="poison", route="/poison", dead_letter_topic="poison-dlq")
def poison(event: Event) -> dict[str, str]:
    record("poison", event)
    return {"status": "RETRY"}


@dapr_app.subscribe(pubsub=PUBSUB, topic="poison-dlq", route="/dlq")
def dlq(event: Event) -> dict[str, str]:
    record("dlq", event)
    return {"status": "SUCCESS"}


@dapr_app.subscribe(pubsub=PUBSUB, topic="load", route="/load")
def load(event: Event) -> dict[str, str]:
    record("load", event)
    return {"status": "SUCCESS"}


# Declarative subscriptions with routing rules land on these plain routes.
@app.post("/routed/v2")
def routed_v2(event: Event) -> dict[str, str]:
    record("routed-v2", event)
    return {"status": "SUCCESS"}


@app.post("/routed/default")
def routed_default(event: Event) -> dict[str, str]:
    record("routed-default", event)
    return {"status": "SUCCESS"}


batches: list[int] = []
healthy = [True]


@app.post("/bulk")
def bulk(body: Event) -> dict[str, Any]:
    """bulkSubscribe delivery: {"entries": [{"entryId", "event", ...}]} (dapr-api.md §3.7)."""
    entries = body.get("entries", [])
    with lock:
        batches.append(len(entries))
    for e in entries:
        record("bulk", e["event"])
    return {"statuses": [{"entryId": e["entryId"], "status": "SUCCESS"} for e in entries]}


@app.get("/batches")
def get_batches() -> list[int]:
    with lock:
        return list(batches)


@app.get("/healthz")
def healthz() -> Response:
    return Response(status_code=200 if healthy[0] else 503)


@app.post("/health/{state}")
def set_health(state: str) -> dict[str, bool]:
    healthy[0] = state == "on"
    return {"healthy": healthy[0]}


@app.get("/received")
def get_received() -> list[dict[str, Any]]:
    with lock:
        return list(received)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["APP_PORT"])
    print(f"subscriber listening on {port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
