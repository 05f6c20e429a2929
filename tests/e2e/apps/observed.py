"""A test app for tracing, metrics and resiliency: call chains, flaky and slow routes, events.

- /hop?next=b,c  calls the next app through its sidecar, passing on the traceparent it got (as an
  OpenTelemetry-instrumented app does); answers what each hop received.
- /flaky/<key>?fail=N&sleep=S  counts calls per key; the first N answer 500; each sleeps S s.
- /count/<key>  the number of calls /flaky/<key> (and events on /events/<key>) has seen.
- /dapr/subscribe: topic "traced" -> /events/traced, topic "flaky" -> /events/flaky.
- /events/<key>  records each event with its headers; /events/flaky answers 500 to the first
  FLAKY_EVENTS (env) deliveries of each event id.
- /seen/<key>  the events recorded on /events/<key>.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

APP_ID = os.environ.get("APP_ID", "observed")
DAPR_PORT = int(os.environ.get("DAPR_HTTP_PORT", "3500"))
FLAKY_EVENTS = int(os.environ.get("FLAKY_EVENTS", "0"))
PUBSUB = os.environ.get("PUBSUB_NAME", "pubsub")

_lock = threading.Lock()
_counts: dict[str, int] = {}
_seen: dict[str, list[dict[str, Any]]] = {}


def _bump(key: str) -> int:
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        return _counts[key]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any) -> None:
        out = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        headers = {k.lower(): v for k, v in self.headers.items()}
        if parts[0] == "hop":
            self._hop(q.get("next", [""])[0], headers)
        elif parts[0] == "flaky" and len(parts) == 2:
            n = _bump(parts[1])
            sleep = float(q.get("sleep", ["0"])[0])
            if sleep:
                time.sleep(sleep)
            fail = int(q.get("fail", ["0"])[0])
            self._send(500 if n <= fail else 200, {"app": APP_ID, "call": n})
        elif parts[0] == "count" and len(parts) == 2:
            with _lock:
                self._send(200, {"count": _counts.get(parts[1], 0)})
        elif url.path == "/dapr/subscribe":
            self._send(
                200,
                [
                    {"pubsubname": PUBSUB, "topic": "traced", "route": "/events/traced"},
                    {"pubsubname": PUBSUB, "topic": "flaky", "route": "/events/flaky"},
                ],
            )
        elif parts[0] == "events" and len(parts) == 2:
            event = json.loads(body or b"{}")
            key = parts[1]
            n = _bump(f"{key}:{event.get('id', '')}")
            _bump(key)
            with _lock:
                _seen.setdefault(key, []).append({"event": event, "headers": headers})
            failing = key == "flaky" and n <= FLAKY_EVENTS
            self._send(500 if failing else 200, {"status": "RETRY" if failing else "SUCCESS"})
        elif parts[0] == "seen" and len(parts) == 2:
            with _lock:
                self._send(200, _seen.get(parts[1], []))
        else:
            self._send(404, {"error": f"no route {url.path}"})

    def _hop(self, chain: str, headers: dict[str, str]) -> None:
        got = {"app": APP_ID, "traceparent": headers.get("traceparent", "")}
        hops = [h for h in chain.split(",") if h]
        if not hops:
            self._send(200, [got])
            return
        fwd = {"traceparent": got["traceparent"]} if got["traceparent"] else {}
        conn = http.client.HTTPConnection("127.0.0.1", DAPR_PORT, timeout=15)
        conn.request(
            "GET", f"/v1.0/invoke/{hops[0]}/method/hop?next={','.join(hops[1:])}", headers=fwd
        )
        r = conn.getresponse()
        rest = json.loads(r.read())
        conn.close()
        self._send(r.status, [got, *rest])

    def do_OPTIONS(self) -> None:  # the sidecar's probe for input bindings: routes accept
        self._send(200, {})

    do_GET = do_POST = do_PUT = do_DELETE = _handle


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["APP_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"{APP_ID} listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
