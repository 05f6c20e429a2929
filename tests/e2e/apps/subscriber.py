"""A FastAPI subscriber written with the official SDK's `DaprApp`; records what it receives."""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated, Any

import uvicorn
from dapr.ext.fastapi import DaprApp
from fastapi import Body, FastAPI

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


@app.get("/received")
def get_received() -> list[dict[str, Any]]:
    with lock:
        return list(received)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["APP_PORT"])
    print(f"subscriber listening on {port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
