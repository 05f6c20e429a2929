"""order-processor: receives orders by service invocation and keeps them in the state store."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DAPR = f"http://127.0.0.1:{os.environ.get('DAPR_HTTP_PORT', '3500')}/v1.0"
STORE = "statestore"


def state_get(key: str) -> tuple[object | None, str]:
    with urllib.request.urlopen(f"{DAPR}/state/{STORE}/{key}") as r:
        body = r.read()
        return (json.loads(body) if body else None), r.headers.get("etag", "")


def state_save(items: list[dict[str, object]]) -> None:
    req = urllib.request.Request(
        f"{DAPR}/state/{STORE}",
        data=json.dumps(items).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req).close()


def save_with_counter(counter: str, items: list[dict[str, object]]) -> None:
    """Save `items` and bump `counter`; its etag makes concurrent increments safe (409: retry).

    The first increment has no etag to give: first-write makes a concurrent creation conflict
    too, instead of both writing 1."""
    while True:
        count, etag = state_get(counter)
        item: dict[str, object] = {"key": counter, "value": (count or 0) + 1, "etag": etag}
        if not etag:
            item["options"] = {"concurrency": "first-write"}
        try:
            state_save([*items, item])
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, payload: object) -> None:
        out = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_POST(self) -> None:  # POST /orders, or a pub/sub delivery on POST /shipments
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/shipments":
            event = json.loads(body)  # a CloudEvent; the publisher's JSON is in "data"
            save_with_counter("shipped-count", [])
            print(f"order {event['data']['id']} shipped (event {event['id'][:8]})", flush=True)
            self._reply(200, {"status": "SUCCESS"})
            return
        order = json.loads(body)
        caller = self.headers.get("dapr-caller-app-id", "?")
        save_with_counter("order-count", [{"key": f"order-{order['id']}", "value": order}])
        print(f"received order {order['id']} from {caller}: {order['item']}", flush=True)
        self._reply(201, {"id": order["id"], "status": "accepted"})

    def do_GET(self) -> None:  # GET /orders/<id>, /stats, or the sidecar's /dapr/subscribe
        if self.path == "/dapr/subscribe":
            self._reply(
                200, [{"pubsubname": "pubsub", "topic": "shipments", "route": "/shipments"}]
            )
            return
        if self.path == "/stats":
            count, _ = state_get("order-count")
            shipped, _ = state_get("shipped-count")
            self._reply(200, {"orders": count or 0, "shipped": shipped or 0})
            return
        order, _ = state_get(f"order-{self.path.rsplit('/', 1)[-1]}")
        self._reply(200 if order else 404, order or {"error": "no such order"})


if __name__ == "__main__":
    port = int(os.environ["APP_PORT"])
    print(f"order-processor listening on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
