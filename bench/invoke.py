"""Service invocation throughput: app direct vs two pillion sidecars vs two haproxy hops.

Everything runs on this machine in one run, so the ratios compare like with like. Prints
req/s, p50/p99 latency, CPU microseconds per request per sidecar, RSS, start-up time to
`healthz/outbound`, idle RSS, and whether the floor holds (pillion >= 0.35x haproxy).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_seconds, ensure_tools, rss_mb, wrk

from pillion.testing.procs import Proc, free_port, http_status, start_sidecar, wait_until

FLOOR = 0.35
HERE = Path(__file__).resolve().parent

HAPROXY_CFG = """
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend f
    bind 127.0.0.1:{listen}
    default_backend b
backend b
    server s1 127.0.0.1:{target}
"""


def start_app(port: int) -> Proc:
    p = Proc.start("bench app", [sys.executable, str(HERE / "app_server.py"), str(port)])
    p.wait_for_line("listening", 10)
    return p


def start_haproxy(listen: int, target: int, tmp: Path) -> subprocess.Popen[bytes]:
    cfg = tmp / f"haproxy-{listen}.cfg"
    cfg.write_text(HAPROXY_CFG.format(listen=listen, target=target))
    p = subprocess.Popen(
        ["haproxy", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(lambda: http_status(listen, "/") == 200, 10, "haproxy")
    return p


def startup_time(home: Path) -> tuple[float, float]:
    """Seconds from process start to healthz/outbound 204, and the idle RSS (MB) after."""
    port = free_port()
    t0 = time.monotonic()
    p = Proc.start(
        "startup",
        [
            sys.executable,
            "-m",
            "pillion",
            "sidecar",
            "--app-id",
            "startup",
            "--dapr-http-port",
            str(port),
            "--pillion-home",
            str(home),
            "--resources-path",
            str(home / "components"),
        ],
    )
    while http_status(port, "/v1.0/healthz/outbound", timeout=0.5) != 204:
        if time.monotonic() - t0 > 15 or p.popen.poll() is not None:
            raise RuntimeError(p.output)
        time.sleep(0.002)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    rss = rss_mb(p.popen.pid)
    p.stop()
    return elapsed, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    ensure_tools("wrk", "haproxy")
    tmp = Path(tempfile.mkdtemp(prefix="pillion-bench-"))
    home = tmp / "home"
    subprocess.run(
        [sys.executable, "-m", "pillion", "init", "--pillion-home", str(home)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )

    app_port = free_port()
    app = start_app(app_port)
    procs: list[Proc] = [app]
    haproxies: list[subprocess.Popen[bytes]] = []
    try:
        callee = start_sidecar(
            "benchapp", home=home, resources=[home / "components"], app_port=app_port, wait="ready"
        )
        caller = start_sidecar("benchcaller", home=home, resources=[home / "components"])
        procs += [callee.proc, caller.proc]
        h2 = free_port()
        h1 = free_port()
        haproxies.append(start_haproxy(h2, app_port, tmp))
        haproxies.append(start_haproxy(h1, h2, tmp))
        pillion_url = f"http://127.0.0.1:{caller.http_port}/v1.0/invoke/benchapp/method/ping"
        assert http_status(caller.http_port, "/v1.0/invoke/benchapp/method/ping") == 200

        c, s = args.connections, args.seconds
        wrk(pillion_url, connections=c, seconds=2)  # warm-up: pools, caches
        direct = wrk(f"http://127.0.0.1:{app_port}/ping", connections=c, seconds=s)
        cpu0 = (cpu_seconds(caller.proc.popen.pid), cpu_seconds(callee.proc.popen.pid))
        through = wrk(pillion_url, connections=c, seconds=s)
        cpu1 = (cpu_seconds(caller.proc.popen.pid), cpu_seconds(callee.proc.popen.pid))
        hap = wrk(f"http://127.0.0.1:{h1}/ping", connections=c, seconds=s)
        rss = (rss_mb(caller.proc.popen.pid), rss_mb(callee.proc.popen.pid))

        starts = [startup_time(home) for _ in range(3)]
        start_s = statistics.median(t for t, _ in starts)
        idle_rss = statistics.median(r for _, r in starts)

        per_req = [
            (b - a) / max(through.requests, 1) * 1e6 for a, b in zip(cpu0, cpu1, strict=True)
        ]
        print()
        print(f"service invocation, {c} connections, {s}s each (wrk)")
        print(f"{'path':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name, r in (
            ("app direct", direct),
            ("two pillion sidecars", through),
            ("two haproxy hops", hap),
        ):
            print(f"{name:34} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d}")
        print(
            f"CPU per request: caller sidecar {per_req[0]:.0f} us, "
            f"callee sidecar {per_req[1]:.0f} us"
        )
        print(f"sidecar RSS under load: caller {rss[0]:.1f} MB, callee {rss[1]:.1f} MB")
        ratio_hap = through.rps / hap.rps
        ratio_direct = through.rps / direct.rps
        print(f"ratio pillion / haproxy: {ratio_hap:.2f}x (floor {FLOOR}x)")
        print(f"ratio pillion / direct:  {ratio_direct:.2f}x")
        print(f"start-up to healthz/outbound: {start_s * 1000:.0f} ms (goal < 500 ms)")
        print(f"idle sidecar RSS: {idle_rss:.1f} MB (goal < 60 MB)")
        ok = ratio_hap >= FLOOR and through.errors == 0
        print(f"floor: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        for h in haproxies:
            h.terminate()
            h.wait(5)
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
