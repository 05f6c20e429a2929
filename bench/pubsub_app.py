"""A fast subscriber app for the pub/sub benchmark: records publish->deliver latency per event."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvloop
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from pillion.transport.http import Request, Response
from pillion.transport.server import HttpServer

JSON = [(b"content-type", b"application/json")]
latencies: list[float] = []
last = [0.0]


async def handler(req: Request) -> Response:
    if req.path == "/dapr/subscribe":
        topic = sys.argv[2]
        return Response(
            200,
            JSON,
            json.dumps([{"pubsubname": "pubsub", "topic": topic, "route": "/in"}]).encode(),
        )
    if req.path == "/in":
        now = time.time()
        ts = json.loads(req.body)["data"]["ts"]
        latencies.append(now - ts)
        last[0] = now
        return Response(200, JSON, b'{"status":"SUCCESS"}')
    if req.path == "/stats":
        return Response(
            200,
            JSON,
            json.dumps({"count": len(latencies), "last": last[0], "latencies": latencies}).encode(),
        )
    return Response(404)


async def main(port: int) -> None:
    server = HttpServer(handler)
    await server.start("127.0.0.1", port)
    print(f"bench subscriber listening on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
