"""Sidecar options and the `pillion sidecar` flag parser (flags named as daprd's)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

from pillion.durations import parse_duration

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Bytes in a Kubernetes-style quantity ("4Mi", "512Ki", "1000000")."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_bool_flag(text: str) -> bool:
    """A Go-style boolean flag value."""
    v = text.strip().lower()
    if v in ("true", "1", "t", "yes"):
        return True
    if v in ("false", "0", "f", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_port(text: str) -> int:
    """A port flag value (-1 and 0 mean unset)."""
    try:
        v = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from exc
    if not -1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {v}")
    return v


APP_PROTOCOLS = ("http", "https", "grpc", "grpcs", "h2c")


@dataclass(frozen=True)
class SidecarOptions:
    app_id: str = ""
    app_port: int = 0
    app_protocol: str = "http"
    app_channel_address: str = "127.0.0.1"
    http_port: int = 3500
    grpc_port: int = 50001
    internal_port: int = 0
    metrics_port: int = 9090
    enable_metrics: bool = True
    listen_addresses: tuple[str, ...] = ("127.0.0.1",)
    resources_paths: tuple[str, ...] = ()
    config_files: tuple[str, ...] = ()
    log_level: str = "info"
    log_as_json: bool = False
    enable_api_logging: bool = False
    app_max_concurrency: int = -1
    max_body_size: int = 4 * 1024 * 1024
    read_buffer_size: int = 4 * 1024
    enable_app_health_check: bool = False
    app_health_check_path: str = "/healthz"
    app_health_probe_interval: float = 5.0
    app_health_probe_timeout: float = 0.5
    app_health_threshold: int = 3
    graceful_shutdown_seconds: float = 5.0
    namespace: str = ""
    disable_init_endpoints: tuple[str, ...] = ()
    # Where the local name registry and other host-wide files live (PILLION_HOME).
    home: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def build_parser(prog: str = "pillion sidecar") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the pillion sidecar (daprd's flags).",
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--app-id", default="")
    a("--app-port", type=parse_port, default=0)
    a("--app-protocol", default="http", choices=APP_PROTOCOLS)
    a("--app-channel-address", default="127.0.0.1")
    a("--app-ssl", type=parse_bool_flag, nargs="?", const=True, default=False, help="deprecated")
    a("--dapr-http-port", type=parse_port, default=3500)
    a("--dapr-grpc-port", type=parse_port, default=50001)
    a("--dapr-internal-grpc-port", type=parse_port, default=0)
    a("--dapr-public-port", type=parse_port, default=0)
    a("--metrics-port", type=parse_port, default=9090)
    a("--enable-metrics", type=parse_bool_flag, nargs="?", const=True, default=True)
    a("--dapr-listen-addresses", default="127.0.0.1")
    a("--resources-path", action="append", default=[])
    a("--components-path", action="append", default=[], help="deprecated alias")
    a("--config", action="append", default=[])
    a("--log-level", default="info", choices=("debug", "info", "warn", "warning", "error", "fatal"))
    a("--log-as-json", type=parse_bool_flag, nargs="?", const=True, default=False)
    a("--enable-api-logging", type=parse_bool_flag, nargs="?", const=True, default=False)
    a("--app-max-concurrency", type=int, default=-1)
    a("--max-body-size", type=_size, default=None)
    a("--dapr-http-max-request-size", type=int, default=None, help="deprecated, in MB")
    a("--read-buffer-size", type=_size, default=None)
    a("--dapr-http-read-buffer-size", type=int, default=None, help="deprecated, in KB")
    a("--enable-app-health-check", type=parse_bool_flag, nargs="?", const=True, default=False)
    a("--app-health-check-path", default="/healthz")
    a("--app-health-probe-interval", type=int, default=5, help="seconds")
    a("--app-health-probe-timeout", type=int, default=500, help="milliseconds")
    a("--app-health-threshold", type=int, default=3)
    a("--dapr-graceful-shutdown-seconds", type=_seconds, default=5.0)
    a("--disable-init-endpoints", default="")
    a("--mode", default="standalone", choices=("standalone", "kubernetes"))
    # Accepted for daprd compatibility; used by later building blocks.
    a("--placement-host-address", default="")
    a("--scheduler-host-address", default="")
    a("--enable-mtls", type=parse_bool_flag, nargs="?", const=True, default=False)
    a("--sentry-address", default="")
    a("--allowed-origins", default="*")
    a("--enable-profiling", type=parse_bool_flag, nargs="?", const=True, default=False)
    a("--profile-port", type=parse_port, default=7777)
    a("--unix-domain-socket", default="")
    a("--dapr-block-shutdown-duration", default="")
    a("--pillion-home", default="", help="host-wide state (default $PILLION_HOME or ~/.pillion)")
    return p


def options_from_args(
    ns: argparse.Namespace, *, namespace: str = "", home: str = ""
) -> SidecarOptions:
    max_body = ns.max_body_size
    if max_body is None and ns.dapr_http_max_request_size is not None:
        max_body = ns.dapr_http_max_request_size * 1024 * 1024
    read_buf = ns.read_buffer_size
    if read_buf is None and ns.dapr_http_read_buffer_size is not None:
        read_buf = ns.dapr_http_read_buffer_size * 1024
    protocol = ns.app_protocol
    if ns.app_ssl and protocol in ("http", "grpc"):
        protocol += "s"
    return SidecarOptions(
        app_id=ns.app_id,
        app_port=max(ns.app_port, 0),
        app_protocol=protocol,
        app_channel_address=ns.app_channel_address,
        http_port=ns.dapr_http_port,
        grpc_port=ns.dapr_grpc_port,
        internal_port=ns.dapr_internal_grpc_port,
        metrics_port=ns.metrics_port,
        enable_metrics=ns.enable_metrics,
        listen_addresses=tuple(a.strip() for a in ns.dapr_listen_addresses.split(",") if a.strip()),
        resources_paths=tuple(ns.resources_path + ns.components_path),
        config_files=tuple(ns.config),
        log_level="warn" if ns.log_level == "warning" else ns.log_level,
        log_as_json=ns.log_as_json,
        enable_api_logging=ns.enable_api_logging,
        app_max_concurrency=ns.app_max_concurrency,
        max_body_size=max_body if max_body is not None else 4 * 1024 * 1024,
        read_buffer_size=read_buf if read_buf is not None else 4 * 1024,
        enable_app_health_check=ns.enable_app_health_check,
        app_health_check_path=ns.app_health_check_path,
        app_health_probe_interval=float(ns.app_health_probe_interval),
        app_health_probe_timeout=ns.app_health_probe_timeout / 1000.0,
        app_health_threshold=ns.app_health_threshold,
        graceful_shutdown_seconds=ns.dapr_graceful_shutdown_seconds,
        namespace=namespace,
        disable_init_endpoints=tuple(
            x.strip() for x in ns.disable_init_endpoints.split(",") if x.strip()
        ),
        home=ns.pillion_home or home,
    )
