"""Unit tests for the instance registry behind `pillion list` and `pillion stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pillion.cli.instances import (
    LIST_KEYS,
    Instance,
    age_text,
    instance_path,
    pid_alive,
    read_instances,
    remove_instance,
    truncate,
    write_instance,
)


def make(cli_pid: int, *, app_id: str = "a", started_at: float | None = None) -> Instance:
    return Instance(
        app_id=app_id,
        http_port=3500,
        grpc_port=50001,
        app_port=8080,
        metrics_enabled=True,
        command="python app.py",
        daprd_pid=11,
        cli_pid=cli_pid,
        app_pid=12,
        max_request_body_size=4,
        http_read_buffer_size=4,
        started_at=time.time() if started_at is None else started_at,
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_read_remove(tmp_path: Path) -> None:
    inst = make(os.getpid())
    path = write_instance(tmp_path, inst)
    assert path == instance_path(tmp_path, os.getpid())
    data = json.loads(path.read_text())
    assert list(data) == [k for k in LIST_KEYS if k != "age"] + ["startedAt"]
    assert data["cliPid"] == os.getpid()
    assert read_instances(tmp_path) == [inst]
    remove_instance(tmp_path, os.getpid())
    remove_instance(tmp_path, os.getpid())  # twice is fine
    assert read_instances(tmp_path) == []


def test_dead_cli_pids_are_ignored_and_deleted(tmp_path: Path) -> None:
    live = make(os.getpid())
    write_instance(tmp_path, live)
    dead = make(dead_pid(), app_id="gone")
    dead_path = write_instance(tmp_path, dead)
    assert read_instances(tmp_path) == [live]
    assert not dead_path.exists()


def test_zombie_counts_as_dead() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_alive(proc.pid):
        time.sleep(0.02)
    assert not pid_alive(proc.pid)
    proc.wait()


def test_reused_pid_counts_as_dead() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    assert pid_alive(os.getpid(), time.time())
    # Our process started long after this record was made: it is someone else's pid now.
    assert not pid_alive(os.getpid(), time.time() - 3600)


def test_garbage_files_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "instances"
    folder.mkdir()
    bad = folder / "1.json"
    bad.write_text("{not json")
    (folder / "2.json").write_text(json.dumps({"appId": 3, "cliPid": os.getpid()}))
    assert read_instances(tmp_path) == []
    old = time.time() - 3600
    os.utime(bad, (old, old))
    read_instances(tmp_path)
    assert not bad.exists()


def test_missing_folder(tmp_path: Path) -> None:
    assert read_instances(tmp_path / "nope") == []


def test_list_dict_order_and_values() -> None:
    inst = make(42, started_at=1_000_000.0)
    d = inst.to_list_dict(now=1_000_125.0)
    assert tuple(d) == LIST_KEYS
    assert d["age"] == "2m"
    assert d["created"] == time.strftime("%Y-%m-%d %H:%M.%S", time.localtime(1_000_000.0))
    assert d["cliPid"] == 42


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "60s"), (61, "1m"), (3600, "60m"), (3601, "1h"),
     (86400, "24h"), (86401, "1d"), (3 * 86400 + 5, "3d"), (-5, "0s")],
)  # fmt: skip
def test_age_text(seconds: float, text: str) -> None:
    assert age_text(seconds) == text


def test_truncate() -> None:
    assert truncate("short", 20) == "short"
    assert truncate("python very_long_app_name.py", 20) == "python very_long_..."
    assert len(truncate("x" * 50, 20)) == 20
