"""Baseline consumer for the pub/sub benchmark: redis-py Streams XREADGROUP + XACK, no sidecar."""

from __future__ import annotations

import contextlib
import json
import sys
import time

import redis.asyncio as aioredis
import uvloop


async def main(stream: str, total: int) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=6379)
    with contextlib.suppress(aioredis.ResponseError):
        await r.xgroup_create(stream, "direct", id="$", mkstream=True)
    print("direct consumer ready", flush=True)
    latencies: list[float] = []
    while len(latencies) < total:
        got = await r.xreadgroup("direct", "c1", {stream: ">"}, count=100, block=5000)
        if not got:
            break
        ids = []
        for _, entries in got:
            for mid, fields in entries:
                latencies.append(time.time() - json.loads(fields[b"data"])["ts"])
                ids.append(mid)
        await r.xack(stream, "direct", *ids)
    print(
        json.dumps({"count": len(latencies), "last": time.time(), "latencies": latencies}),
        flush=True,
    )
    await r.aclose()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
