"""Pub/sub publish -> deliver throughput and latency: pillion (sqlite, redis) vs direct Redis.

Each run publishes N messages with 16 concurrent publishers and measures, at the subscriber, the
time from the first publish to the last delivery and each message's publish->deliver latency.
Baseline, measured in the same run: a redis-py producer (XADD) and a separate consumer process
(XREADGROUP + XACK) with no sidecar. Floor: pillion on Redis >= 0.3x of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uvloop
from common import ROOT  # noqa: F401

from pillion.testing.procs import Proc, free_port, start_sidecar
from pillion.transport.client import HttpClient

FLOOR = 0.3
HERE = Path(__file__).resolve().parent
CONCURRENCY = 16

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: {type}
  version: v1
  metadata:
{items}"""


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else float("nan")


def _report(name: str, count: int, t0: float, last: float, lat: list[float]) -> float:
    rate = count / max(last - t0, 1e-9)
    print(f"{name:28} {rate:9.0f} {_pct(lat, 0.5):9.2f} {_pct(lat, 0.99):9.2f} {count:7d}")
    return rate


async def _publish_http(port: int, topic: str, total: int) -> float:
    client = HttpClient()
    sent = 0
    t0 = time.time()

    async def worker() -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            body = json.dumps({"ts": time.time()}).encode()
            r = await client.request(
                "127.0.0.1",
                port,
                "POST",
                f"/v1.0/publish/pubsub/{topic}".encode(),
                [(b"content-type", b"application/json")],
                body,
            )
            if r.status != 204:
                raise RuntimeError(f"publish failed: {r.status} {r.body!r}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await client.close()
    return t0


def run_pillion(kind: str, items: dict[str, str], home: Path, tmp: Path, total: int) -> float:
    res = tmp / kind
    res.mkdir()
    lines = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in items.items())
    (res / "pubsub.yaml").write_text(COMPONENT.format(type=kind, items=lines))
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    app = Proc.start("bench sub", [sys.executable, str(HERE / "pubsub_app.py"), str(port), topic])
    procs = [app]
    try:
        app.wait_for_line("listening", 10)
        sub = start_sidecar(f"sub-{topic}", home=home, resources=[res], app_port=port, wait="ready")
        pub = start_sidecar(f"pub-{topic}", home=home, resources=[res])
        procs += [sub.proc, pub.proc]
        t0 = uvloop.run(_publish_http(pub.http_port, topic, total))
        deadline = time.time() + 120
        stats: dict[str, object] = {}
        while time.time() < deadline:
            import http.client

            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/stats")
            stats = json.loads(c.getresponse().read())
            c.close()
            if int(stats["count"]) >= total:  # type: ignore[call-overload]
                break
            time.sleep(0.2)
        lat = list(stats["latencies"])  # type: ignore[call-overload]
        return _report(f"pillion {kind}", len(lat), t0, float(stats["last"]), lat)  # type: ignore[arg-type]
    finally:
        for p in reversed(procs):
            p.stop()


async def _produce_direct(stream: str, total: int) -> float:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host="127.0.0.1", port=6379)
    sent = 0
    t0 = time.time()

    async def worker() -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            await r.xadd(stream, {"data": json.dumps({"ts": time.time()})})

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await r.aclose()
    return t0


def run_direct(total: int) -> float:
    stream = f"bench-direct-{uuid.uuid4().hex[:8]}"
    consumer = subprocess.Popen(
        [sys.executable, str(HERE / "redis_direct.py"), stream, str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert consumer.stdout is not None
    consumer.stdout.readline()  # ready
    t0 = uvloop.run(_produce_direct(stream, total))
    out = json.loads(consumer.stdout.readline())
    consumer.wait(30)
    subprocess.run(["redis-cli", "DEL", stream], capture_output=True, check=False)
    return _report("direct redis-py Streams", out["count"], t0, out["last"], out["latencies"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=5000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pillion-bench-ps-"))
    home = tmp / "home"
    subprocess.run(
        [sys.executable, "-m", "pillion", "init", "--pillion-home", str(home)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    n = args.messages
    print(f"publish -> deliver, {n} messages, {CONCURRENCY} concurrent publishers")
    print(f"{'path':28} {'msgs/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'count':>7}")
    direct = run_direct(n)
    sqlite = run_pillion("pubsub.sqlite", {"connectionString": str(tmp / "ps.db")}, home, tmp, n)
    redis_rate = run_pillion("pubsub.redis", {"redisHost": "127.0.0.1:6379"}, home, tmp, n)
    ratio = redis_rate / direct
    print(f"ratio pillion redis / direct redis: {ratio:.2f}x (floor {FLOOR}x)")
    print(f"ratio pillion sqlite / direct redis: {sqlite / direct:.2f}x")
    ok = ratio >= FLOOR
    print(f"floor: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
