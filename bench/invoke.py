"""Service invocation throughput: app direct vs two pillion sidecars vs two haproxy hops, and
two sidecars with tracing (sampling 1, OTLP/HTTP export) and metrics on vs both off.

Everything runs on this machine in one run, so the ratios compare like with like. Prints
req/s, p50/p99 latency, CPU microseconds per request per sidecar, RSS, start-up time to
`healthz/outbound`, idle RSS, and whether the floors hold (pillion >= 0.35x haproxy; observed
>= 0.8x of plain).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, WrkResult, cpu_seconds, ensure_tools, rss_mb, wrk

from pillion.testing.procs import Proc, free_port, http_status, start_sidecar, wait_until

FLOOR = 0.35
OBSERVED_FLOOR = 0.8
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


OBSERVED_CONFIG = """
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata: {{name: observed}}
spec:
  tracing:
    samplingRate: "{rate}"
    otel: {{endpointAddress: "127.0.0.1:{sink}", protocol: http, isSecure: false}}
  metrics: {{enabled: {metrics}}}
"""
# name -> (sampling rate, metrics on): both on is the floor's variant; the others, with
# --split, tell which half costs what.
OBSERVED = {"on": ("1", "true"), "tracing only": ("1", "false"), "metrics only": ("0", "true")}


def sidecar_pair(home: Path, app_port: int, tag: str, extra: list[str]) -> tuple[list[Proc], str]:
    """Caller and callee sidecars with `extra` flags; the caller's invoke URL."""
    callee = start_sidecar(
        f"bench{tag}app",
        home=home,
        resources=[home / "components"],
        app_port=app_port,
        wait="ready",
        extra=extra,
    )
    caller = start_sidecar(
        f"bench{tag}caller", home=home, resources=[home / "components"], extra=extra
    )
    url = f"http://127.0.0.1:{caller.http_port}/v1.0/invoke/bench{tag}app/method/ping"
    assert http_status(caller.http_port, f"/v1.0/invoke/bench{tag}app/method/ping") == 200
    return [caller.proc, callee.proc], url


def observed_ratio(
    home: Path, tmp: Path, app_port: int, c: int, s: int, groups: int, split: bool
) -> tuple[float, bool]:
    """Tracing at sampling 1 + metrics vs both off, same path, in groups of adjacent rounds
    (with `split`, each of the two alone as well); the median of the groups' on/off ratios."""
    sink_port = free_port()
    sink = Proc.start("span sink", [sys.executable, str(HERE / "span_sink.py"), str(sink_port)])
    sink.wait_for_line("listening", 10)
    procs = [sink]
    try:
        plain, plain_url = sidecar_pair(home, app_port, "plain", ["--enable-metrics=false"])
        procs += plain
        urls = {"off": plain_url}
        for n, (name, (rate, metrics)) in enumerate(OBSERVED.items()):
            if name != "on" and not split:
                continue
            config = tmp / f"observed-{n}.yaml"
            config.write_text(OBSERVED_CONFIG.format(sink=sink_port, rate=rate, metrics=metrics))
            pair, urls[name] = sidecar_pair(home, app_port, f"obs{n}", ["--config", str(config)])
            procs += pair
        for url in urls.values():
            wrk(url, connections=c, seconds=2)  # warm-up: pools, caches
        runs: dict[str, list[WrkResult]] = {name: [] for name in urls}
        for i in range(groups):
            # Adjacent rounds, in the order off, on, ... then ..., on, off (ABBA): the machine's
            # speed drifts by 10-20% over tens of seconds here, and adjacent rounds share it.
            for name in urls if i % 2 == 0 else reversed(urls):
                runs[name].append(wrk(urls[name], connections=c, seconds=s))
        # The median of the groups' ratios: on two shared cores single rounds stray by up to 20%,
        # and a ratio of the two sides' medians (or bests) mixes rounds of different moments.
        ratios = {
            name: [b.rps / a.rps for a, b in zip(runs["off"], runs[name], strict=True)]
            for name in urls
            if name != "off"
        }
        errors = sum(r.errors for rs in runs.values() for r in rs)
        got = urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/", timeout=5).read().split()
        print()
        print(
            f"tracing (sampling 1, OTLP/HTTP) + metrics vs both off, {c} connections, "
            f"{groups} groups of adjacent {s} s rounds"
        )
        print("off req/s: " + ", ".join(f"{r.rps:.0f}" for r in runs["off"]))
        for name, rs in ratios.items():
            print(
                f"{name} req/s (on/off): "
                + ", ".join(f"{r.rps:.0f} ({x:.2f})" for r, x in zip(runs[name], rs, strict=True))
            )
        for name, rs in runs.items():
            label = f"two sidecars, {name}"
            print(f"{label:34} {statistics.median(r.rps for r in rs):9.0f} req/s (median)")
        print(f"spans exported: {int(got[1]) // 1024} KiB in {int(got[0])} posts")
        for name in ratios:
            if name != "on":
                print(
                    f"ratio {name} / off (median of the groups): "
                    f"{statistics.median(ratios[name]):.2f}x"
                )
        ratio = statistics.median(ratios["on"])
        print(
            f"ratio tracing+metrics on / off (median of the groups): {ratio:.2f}x "
            f"(floor {OBSERVED_FLOOR}x)"
        )
        return ratio, errors == 0 and int(got[0]) > 0
    finally:
        for p in reversed(procs):
            p.stop()


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
            "--metrics-port",
            str(free_port()),
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
    ap.add_argument(
        "--round-seconds", type=int, default=5, help="length of each on/off round (seconds)"
    )
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument(
        "--split", action="store_true", help="also tracing only and metrics only, against off"
    )
    ap.add_argument(
        "--only-observed", action="store_true", help="only the tracing+metrics on/off comparison"
    )
    ap.add_argument(
        "--groups",
        type=int,
        default=9,
        help="groups of adjacent off/on rounds (the median of their on/off ratios is compared)",
    )
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
    c, s = args.connections, args.seconds
    try:
        observed, observed_ok = observed_ratio(
            home, tmp, app_port, c, args.round_seconds, args.groups, args.split
        )
        if args.only_observed:
            ok = observed >= OBSERVED_FLOOR and observed_ok
            print(f"floor: {'OK' if ok else 'FAILED'}")
            return 0 if ok else 1
        pair, pillion_url = sidecar_pair(home, app_port, "", ["--enable-metrics=false"])
        procs += pair
        caller, callee = pair
        h2 = free_port()
        h1 = free_port()
        haproxies.append(start_haproxy(h2, app_port, tmp))
        haproxies.append(start_haproxy(h1, h2, tmp))

        wrk(pillion_url, connections=c, seconds=2)  # warm-up: pools, caches
        direct = wrk(f"http://127.0.0.1:{app_port}/ping", connections=c, seconds=s)
        cpu0 = (cpu_seconds(caller.popen.pid), cpu_seconds(callee.popen.pid))
        through = wrk(pillion_url, connections=c, seconds=s)
        cpu1 = (cpu_seconds(caller.popen.pid), cpu_seconds(callee.popen.pid))
        hap = wrk(f"http://127.0.0.1:{h1}/ping", connections=c, seconds=s)
        rss = (rss_mb(caller.popen.pid), rss_mb(callee.popen.pid))

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
        print(f"ratio tracing+metrics on / off: {observed:.2f}x (floor {OBSERVED_FLOOR}x)")
        ok = ratio_hap >= FLOOR and through.errors == 0
        ok = ok and observed >= OBSERVED_FLOOR and observed_ok
        print(f"floors: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        for h in haproxies:
            h.terminate()
            h.wait(5)
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
