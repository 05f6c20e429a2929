"""State throughput: GET and SAVE through a sidecar (HTTP, gRPC GetState) next to direct drivers.

One run measures, for `state.sqlite`, `state.redis` and `state.postgresql`: wrk against
`GET /v1.0/state/{store}/{key}` and `POST /v1.0/state/{store}` (16 connections), gRPC GetState
(the grpc bench's load generator), and the same operations done directly with the driver from
this process (16 concurrent callers). Floors (the real-backends issue): sqlite >= 5k saves/s and
>= 8k gets/s over HTTP; redis >= 0.25x of direct redis-py.
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
from common import ROOT, ensure_tools, wrk

from pillion.testing.procs import start_sidecar

HERE = Path(__file__).resolve().parent
CONC = 16
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"
SAVE_LUA = """
counter = 0
request = function()
  counter = counter + 1
  local body = '[{"key":"k' .. (counter % 1000) .. '","value":{"n":' .. counter .. '}}]'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


def component(name: str, kind: str, md: dict[str, str]) -> str:
    items = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in md.items())
    return (
        f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\n"
        f"spec:\n  type: {kind}\n  version: v1\n  metadata:\n{items}"
    )


async def _direct(op: object, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            await op(i, n)  # type: ignore[operator]
            n += 1
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(CONC)))
    return done / (time.monotonic() - t0)


def direct_redis(seconds: float) -> tuple[float, float]:
    import redis.asyncio as aioredis

    async def run() -> tuple[float, float]:
        r = aioredis.Redis(host="127.0.0.1", port=6379, db=11)
        await r.set("bench-k", json.dumps({"n": 1}))

        async def get(i: int, n: int) -> None:
            await r.get("bench-k")

        async def save(i: int, n: int) -> None:
            await r.set(f"bench-k{(i * 1000 + n) % 1000}", json.dumps({"n": n}))

        g = await _direct(get, seconds)
        s = await _direct(save, seconds)
        await r.flushdb()
        await r.aclose()
        return g, s

    return uvloop.run(run())


def direct_pg(seconds: float, table: str) -> tuple[float, float]:
    import psycopg_pool

    async def run() -> tuple[float, float]:
        pool = psycopg_pool.AsyncConnectionPool(PG, min_size=CONC, max_size=CONC, open=False)
        await pool.open()
        async with pool.connection() as c:
            await c.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, value jsonb)"
            )
            await c.execute(f"INSERT INTO {table} VALUES ('k', '{{}}') ON CONFLICT DO NOTHING")

        async def get(i: int, n: int) -> None:
            async with pool.connection() as c:
                await c.execute(f"SELECT value FROM {table} WHERE key = 'k'")

        async def save(i: int, n: int) -> None:
            async with pool.connection() as c:
                await c.execute(
                    f"INSERT INTO {table} VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value",
                    (f"k{(i * 1000 + n) % 1000}", json.dumps({"n": n})),
                )

        g = await _direct(get, seconds)
        s = await _direct(save, seconds)
        async with pool.connection() as c:
            await c.execute(f"DROP TABLE {table}")
        await pool.close()
        return g, s

    return uvloop.run(run())


