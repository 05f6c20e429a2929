"""End-to-end tests of `pillion run`, `list` and `stop` with real sidecar and app processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pillion.cli.instances import pid_alive
from pillion.cli.run import free_ports

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# The information emoji (U+2139 U+FE0F) and two spaces, as dapr prints it.
INFO = "\u2139\ufe0f  "
SLEEPER = "import time\nwhile True:\n    time.sleep(0.1)\n"


class PillionRun:
    """One `python -m pillion run ...` whose merged output goes to a file we can poll."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.log_path = cwd / f"run-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pillion", "run", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def fail(self, why: str) -> None:
        pytest.fail(f"{why}\n--- pillion run {' '.join(self.args)} output ---\n{self.output()}")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                if text in self.output():
                    return
                self.fail(f"exited ({self.proc.returncode}) before printing {text!r}")
            time.sleep(0.05)
        self.fail(f"no {text!r} within {timeout}s")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout}s")
            raise  # unreachable: fail raises

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its children get SIGTERM through PR_SET_PDEATHSIG
            self.proc.wait(10)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PILLION_HOME"] = str(tmp_path / "home")
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), e.get("PYTHONPATH", "")] if p)
    return e


@pytest.fixture
def start(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., PillionRun]]:
    runs: list[PillionRun] = []

    def _start(*args: str) -> PillionRun:
        run = PillionRun(list(args), env, tmp_path)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.stop()


