"""Start real sidecar and app processes in tests, wait on them with deadlines, show their logs."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `pred` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_status(port: int, path: str, method: str = "GET", timeout: float = 2.0) -> int:
    """Status of one request to 127.0.0.1:port, or 0 if it could not connect."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return 0


@dataclass
class Proc:
    """A child process whose merged output is collected line by line."""

    name: str
    popen: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Proc:
        p = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        proc = cls(name, p)
        proc._reader = threading.Thread(target=proc._read, daemon=True)
        proc._reader.start()
        return proc

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 10.0) -> None:
        wait_until(lambda: any(text in ln for ln in self.lines), timeout, f"{self.name}: {text!r}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL the process group after `timeout`; the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self._reader is not None:
            self._reader.join(2)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


@dataclass
class Sidecar:
    proc: Proc
    http_port: int
    app_id: str
    grpc_port: int = 0
    metrics_port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_sidecar(
    app_id: str,
    *,
    home: str | Path,
    resources: Sequence[str | Path] = (),
    app_port: int = 0,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait: str = "outbound",
    timeout: float = 15.0,
    http_port: int = 0,
) -> Sidecar:
    """`python -m pillion sidecar` with free ports; waits for healthz/outbound (or healthz)."""
    http_port = http_port or free_port()  # given: an app started first already knows it
    grpc_port = free_port()
    metrics_port = free_port()
    argv = [
        sys.executable,
        "-m",
        "pillion",
        "sidecar",
        "--app-id",
        app_id,
        "--dapr-http-port",
        str(http_port),
        "--dapr-grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--pillion-home",
        str(home),
    ]
    for r in resources:
        argv += ["--resources-path", str(r)]
    if app_port:
        argv += ["--app-port", str(app_port)]
    argv += list(extra)
    proc = Proc.start(f"sidecar {app_id}", argv, env={**os.environ, **(env or {})})
    path = "/v1.0/healthz/outbound" if wait == "outbound" else "/v1.0/healthz"
    try:
        wait_until(
            lambda: http_status(http_port, path) == 204 or proc.popen.poll() is not None,
            timeout,
            f"sidecar {app_id} {path}",
        )
    except TimeoutError:
        proc.kill()
        raise TimeoutError(f"sidecar {app_id} not ready:\n{proc.output}") from None
    if proc.popen.poll() is not None:
        raise RuntimeError(f"sidecar {app_id} exited {proc.popen.returncode}:\n{proc.output}")
    return Sidecar(proc, http_port, app_id, grpc_port, metrics_port)


def temp_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="pillion-home-"))
