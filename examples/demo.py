"""`make demo`: two apps under `pillion run` on the embedded default; checks and summarises."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stream(name: str, proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def main() -> int:
    env = dict(os.environ)
    # A fresh home per run, so the summary's counts are this run's.
    env.setdefault("PILLION_HOME", tempfile.mkdtemp(prefix="pillion-demo-"))
    print(
        f"pillion demo: home {env['PILLION_HOME']} "
        "(embedded default: SQLite state, pub/sub and locks, local registry)"
    )
    subprocess.run([PY, "-m", "pillion", "init"], env=env, check=True)

    server_lines: list[str] = []
    server = subprocess.Popen(
        [
            PY,
            "-m",
            "pillion",
            "run",
            "--app-id",
            "order-processor",
            "--app-port",
            str(free_port()),
            "--",
            PY,
            str(HERE / "order-processor" / "app.py"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    threading.Thread(
        target=stream, args=("order-processor", server, server_lines), daemon=True
    ).start()
    deadline = time.monotonic() + 60
    while not any("You're up and running" in ln for ln in server_lines):
        if server.poll() is not None or time.monotonic() > deadline:
            print("order-processor did not start", file=sys.stderr)
            server.kill()
            return 1
        time.sleep(0.05)

    client_lines: list[str] = []
    client = subprocess.Popen(
        [
            PY,
            "-m",
            "pillion",
            "run",
            "--app-id",
            "checkout",
            "--",
            PY,
            str(HERE / "checkout" / "app.py"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=stream, args=("checkout", client, client_lines), daemon=True)
    reader.start()
    try:
        client_rc = client.wait(120)
    except subprocess.TimeoutExpired:
        client.kill()
        client_rc = -1
    reader.join(5)
    server.send_signal(signal.SIGTERM)
    server_rc = server.wait(30)
    time.sleep(0.1)

    placed = sum("placed order" in ln for ln in client_lines)
    received = sum("received order" in ln for ln in server_lines)
    read_back = any("read back from state: kettle" in ln for ln in client_lines)
    counted = any("has 5 orders" in ln for ln in client_lines)
    shipped = any("received 5 shipment events" in ln for ln in client_lines)
    ok = (
        client_rc == 0
        and server_rc == 0
        and placed == 5
        and received == 5
        and read_back
        and counted
        and shipped
    )
    print()
    print("=== pillion demo summary ===")
    print(f"  service invocation checkout -> order-processor: {placed} calls, {received} received")
    print(f"  state round trip (order 3 read back): {'yes' if read_back else 'NO'}")
    print(f"  state counter with etags: {'yes' if counted else 'NO'}")
    print(f"  pub/sub checkout -> order-processor (5 events): {'yes' if shipped else 'NO'}")
    print(f"  exit codes: checkout {client_rc}, order-processor {server_rc}")
    print(f"  result: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