def pillion(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pillion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def list_json(env: dict[str, str]) -> list[dict[str, Any]]:
    res = pillion(env, "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def wait_listed(env: dict[str, str], run: PillionRun, app_id: str) -> dict[str, Any]:
    """The list row of `app_id` once its app has started (appPid set)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [r for r in list_json(env) if r["appId"] == app_id]
        if rows and (rows[0]["appPid"] > 0 or "Dapr logs will appear here" in run.output()):
            return rows[0]
        if run.proc.poll() is not None:
            run.fail("exited before being listed")
        time.sleep(0.1)
    run.fail(f"{app_id} not listed within 30s")
    raise AssertionError  # unreachable


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def assert_in_order(output: str, *parts: str) -> None:
    pos = 0
    for part in parts:
        found = output.find(part, pos)
        assert found >= 0, f"{part!r} missing (or out of order) in:\n{output}"
        pos = found + len(part)


def test_hello(start: Callable[..., PillionRun]) -> None:
    run = start("--app-id", "x", "--", sys.executable, "-c", "print('hello')")
    rc = run.wait()
    out = run.output()
    assert rc == 0, out
    m = re.search(INFO + r"Starting Dapr with id x\. HTTP Port: (\d+)\. gRPC Port: (\d+)\n", out)
    assert m, out
    assert_in_order(
        out,
        f"{INFO}Starting Dapr with id x. HTTP Port: ",
        f"{INFO}Checking if Dapr sidecar is listening on HTTP port {m.group(1)}\n",
        f"{INFO}Dapr sidecar is up and running.\n",
        f"{INFO}Updating metadata for appPID: ",
        f"{INFO}Updating metadata for app command: {sys.executable} -c print('hello')\n",
        "✅  You're up and running! Both Dapr and your app logs will appear here.\n",
        "== APP == hello\n",
        "✅  Exited App successfully\n",
        "✅  Exited Dapr successfully\n",
    )


def test_app_exit_code(start: Callable[..., PillionRun]) -> None:
    run = start("-a", "three", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    rc = run.wait()
    out = run.output()
    assert rc == 3, out
    assert_in_order(
        out,
        "❌  The App process exited with error code: exit status 3\n",
        "✅  Exited Dapr successfully\n",
    )


def test_sigterm_stops_app_and_sidecar(
    start: Callable[..., PillionRun], env: dict[str, str]
) -> None:
    run = start("--app-id", "sleepy", "--", sys.executable, "-c", SLEEPER)
    row = wait_listed(env, run, "sleepy")
    assert row["cliPid"] == run.proc.pid
    assert pid_alive(row["appPid"]) and pid_alive(row["daprdPid"])
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait()
    out = run.output()
    assert rc == 0, out
    assert_in_order(
        out,
        f"{INFO}\nterminated signal received: shutting down\n",
        "✅  Exited App successfully\n",
        "✅  Exited Dapr successfully\n",
    )
    assert wait_gone(row["appPid"]), out
    assert wait_gone(row["daprdPid"]), out
    assert [r for r in list_json(env) if r["appId"] == "sleepy"] == []


def test_sidecar_only_and_stop(start: Callable[..., PillionRun], env: dict[str, str]) -> None:
    run = start("--app-id", "lonely")
    run.wait_for("✅  You're up and running! Dapr logs will appear here.")
    row = wait_listed(env, run, "lonely")
    assert row["appPid"] == 0 and row["command"] == ""
    res = pillion(env, "stop", "--app-id", "lonely")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "✅  app stopped successfully: lonely" in res.stdout
    assert run.wait() == 0, run.output()
    assert "✅  Exited Dapr successfully" in run.output()
    assert wait_gone(row["daprdPid"]), run.output()
    res = pillion(env, "stop", "--app-id", "lonely")
    assert res.returncode == 1
    assert "couldn't find app id lonely" in res.stderr


def test_list_shows_ports(start: Callable[..., PillionRun], env: dict[str, str]) -> None:
    http, grpc, metrics = free_ports(3)
    run = start(
        "-a", "listed", "-H", str(http), "-G", str(grpc), "-M", str(metrics),
        "--", sys.executable, "-c", SLEEPER,
    )  # fmt: skip
    row = wait_listed(env, run, "listed")
    assert (row["httpPort"], row["grpcPort"], row["appPort"]) == (http, grpc, 0)
    assert row["cliPid"] == run.proc.pid
    assert row["command"].startswith(sys.executable[:10])
    assert row["metricsEnabled"] is True
    assert re.fullmatch(r"\d+s", row["age"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d\.\d\d", row["created"])
    table = pillion(env, "list").stdout.splitlines()
    assert table[0].startswith("APP ID  ")
    assert any(line.startswith(f"listed  {http}  ") for line in table[1:]), table
    # dapr run records these in the sidecar's metadata too.
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1.0/metadata", timeout=5) as resp:
        extended = json.load(resp).get("extended", {})
    assert extended.get("cliPID") == str(run.proc.pid)
    assert extended.get("appPID") == str(row["appPid"])


def test_app_environment(start: Callable[..., PillionRun]) -> None:
    http, grpc, metrics = free_ports(3)
    app = (
        "import os, urllib.request\n"
        "for k in ('APP_ID', 'APP_PORT', 'APP_PROTOCOL', 'APP_CHANNEL_ADDRESS', 'DAPR_HTTP_PORT',\n"
        "          'DAPR_GRPC_PORT', 'DAPR_METRICS_PORT', 'PYTHONUNBUFFERED'):\n"
        "    print(f'{k}={os.environ.get(k)}')\n"
        "url = f\"http://127.0.0.1:{os.environ['DAPR_HTTP_PORT']}/v1.0/healthz/outbound\"\n"
        "print('outbound', urllib.request.urlopen(url, timeout=5).status)\n"
        "from dapr.conf import settings\n"
        "print('sdk', settings.DAPR_HTTP_PORT, settings.DAPR_GRPC_PORT)\n"
    )
    run = start(
        "-a", "envy", "-H", str(http), "-G", str(grpc), "-M", str(metrics), "-P", "http",
        "--", sys.executable, "-c", app,
    )  # fmt: skip
    assert run.wait() == 0, run.output()
    out = run.output()
    for line in (
        "APP_ID=envy",
        "APP_PORT=None",
        "APP_PROTOCOL=http",
        "APP_CHANNEL_ADDRESS=None",
        f"DAPR_HTTP_PORT={http}",
        f"DAPR_GRPC_PORT={grpc}",
        f"DAPR_METRICS_PORT={metrics}",
        "PYTHONUNBUFFERED=1",
        "outbound 204",
        f"sdk {http} {grpc}",
    ):
        assert f"== APP == {line}\n" in out, out


def test_generated_app_id(start: Callable[..., PillionRun]) -> None:
    app = "import os; print('id=' + os.environ['APP_ID'])"
    run = start(sys.executable, "-c", app)
    assert run.wait() == 0, run.output()
    out = run.output()
    m = re.search(r"Starting Dapr with id ([a-z]+-[a-z]+)\. HTTP Port", out)
    assert m, out
    assert f"== APP == id={m.group(1)}\n" in out


def test_sidecar_start_failure(start: Callable[..., PillionRun], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: [\n")
    run = start(
        "-a", "broken", "--resources-path", str(bad), "--", sys.executable, "-c", "print(1)"
    )
    rc = run.wait()
    out = run.output()
    assert rc != 0, out
    assert "broken.yaml" in out  # the sidecar's own explanation came through
    assert "❌  The daprd process exited with error code: exit status" in out
    assert "== APP ==" not in out
    assert "Updating metadata for appPID" not in out
