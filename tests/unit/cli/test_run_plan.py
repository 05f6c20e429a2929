"""Unit tests for `pillion run`'s plan: ports, ids, defaults, sidecar flags, app environment."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

from pillion.cli.run import (
    RunPlan,
    build_app_env,
    build_sidecar_env,
    exit_code,
    exit_text,
    free_ports,
    parse_run_args,
    plan_run,
    pump_lines,
    silly_name,
)


def plan(tmp_path: Path, *argv: str) -> RunPlan:
    ns, cmd = parse_run_args(["--pillion-home", str(tmp_path), *argv])
    return plan_run(ns, cmd)


def flag_value(p: RunPlan, name: str) -> str | None:
    args = list(p.sidecar_argv)
    return args[args.index(name) + 1] if name in args else None


def test_silly_name_shape() -> None:
    for _ in range(200):
        assert re.fullmatch(r"[a-z]+-[a-z]+", silly_name())


def test_free_ports_are_distinct_and_avoid() -> None:
    ports = free_ports(4, avoid=[1])
    assert len(set(ports)) == 4
    assert all(1024 <= p <= 65535 for p in ports)


def test_defaults_generate_id_ports_and_run_init(tmp_path: Path) -> None:
    p = plan(tmp_path, "--", "python", "app.py")
    assert re.fullmatch(r"[a-z]+-[a-z]+", p.app_id)
    ports = [p.http_port, p.grpc_port, p.internal_grpc_port, p.metrics_port]
    assert len(set(ports)) == 4 and all(x > 0 for x in ports)
    assert (tmp_path / "components" / "statestore.yaml").is_file()
    assert p.resources_paths == (str(tmp_path.resolve() / "components"),)
    assert p.config == str(tmp_path.resolve() / "config.yaml")
    assert p.command == ("python", "app.py")
    assert p.app_port == 0
    assert p.sidecar_argv[:4] == (sys.executable, "-m", "pillion", "sidecar")
    assert flag_value(p, "--app-id") == p.app_id
    assert flag_value(p, "--dapr-http-port") == str(p.http_port)
    assert flag_value(p, "--dapr-grpc-port") == str(p.grpc_port)
    assert flag_value(p, "--dapr-internal-grpc-port") == str(p.internal_grpc_port)
    assert flag_value(p, "--metrics-port") == str(p.metrics_port)
    assert flag_value(p, "--pillion-home") == str(tmp_path.resolve())
    assert "--app-port" not in p.sidecar_argv
    assert "--enable-api-logging" not in p.sidecar_argv


def test_given_values_pass_through(tmp_path: Path) -> None:
    res = tmp_path / "res"
    p = plan(
        tmp_path,
        "-a", "myapp", "-p", "8080", "-H", "3501", "-G", "50002", "-M", "9091",
        "--resources-path", str(res), "-c", "my.yaml", "--enable-api-logging",
        "--max-body-size", "8Mi", "--read-buffer-size", "16Ki", "--app-ssl",
        "--dapr-graceful-shutdown-seconds", "2", "--placement-host-address", "localhost:50005",
        "--app-health-check-path", "/hc", "--enable-app-health-check",
    )  # fmt: skip
    assert (p.app_id, p.app_port, p.http_port, p.grpc_port, p.metrics_port) == (
        "myapp", 8080, 3501, 50002, 9091,
    )  # fmt: skip
    assert p.resources_paths == (str(res),)
    assert not (tmp_path / "components").exists()  # an explicit path: no init
    assert p.config == "my.yaml"
    assert p.app_protocol == "https"
    assert p.graceful_shutdown_seconds == 2.0
    assert p.max_body_size == 8 * 1024 * 1024
    assert p.read_buffer_size == 16 * 1024
    assert flag_value(p, "--app-port") == "8080"
    assert flag_value(p, "--app-protocol") == "https"
    assert flag_value(p, "--max-body-size") == "8Mi"
    assert flag_value(p, "--read-buffer-size") == "16Ki"
    assert flag_value(p, "--dapr-graceful-shutdown-seconds") == "2"
    assert flag_value(p, "--placement-host-address") == "localhost:50005"
    assert flag_value(p, "--app-health-check-path") == "/hc"
    assert "--enable-api-logging" in p.sidecar_argv
    assert "--enable-app-health-check" in p.sidecar_argv


def test_config_default_only_when_the_file_exists(tmp_path: Path) -> None:
    (tmp_path / "components").mkdir()
    p = plan(tmp_path)
    assert p.config == ""
    assert "--config" not in p.sidecar_argv


def test_profiling_gets_a_port(tmp_path: Path) -> None:
    p = plan(tmp_path, "--enable-profiling")
    port = flag_value(p, "--profile-port")
    assert port is not None and int(port) > 0
    assert "--profile-port" not in plan(tmp_path).sidecar_argv


def test_app_env(tmp_path: Path) -> None:
    p = plan(tmp_path, "-a", "envapp", "-p", "8080", "-H", "3501", "-G", "50002", "-M", "9091")
    env = build_app_env(p, {"PATH": "/bin", "APP_ID": "old"})
    assert env["PATH"] == "/bin"
    assert env["APP_ID"] == "envapp"
    assert env["APP_PORT"] == "8080"
    assert env["APP_PROTOCOL"] == "http"
    assert "APP_CHANNEL_ADDRESS" not in env
    assert env["DAPR_HTTP_PORT"] == "3501"
    assert env["DAPR_GRPC_PORT"] == "50002"
    assert env["DAPR_METRICS_PORT"] == "9091"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_app_env_optional_entries(tmp_path: Path) -> None:
    p = plan(tmp_path, "--app-channel-address", "10.1.2.3", "-P", "grpc")
    env = build_app_env(p, {"PYTHONUNBUFFERED": "0"})
    assert "APP_PORT" not in env
    assert env["APP_CHANNEL_ADDRESS"] == "10.1.2.3"
    assert env["APP_PROTOCOL"] == "grpc"
    assert env["PYTHONUNBUFFERED"] == "0"  # the user's choice stands


def test_sidecar_env_can_import_pillion() -> None:
    env = build_sidecar_env({"PYTHONPATH": "/x"})
    root = str(Path(__file__).resolve().parents[3])
    assert env["PYTHONPATH"].split(":")[:2] == [root, "/x"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_exit_text_and_code() -> None:
    assert exit_text(3) == "exit status 3"
    assert exit_text(-signal.SIGKILL) == "signal: killed"
    assert exit_code(3) == 3
    assert exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM


def test_pump_lines_keeps_whole_long_lines(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    long = b"x" * 200_000

    async def go() -> None:
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(b"one\n" + long + b"\ntwo\nno-newline")
        reader.feed_eof()
        await pump_lines(reader, b"== APP == ")

    asyncio.run(go())
    out = capsysbinary.readouterr().out
    assert out == (b"== APP == one\n== APP == " + long + b"\n== APP == two\n== APP == no-newline\n")
