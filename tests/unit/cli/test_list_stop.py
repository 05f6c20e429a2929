"""Unit tests for `pillion list` formatting and `pillion stop`'s errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from pillion.cli.instances import LIST_KEYS, Instance, write_instance
from pillion.cli.main import main
from pillion.cli.stop_list import format_json, format_table, format_yaml

T0 = 1_700_000_000.0


def make(
    app_id: str, cli_pid: int, command: str = "python app.py", started_at: float = T0
) -> Instance:
    return Instance(
        app_id=app_id,
        http_port=3500,
        grpc_port=50001,
        app_port=0,
        metrics_enabled=True,
        command=command,
        daprd_pid=101,
        cli_pid=cli_pid,
        app_pid=102,
        max_request_body_size=4,
        http_read_buffer_size=4,
        started_at=started_at,
    )


def test_table() -> None:
    created = time.strftime("%Y-%m-%d %H:%M.%S", time.localtime(T0))
    text = format_table(
        [make("a", 7), make("longer-app", 8, "python\nsome_long_application.py")], now=T0 + 5
    )
    lines = text.splitlines()
    assert lines[0].startswith("APP ID      HTTP PORT  GRPC PORT  APP PORT  COMMAND  ")
    assert " ".join(lines[0].split()) == (
        "APP ID HTTP PORT GRPC PORT APP PORT COMMAND AGE CREATED DAPRD PID CLI PID APP PID"
    )
    assert lines[1].startswith("a           3500       50001      0         python app.py  ")
    assert lines[2].startswith("longer-app  3500")
    assert "python some_long_..." in lines[2]  # newline flattened, truncated like dapr
    for line in lines[1:]:
        assert f"5s   {created}  101        " in line
    # Columns line up under their headers.
    for title in ("HTTP PORT", "COMMAND", "CREATED", "CLI PID", "APP PID"):
        col = lines[0].index(title)
        assert lines[1][col - 2 : col] == "  " and lines[1][col] != " "
    assert all(line == line.rstrip() for line in lines)


def test_table_empty() -> None:
    assert format_table([]) == "No Dapr instances found.\n"


def test_json_and_yaml() -> None:
    data = json.loads(format_json([make("a", 7)], now=T0 + 90))
    assert len(data) == 1
    assert tuple(data[0]) == LIST_KEYS
    assert "startedAt" not in data[0]
    assert data[0]["age"] == "1m"
    assert data[0]["appId"] == "a"
    assert json.loads(format_json([])) == []
    ydata = yaml.safe_load(format_yaml([make("a", 7)], now=T0 + 90))
    assert ydata == data


def test_list_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = ["--pillion-home", str(tmp_path)]
    assert main(["list", *home]) == 0
    assert capsys.readouterr().out == "No Dapr instances found.\n"
    assert main(["list", "-o", "json", *home]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # A start time before this process began would mark its pid as reused.
    write_instance(tmp_path, make("mine", os.getpid(), started_at=time.time()))
    assert main(["list", "--output", "json", *home]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["appId"] == "mine" and row["cliPid"] == os.getpid()
    assert main(["list", *home]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("mine ")


def test_list_bad_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "-o", "xml", "--pillion-home", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_stop_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stop", "--app-id", "ghost", "--pillion-home", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "❌  Failed to stop Dapr and app: couldn't find app id ghost" in captured.err


def test_stop_needs_an_app_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stop", "--pillion-home", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
