"""A test app: echoes each request as JSON; /status/<code> answers with that status."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

APP_ID = os.environ.get("APP_ID", "echo")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        if url.path.startswith("/status/"):
            code = int(url.path.split("/")[2])
            reason = q.get("reason", [None])[0]
            out = f"status {code}".encode()
            self.send_response(code, reason)
            self.send_header("content-type", "text/plain")
            self.send_header("x-echo-app", APP_ID)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)
            return
        payload = {
            "app": APP_ID,
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        out = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-echo-app", APP_ID)
        self.send_header("set-cookie", "a=1")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["APP_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"echo app {APP_ID} listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