def direct_sqlite(seconds: float, path: Path) -> tuple[float, float]:
    """Get and upsert+commit with sqlite3 in this process (WAL), one call at a time."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS s (key TEXT PRIMARY KEY, value BLOB)")
    db.execute("INSERT OR REPLACE INTO s VALUES ('k', '{}')")
    rates = []
    for op in ("get", "save"):
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if op == "get":
                db.execute("SELECT value FROM s WHERE key = 'k'").fetchone()
            else:
                db.execute("INSERT OR REPLACE INTO s VALUES (?, ?)", (f"k{n % 1000}", b"{}"))
            n += 1
        rates.append(n / (time.monotonic() - t0))
    db.close()
    return rates[0], rates[1]


def grpc_state(port: int, store: str, seconds: int, mode: str = "getstate") -> float:
    argv = [
        sys.executable,
        "-P",
        str(HERE / "grpc_app.py"),
        "load",
        "--target",
        f"127.0.0.1:{port}",
        "--mode",
        mode,
        "--store",
        store,
        "--key",
        "bench-key",
        "--seconds",
        str(seconds),
        "--expect",
        '{"hello":"world"}',
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"gRPC load failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    line = lines[0]
    return float(json.loads(line[7:])["rate"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    ensure_tools("wrk")
    s = args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="pillion-bench-state-"))
    run = uuid.uuid4().hex[:8]
    res = tmp / "res"
    res.mkdir()
    (res / "stores.yaml").write_text(
        "---\n".join(
            [
                component("sqlite", "state.sqlite", {"connectionString": str(tmp / "state.db")}),
                component("redis", "state.redis", {"redisHost": "127.0.0.1:6379", "redisDB": "10"}),
                component(
                    "pg",
                    "state.postgresql",
                    {
                        "connectionString": PG,
                        "tableName": f"bench_state_{run}",
                        "metadataTableName": f"bench_state_md_{run}",
                    },
                ),
            ]
        )
    )
    (tmp / "save.lua").write_text(SAVE_LUA)
    sc = start_sidecar(f"bench-state-{run}", home=tmp / "home", resources=[res], timeout=30)
    rows: dict[str, dict[str, float]] = {}
    try:
        for store in ("sqlite", "redis", "pg"):
            base = f"http://127.0.0.1:{sc.http_port}/v1.0/state/{store}"
            subprocess.run(
                [
                    "curl",
                    "-s",
                    "-X",
                    "POST",
                    base,
                    "-H",
                    "content-type: application/json",
                    "-d",
                    '[{"key":"bench-key","value":{"hello":"world"}}]',
                ],
                check=True,
            )
            get = wrk(f"{base}/bench-key", connections=CONC, seconds=s)
            save_out = subprocess.run(
                ["wrk", "-t2", f"-c{CONC}", f"-d{s}s", "-s", str(tmp / "save.lua"), base],
                capture_output=True,
                text=True,
                timeout=s + 30,
            ).stdout
            save_rate = float(save_out.split("Requests/sec:")[1].split()[0])
            rows[store] = {
                "http_get": get.rps,
                "http_save": save_rate,
                "grpc_get": grpc_state(sc.grpc_port, store, s),
                "grpc_save": grpc_state(sc.grpc_port, store, s, "savestate"),
            }
    finally:
        sc.proc.stop()
    sg, ss = direct_sqlite(s, tmp / "direct.db")
    rows["sqlite"].update(direct_get=sg, direct_save=ss)
    rg, rs = direct_redis(s)
    pg_g, pg_s = direct_pg(s, f"bench_direct_{run}")
    rows["redis"].update(direct_get=rg, direct_save=rs)
    rows["pg"].update(direct_get=pg_g, direct_save=pg_s)
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-q",
            "-c",
            f"DROP TABLE IF EXISTS bench_state_{run}; DROP TABLE IF EXISTS bench_state_md_{run}",
        ],
        check=False,
        capture_output=True,
    )
    print(f"\nstate throughput (ops/s), {CONC} concurrent, {s}s each")
    print(
        f"{'store':8} {'HTTP GET':>10} {'HTTP SAVE':>10} {'gRPC GET':>10} {'gRPC SAVE':>10} "
        f"{'direct GET':>11} {'direct SAVE':>12}"
    )
    for store, r in rows.items():
        print(
            f"{store:8} {r['http_get']:10.0f} {r['http_save']:10.0f} {r['grpc_get']:10.0f} "
            f"{r['grpc_save']:10.0f} {r.get('direct_get', float('nan')):11.0f} "
            f"{r.get('direct_save', float('nan')):12.0f}"
        )
    sq, rd = rows["sqlite"], rows["redis"]
    ratio_get = rd["http_get"] / rd["direct_get"]
    ratio_save = rd["http_save"] / rd["direct_save"]
    print(
        f"redis via sidecar / direct redis-py: GET {ratio_get:.2f}x, SAVE {ratio_save:.2f}x "
        "(floor 0.25x)"
    )
    ok = sq["http_save"] >= 5000 and sq["http_get"] >= 8000 and min(ratio_get, ratio_save) >= 0.25
    print(
        f"sqlite over HTTP: {sq['http_save']:.0f} saves/s (floor 5000), {sq['http_get']:.0f} "
        "gets/s (floor 8000)"
    )
    print(f"floor: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    _ = ROOT
    sys.exit(main())
