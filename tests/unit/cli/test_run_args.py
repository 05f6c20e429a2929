"""Unit tests for `pillion run` argument splitting and parsing."""

from __future__ import annotations

import pytest

from pillion.cli.run import build_parser, parse_run_args, split_argv
from pillion.cli.status import UsageError


def split(*argv: str) -> tuple[list[str], list[str]]:
    return split_argv(build_parser(), list(argv))


def test_double_dash_separates_the_command() -> None:
    flags, cmd = split("--app-id", "x", "--", "python", "-c", "print(1)")
    assert flags == ["--app-id=x"]
    assert cmd == ["python", "-c", "print(1)"]


def test_command_starts_at_first_non_flag_word() -> None:
    flags, cmd = split("-a", "x", "-p", "8080", "python", "app.py", "--port", "8080", "-v")
    assert flags == ["--app-id=x", "--app-port=8080"]
    assert cmd == ["python", "app.py", "--port", "8080", "-v"]


def test_everything_after_double_dash_is_command_even_flags() -> None:
    flags, cmd = split("--", "--app-id", "y")
    assert flags == []
    assert cmd == ["--app-id", "y"]


def test_no_command() -> None:
    assert split("--app-id", "x") == (["--app-id=x"], [])
    assert split() == ([], [])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-a", "x"], "--app-id=x"),
        (["-ax"], "--app-id=x"),
        (["-a=x"], "--app-id=x"),
        (["--app-id=x"], "--app-id=x"),
        (["-H", "3500"], "--dapr-http-port=3500"),
        (["-G", "50001"], "--dapr-grpc-port=50001"),
        (["-I", "50002"], "--dapr-internal-grpc-port=50002"),
        (["-M", "9090"], "--metrics-port=9090"),
        (["-P", "grpc"], "--app-protocol=grpc"),
        (["-c", "cfg.yaml"], "--config=cfg.yaml"),
        (["-d", "comps"], "--components-path=comps"),
        (["-u", "/tmp/s"], "--unix-domain-socket=/tmp/s"),
    ],
)
def test_short_forms_normalise_to_long(argv: list[str], expected: str) -> None:
    flags, cmd = split(*argv)
    assert flags == [expected]
    assert cmd == []


def test_values_starting_with_a_dash_are_values() -> None:
    flags, _ = split("--app-port", "-1")
    assert flags == ["--app-port=-1"]
    ns, _ = parse_run_args(["--app-port", "-1"])
    assert ns.app_port == -1


def test_boolean_forms() -> None:
    ns, cmd = parse_run_args(["--enable-api-logging", "python", "app.py"])
    assert ns.enable_api_logging is True
    assert cmd == ["python", "app.py"]
    ns, _ = parse_run_args(["--enable-api-logging=false"])
    assert ns.enable_api_logging is False
    ns, _ = parse_run_args(["--enable-api-logging=true", "--app-ssl"])
    assert ns.enable_api_logging is True
    assert ns.app_ssl is True
    # Like pflag, a separate word after a boolean is not its value but the command.
    ns, cmd = parse_run_args(["--enable-profiling", "true"])
    assert ns.enable_profiling is True
    assert cmd == ["true"]
    ns, _ = parse_run_args([])
    assert ns.enable_api_logging is False
    assert ns.enable_app_health_check is False


def test_invalid_boolean_value_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="invalid boolean"):
        parse_run_args(["--enable-api-logging=maybe"])


def test_repeatable_resources_paths() -> None:
    ns, _ = parse_run_args(["--resources-path", "a", "--resources-path=b", "-d", "c"])
    assert ns.resources_path == ["a", "b"]
    assert ns.components_path == ["c"]


def test_every_dapr_run_flag_is_known() -> None:
    argv = [
        "--app-id", "x", "--app-port", "1", "--app-protocol", "http",
        "--app-channel-address", "10.0.0.1", "--dapr-http-port", "2", "--dapr-grpc-port", "3",
        "--dapr-internal-grpc-port", "4", "--metrics-port", "5", "--config", "c.yaml",
        "--resources-path", "r", "--components-path", "d", "--log-level", "debug",
        "--enable-api-logging", "--app-max-concurrency", "3", "--placement-host-address", "p:1",
        "--scheduler-host-address", "s:1", "--max-body-size", "8Mi", "--read-buffer-size", "8Ki",
        "--unix-domain-socket", "/tmp", "--enable-app-health-check",
        "--app-health-check-path", "/h", "--app-health-probe-interval", "2",
        "--app-health-probe-timeout", "300", "--app-health-threshold", "4",
        "--dapr-listen-addresses", "0.0.0.0", "--enable-profiling", "--profile-port", "7",
        "--app-ssl", "--dapr-graceful-shutdown-seconds", "9", "--pillion-home", "/h",
    ]  # fmt: skip
    ns, cmd = parse_run_args(argv)
    assert cmd == []
    assert ns.app_channel_address == "10.0.0.1"
    assert ns.max_body_size == "8Mi"
    assert ns.app_health_probe_timeout == 300
    assert ns.dapr_graceful_shutdown_seconds == 9.0
    assert ns.pillion_home == "/h"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nope"], "unknown flag: --nope"),
        (["-z"], "unknown flag: -z"),
        (["--app-id"], "flag needs an argument"),
        (["--app-port", "http"], "invalid port"),
        (["--app-port", "70000"], "port out of range"),
        (["--app-protocol", "ftp"], "invalid choice"),
        (["--max-body-size", "lots"], "invalid size"),
        (["--log-level", "loud"], "invalid choice"),
    ],
)
def test_argument_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_run_args(argv)
