"""`pillion run`: starts a sidecar and the app beside it, streams their logs, stops both cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pillion.cli import status
from pillion.cli.init import initialise, is_initialised
from pillion.cli.instances import Instance, remove_instance, write_instance
from pillion.cli.status import CliParser, UsageError
from pillion.home import config_file, pillion_home, resources_dir
from pillion.runtime.options import APP_PROTOCOLS, parse_bool_flag, parse_port, parse_size

LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "fatal")
DEFAULT_CHANNEL_ADDRESS = "127.0.0.1"
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024
DEFAULT_READ_BUFFER_SIZE = 4 * 1024
DEFAULT_GRACE_SECONDS = 5.0
# dapr run gives the sidecar a minute to listen before it starts the app anyway.
READY_TIMEOUT_SECONDS = 60.0
APP_STOP_SECONDS = 5.0
# Once a child has exited, output still in flight through its pipe gets this long to arrive.
DRAIN_SECONDS = 2.0
# StreamReader's 64 KiB default turns a long log line into an error; longer ones are still
# handled (see pump_lines), this only sets how much is buffered per read.
STREAM_LIMIT = 1024 * 1024
# Beyond this a line without a newline is printed in pieces rather than held in memory forever.
MAX_LINE_BYTES = 16 * 1024 * 1024

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "cosy", "crisp", "dapper", "eager", "fancy", "fuzzy",
    "gentle", "glad", "grand", "happy", "hasty", "jolly", "keen", "kind", "lively", "lucky",
    "mellow", "merry", "misty", "nimble", "noble", "plucky", "proud", "quick", "quiet", "rapid",
    "rosy", "shiny", "silly", "snappy", "spry", "steady", "sunny", "swift", "tidy", "witty",
)  # fmt: skip
_NOUNS = (
    "badger", "beacon", "bison", "breeze", "canyon", "comet", "coyote", "falcon", "ferret", "fjord",
    "gecko", "glacier", "harbor", "heron", "lagoon", "lantern", "lemur", "marmot", "meadow",
    "meteor", "otter", "panda", "pebble", "pelican", "puffin", "quokka", "raven", "river",
    "rocket", "saddle", "sparrow", "summit", "thistle", "tiger", "tundra", "valley", "walrus",
    "willow", "wombat", "zephyr",
)  # fmt: skip


def silly_name(rng: random.Random | None = None) -> str:
    """An app id like dapr's generated ones: `adjective-noun`, lowercase."""
    r = rng or random.Random()
    return f"{r.choice(_ADJECTIVES)}-{r.choice(_NOUNS)}"


# --------------------------------------------------------------------------- argument parsing


def _size(text: str) -> str:
    # Validated here so a typo fails before anything starts; the sidecar gets the text as written.
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from exc
    return v


def build_parser() -> CliParser:
    p = CliParser(
        prog="pillion run",
        description="Run a pillion sidecar and (optionally) your app side by side: "
        "pillion run [flags] [--] [command...]",
    )
    a = p.add_argument

    def flag(*names: str, help: str = "") -> None:
        # Booleans take `--flag` or `--flag=true|false`, never a separate word (as in dapr's pflag).
        a(
            *names,
            type=parse_bool_flag,
            nargs="?",
            const=True,
            default=False,
            metavar="BOOL",
            help=help,
        )

    a("-a", "--app-id", default="", help="the app's id (default: a generated name)")
    a("-p", "--app-port", type=parse_port, default=-1, help="the port the app listens on")
    a("-P", "--app-protocol", default="http", choices=APP_PROTOCOLS)
    a("--app-channel-address", default=DEFAULT_CHANNEL_ADDRESS)
    a("-H", "--dapr-http-port", type=parse_port, default=-1, help="default: a free port")
    a("-G", "--dapr-grpc-port", type=parse_port, default=-1, help="default: a free port")
    a("-I", "--dapr-internal-grpc-port", type=parse_port, default=-1, help="default: a free port")
    a("-M", "--metrics-port", type=parse_port, default=-1, help="default: a free port")
    a("-c", "--config", default="", help="default: <home>/config.yaml when it exists")
    a("--resources-path", action="append", default=[], help="repeatable; default <home>/components")
    a("-d", "--components-path", action="append", default=[], help="deprecated: --resources-path")
    a("--log-level", default="info", choices=LOG_LEVELS)
    flag("--enable-api-logging")
    a("--app-max-concurrency", type=int, default=-1)
    a("--placement-host-address", default="")
    a("--scheduler-host-address", default="")
    a("--max-body-size", type=_size, default=None, help="e.g. 4Mi")
    a("--read-buffer-size", type=_size, default=None, help="e.g. 4Ki")
    a("-u", "--unix-domain-socket", default="", help="serve the API on sockets in this folder")
    flag("--enable-app-health-check")
    a("--app-health-check-path", default="")
    a("--app-health-probe-interval", type=int, default=None, help="seconds")
    a("--app-health-probe-timeout", type=int, default=None, help="milliseconds")
    a("--app-health-threshold", type=int, default=None)
    a("--dapr-listen-addresses", default="")
    flag("--enable-profiling")
    a("--profile-port", type=parse_port, default=-1)
    flag("--app-ssl", help="deprecated: --app-protocol https|grpcs")
    a("--dapr-graceful-shutdown-seconds", type=_seconds, default=-1.0)
    a("--pillion-home", default="", help="default $PILLION_HOME or ~/.pillion")
    return p


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at `--` or at the first word that is not a flag or a flag's value.

    The flags come back normalised to `--long` / `--long=value`, so argparse never mistakes a
    value that starts with a dash for a flag nor the command for an optional boolean's value.
    """
    actions = parser._option_string_actions
    flags: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return flags, list(argv[i + 1 :])
        if not tok.startswith("-") or tok == "-":
            return flags, list(argv[i:])
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            has_value = bool(eq)
        else:
            # Short forms: `-a x`, `-ax`, `-a=x` (pflag's three spellings).
            name, value = tok[:2], tok[2:]
            has_value = bool(value)
            if value.startswith("="):
                value = value[1:]
        action = actions.get(name)
        if action is None:
            raise UsageError(f"unknown flag: {name}")
        long = next((s for s in action.option_strings if s.startswith("--")), name)
        if action.nargs == 0:  # --help
            flags.append(long)
        elif has_value:
            flags.append(f"{long}={value}")
        elif action.nargs == "?":  # a boolean
            flags.append(long)
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: {tok}")
            flags.append(f"{long}={argv[i + 1]}")
            i += 1
        i += 1
    return flags, []


def parse_run_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    flags, command = split_argv(parser, argv)
    return parser.parse_args(flags), command


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunPlan:
    """Everything `pillion run` decided before starting anything."""

    app_id: str
    home: Path
    http_port: int
    grpc_port: int
    internal_grpc_port: int
    metrics_port: int
    app_port: int  # 0: the app listens on no port
    app_protocol: str
    app_channel_address: str
    resources_paths: tuple[str, ...]
    config: str
    unix_domain_socket: str
    listen_host: str  # where the CLI probes the sidecar's HTTP port
    graceful_shutdown_seconds: float
    max_body_size: int
    read_buffer_size: int
    sidecar_argv: tuple[str, ...]
    command: tuple[str, ...]

    def socket_path(self, kind: str) -> str:
        """The API socket dapr uses with --unix-domain-socket (`kind` is http or grpc)."""
        return os.path.join(self.unix_domain_socket, f"dapr-{self.app_id}-{kind}.socket")


def free_ports(count: int, *, avoid: Sequence[int] = (), host: str = "127.0.0.1") -> list[int]:
    """Ports nobody listens on now: all bound at once, so the kernel never repeats one."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def _probe_host(listen_addresses: str) -> str:
    first = next((a.strip() for a in listen_addresses.split(",") if a.strip()), "")
    if first in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if first in ("::", "[::]"):
        return "::1"
    return first.strip("[]")


def plan_run(ns: argparse.Namespace, command: Sequence[str]) -> RunPlan:
    """Resolve defaults: home, generated app id, free ports, resources and config paths."""
    home = pillion_home(ns.pillion_home).expanduser().resolve()
    app_id: str = ns.app_id or silly_name()

    resources: list[str] = [*ns.resources_path, *ns.components_path]
    if not resources:
        if not is_initialised(home):
            initialise(home)
        resources = [str(resources_dir(home))]
    config: str = ns.config
    if not config and config_file(home).is_file():
        config = str(config_file(home))

    given = {
        "http": ns.dapr_http_port,
        "grpc": ns.dapr_grpc_port,
        "internal": ns.dapr_internal_grpc_port,
        "metrics": ns.metrics_port,
        "profile": ns.profile_port if ns.enable_profiling else 0,
    }
    # dapr run treats an unset (-1) or zero port as "pick one"; 0 would leave us not knowing it.
    missing = [k for k, v in given.items() if v <= 0 and (k != "profile" or ns.enable_profiling)]
    picked = iter(free_ports(len(missing), avoid=[v for v in given.values() if v > 0]))
    ports = {k: (next(picked) if k in missing else v) for k, v in given.items()}

    protocol: str = ns.app_protocol
    if ns.app_ssl and protocol in ("http", "grpc"):
        protocol += "s"
    grace: float = (
        ns.dapr_graceful_shutdown_seconds
        if ns.dapr_graceful_shutdown_seconds >= 0
        else DEFAULT_GRACE_SECONDS
    )
    app_port = max(int(ns.app_port), 0)

    args: list[str] = [
        sys.executable, "-m", "pillion", "sidecar",
        "--app-id", app_id,
        "--dapr-http-port", str(ports["http"]),
        "--dapr-grpc-port", str(ports["grpc"]),
        "--dapr-internal-grpc-port", str(ports["internal"]),
        "--metrics-port", str(ports["metrics"]),
        "--app-protocol", protocol,
        "--log-level", ns.log_level,
        "--pillion-home", str(home),
    ]  # fmt: skip
    if app_port > 0:
        args += ["--app-port", str(app_port)]
    if ns.app_channel_address != DEFAULT_CHANNEL_ADDRESS:
        args += ["--app-channel-address", ns.app_channel_address]
    for path in resources:
        args += ["--resources-path", path]
    if config:
        args += ["--config", config]
    if ns.enable_api_logging:
        args.append("--enable-api-logging")
    if ns.app_max_concurrency != -1:
        args += ["--app-max-concurrency", str(ns.app_max_concurrency)]
    if ns.placement_host_address:
        args += ["--placement-host-address", ns.placement_host_address]
    if ns.scheduler_host_address:
        args += ["--scheduler-host-address", ns.scheduler_host_address]
    if ns.max_body_size is not None:
        args += ["--max-body-size", ns.max_body_size]
    if ns.read_buffer_size is not None:
        args += ["--read-buffer-size", ns.read_buffer_size]
    if ns.unix_domain_socket:
        args += ["--unix-domain-socket", ns.unix_domain_socket]
    if ns.enable_app_health_check:
        args.append("--enable-app-health-check")
    if ns.app_health_check_path:
        args += ["--app-health-check-path", ns.app_health_check_path]
    if ns.app_health_probe_interval is not None:
        args += ["--app-health-probe-interval", str(ns.app_health_probe_interval)]
    if ns.app_health_probe_timeout is not None:
        args += ["--app-health-probe-timeout", str(ns.app_health_probe_timeout)]
    if ns.app_health_threshold is not None:
        args += ["--app-health-threshold", str(ns.app_health_threshold)]
    if ns.dapr_listen_addresses:
        args += ["--dapr-listen-addresses", ns.dapr_listen_addresses]
    if ns.enable_profiling:
        args += ["--enable-profiling", "--profile-port", str(ports["profile"])]
    if ns.dapr_graceful_shutdown_seconds >= 0:
        args += ["--dapr-graceful-shutdown-seconds", f"{grace:g}"]

    return RunPlan(
        app_id=app_id,
        home=home,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        internal_grpc_port=ports["internal"],
        metrics_port=ports["metrics"],
        app_port=app_port,
        app_protocol=protocol,
        app_channel_address=ns.app_channel_address,
        resources_paths=tuple(resources),
        config=config,
        unix_domain_socket=ns.unix_domain_socket,
        listen_host=_probe_host(ns.dapr_listen_addresses),
        graceful_shutdown_seconds=grace,
        max_body_size=(
            parse_size(ns.max_body_size) if ns.max_body_size is not None else DEFAULT_MAX_BODY_SIZE
        ),
        read_buffer_size=(
            parse_size(ns.read_buffer_size)
            if ns.read_buffer_size is not None
            else DEFAULT_READ_BUFFER_SIZE
        ),
        sidecar_argv=tuple(args),
        command=tuple(command),
    )


def build_app_env(plan: RunPlan, base: Mapping[str, str]) -> dict[str, str]:
    """The app's environment: inherited, plus what dapr run gives an app."""
    env = dict(base)
    env["APP_ID"] = plan.app_id
    if plan.app_port > 0:
        env["APP_PORT"] = str(plan.app_port)
    env["APP_PROTOCOL"] = plan.app_protocol
    if plan.app_channel_address != DEFAULT_CHANNEL_ADDRESS:
        env["APP_CHANNEL_ADDRESS"] = plan.app_channel_address
    env["DAPR_HTTP_PORT"] = str(plan.http_port)
    env["DAPR_GRPC_PORT"] = str(plan.grpc_port)
    env["DAPR_METRICS_PORT"] = str(plan.metrics_port)
    # Piped stdout is block-buffered in Python; unbuffered lets the app's lines show as they come.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def build_sidecar_env(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m pillion` in the child must find this very package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    if Path(root).name not in ("site-packages", "dist-packages"):
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


# --------------------------------------------------------------------------- helpers


def exit_text(returncode: int) -> str:
    """How Go's exec.ExitError prints, which is what dapr run shows."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.strsignal(-returncode)
    except ValueError:
        name = None
    return f"signal: {(name or f'signal {-returncode}').lower()}"


def exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


async def pump_lines(reader: asyncio.StreamReader, prefix: bytes) -> None:
    """Copy whole lines from a child's pipe to our stdout, each with `prefix`, until EOF."""
    pending = bytearray()
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            rest = bytes(pending) + exc.partial
            if rest:
                status.write_bytes(prefix + rest + b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            # A line longer than the buffer: collect it rather than fail or split it.
            pending += await reader.readexactly(exc.consumed)
            if len(pending) > MAX_LINE_BYTES:
                status.write_bytes(prefix + bytes(pending) + b"\n")
                pending.clear()
            continue
        status.write_bytes(prefix + bytes(pending) + chunk)
        pending.clear()


async def http_status(
    method: str,
    path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    uds: str = "",
    body: bytes = b"",
    timeout: float = 2.0,
) -> int | None:
    """The status code of one HTTP/1.1 request, or None when nothing sensible answers."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            if uds:
                reader, writer = await asyncio.open_unix_connection(uds)
                host_header = "localhost"
            else:
                reader, writer = await asyncio.open_connection(host, port)
                host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            parts = (await reader.readline()).split()
            if len(parts) >= 2 and parts[0].startswith(b"HTTP/"):
                return int(parts[1])
            return None
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _death_signal_preexec() -> Callable[[], None] | None:
    """On Linux, make a child get SIGTERM if this CLI dies without stopping it (say, SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        # The parent may have died before prctl took effect; then nobody would ever signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- the runner


class Runner:
    """Owns the sidecar and app processes of one `pillion run` from start to exit code."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.stop_requested = asyncio.Event()
        self.force = asyncio.Event()  # a second signal: stop waiting politely
        self.started_at = time.time()
        self.sidecar: asyncio.subprocess.Process | None = None
        self.sidecar_exit: asyncio.Task[int] | None = None
        self.sidecar_pump: asyncio.Task[None] | None = None
        self.app: asyncio.subprocess.Process | None = None
        self.app_exit: asyncio.Task[int] | None = None
        self.app_pump: asyncio.Task[None] | None = None
        self._registered = False
        self._registry_warned = False

    def _on_signal(self) -> None:
        if self.stop_requested.is_set():
            self.force.set()
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal)
        try:
            return await self._run()
        finally:
            await self._cleanup()
            for sig in sigs:
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        plan = self.plan
        if plan.unix_domain_socket:
            status.info(
                f"Starting Dapr with id {plan.app_id}. HTTP Socket: {plan.socket_path('http')}. "
                f"gRPC Socket: {plan.socket_path('grpc')}."
            )
        else:
            status.info(
                f"Starting Dapr with id {plan.app_id}. HTTP Port: {plan.http_port}. "
                f"gRPC Port: {plan.grpc_port}"
            )
        preexec = _death_signal_preexec()
        try:
            self.sidecar = await asyncio.create_subprocess_exec(
                *plan.sidecar_argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=build_sidecar_env(os.environ),
                # Its own session: a terminal's Ctrl-C reaches only us, and we stop the app first.
                start_new_session=True,
                preexec_fn=preexec,
                limit=STREAM_LIMIT,
            )
        except OSError as exc:
            status.failure(f"Failed to start the sidecar: {exc}")
            return 1
        assert self.sidecar.stdout is not None
        self.sidecar_pump = asyncio.create_task(pump_lines(self.sidecar.stdout, b""))
        self.sidecar_exit = asyncio.create_task(self.sidecar.wait())
        self._register()

        if plan.unix_domain_socket:
            status.info(
                f"Checking if Dapr sidecar is listening on HTTP socket {plan.socket_path('http')}"
            )
        else:
            status.info(f"Checking if Dapr sidecar is listening on HTTP port {plan.http_port}")
        outcome = await self._wait_ready()
        if outcome == "exited":
            await self._drain(self.sidecar_pump)
            rc = self.sidecar.returncode or 0
            if rc != 0:
                status.failure(f"The daprd process exited with error code: {exit_text(rc)}")
            else:
                status.failure("The daprd process exited before it was ready")
            return 1
        if outcome == "stopped":
            return await self._shutdown()
        if outcome == "timeout":
            status.warning("Dapr sidecar might not be responding.")
        else:
            status.info("Dapr sidecar is up and running.")

        await self._put_metadata("cliPID", str(os.getpid()))
        if plan.command:
            try:
                self.app = await asyncio.create_subprocess_exec(
                    *plan.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    # One pipe for both keeps a traceback in its place among the printed lines.
                    stderr=asyncio.subprocess.STDOUT,
                    env=build_app_env(plan, os.environ),
                    start_new_session=True,
                    preexec_fn=preexec,
                    limit=STREAM_LIMIT,
                )
            except OSError as exc:
                status.failure(
                    f"Failed to start the app {plan.command[0]!r}: {exc.strerror or exc}"
                )
                await self._stop_sidecar()
                return 1
            assert self.app.stdout is not None
            self.app_pump = asyncio.create_task(pump_lines(self.app.stdout, b"== APP == "))
            self.app_exit = asyncio.create_task(self.app.wait())
            self._register()
            status.info(f"Updating metadata for appPID: {self.app.pid}")
            await self._put_metadata("appPID", str(self.app.pid))
            app_command = " ".join(plan.command)
            status.info(f"Updating metadata for app command: {app_command}")
            await self._put_metadata("appCommand", app_command)
            status.success("You're up and running! Both Dapr and your app logs will appear here.\n")
        else:
            status.success("You're up and running! Dapr logs will appear here.\n")

        stop_wait = asyncio.create_task(self.stop_requested.wait())
        watched: set[asyncio.Future[Any]] = {stop_wait, self.sidecar_exit}
        if self.app_exit is not None:
            watched.add(self.app_exit)
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()

        if self.stop_requested.is_set():
            return await self._shutdown()
        if self.app_exit is not None and self.app_exit.done():
            rc = self.app_exit.result()
            await self._finish_app()
            if rc == 0:
                status.success("Exited App successfully")
            else:
                status.failure(f"The App process exited with error code: {exit_text(rc)}")
            await self._stop_sidecar()
            return exit_code(rc)
        # The sidecar went away by itself.
        await self._drain(self.sidecar_pump)
        rc = self.sidecar_exit.result()
        if rc == 0:
            status.success("Exited Dapr successfully")
        else:
            status.failure(f"The daprd process exited with error code: {exit_text(rc)}")
        if self.app is not None:
            await self._stop_app()
            status.success("Exited App successfully")
        return 0 if rc == 0 else 1

    async def _wait_ready(self) -> str:
        """ "ready", "exited" (the sidecar died), "stopped" (we were signalled) or "timeout"."""
        assert self.sidecar_exit is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_SECONDS
        stop_wait = asyncio.create_task(self.stop_requested.wait())
        try:
            while True:
                if self.sidecar_exit.done():
                    return "exited"
                if self.stop_requested.is_set():
                    return "stopped"
                code = await http_status(
                    "GET",
                    "/v1.0/healthz/outbound",
                    host=self.plan.listen_host,
                    port=self.plan.http_port,
                    uds=self._api_socket(),
                    timeout=1.0,
                )
                if code is not None and 200 <= code < 300:
                    return "ready"
                if loop.time() >= deadline:
                    return "timeout"
                await asyncio.wait(
                    {self.sidecar_exit, stop_wait},
                    timeout=0.05,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            stop_wait.cancel()

    def _api_socket(self) -> str:
        """The HTTP API socket once it exists; until then (or without -u) the TCP port."""
        if not self.plan.unix_domain_socket:
            return ""
        path = self.plan.socket_path("http")
        return path if os.path.exists(path) else ""

    async def _put_metadata(self, key: str, value: str) -> None:
        # Tools that ask the sidecar (dashboard, `GET /v1.0/metadata`) find what dapr run records.
        code = await http_status(
            "PUT",
            f"/v1.0/metadata/{key}",
            host=self.plan.listen_host,
            port=self.plan.http_port,
            uds=self._api_socket(),
            body=value.encode("utf-8"),
        )
        if code is None or not 200 <= code < 300:
            reason = f"status {code}" if code is not None else "no answer"
            status.warning(f"Could not update sidecar metadata for {key}: {reason}")

    async def _shutdown(self) -> int:
        status.info("\nterminated signal received: shutting down")
        if self.app is not None:
            await self._stop_app()
            status.success("Exited App successfully")
        await self._stop_sidecar()
        return 0

    async def _wait_for(self, task: asyncio.Task[int], timeout: float) -> bool:
        """Wait for a process's exit task; a second signal cuts the wait short."""
        if task.done():
            return True
        force_wait = asyncio.create_task(self.force.wait())
        try:
            await asyncio.wait(
                {task, force_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            force_wait.cancel()
        return task.done()

    async def _stop_app(self) -> None:
        """SIGTERM the app's process group, SIGKILL it after APP_STOP_SECONDS."""
        if self.app is None or self.app_exit is None:
            return
        if not self.app_exit.done():
            _killpg(self.app.pid, signal.SIGTERM)
            if not await self._wait_for(self.app_exit, APP_STOP_SECONDS):
                _killpg(self.app.pid, signal.SIGKILL)
                await self.app_exit
        await self._finish_app()

    async def _finish_app(self) -> None:
        assert self.app is not None
        # Children the app left behind in its group would hold the pipe open and outlive it.
        _killpg(self.app.pid, signal.SIGTERM)
        await self._drain(self.app_pump)

    async def _stop_sidecar(self) -> None:
        """SIGTERM the sidecar, SIGKILL it after its grace period plus 5 s."""
        if self.sidecar is None or self.sidecar_exit is None:
            return
        if not self.sidecar_exit.done():
            with contextlib.suppress(ProcessLookupError):
                self.sidecar.send_signal(signal.SIGTERM)
            if not await self._wait_for(
                self.sidecar_exit, self.plan.graceful_shutdown_seconds + 5.0
            ):
                _killpg(self.sidecar.pid, signal.SIGKILL)
                await self.sidecar_exit
        await self._drain(self.sidecar_pump)
        rc = self.sidecar_exit.result()
        if rc in (0, -signal.SIGTERM, -signal.SIGKILL):
            status.success("Exited Dapr successfully")
        else:
            status.failure(f"The daprd process exited with error code: {exit_text(rc)}")

    async def _drain(self, pump: asyncio.Task[None] | None) -> None:
        if pump is None or pump.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump), DRAIN_SECONDS)
        pump.cancel()

    def _register(self) -> None:
        if self.sidecar is None:
            return
        plan = self.plan
        inst = Instance(
            app_id=plan.app_id,
            http_port=plan.http_port,
            grpc_port=plan.grpc_port,
            app_port=plan.app_port,
            metrics_enabled=True,
            command=" ".join(plan.command),
            daprd_pid=self.sidecar.pid,
            cli_pid=os.getpid(),
            app_pid=self.app.pid if self.app is not None else 0,
            max_request_body_size=plan.max_body_size // (1024 * 1024),
            http_read_buffer_size=plan.read_buffer_size // 1024,
            started_at=self.started_at,
        )
        try:
            write_instance(plan.home, inst)
            self._registered = True
        except OSError as exc:
            if not self._registry_warned:
                self._registry_warned = True
                status.warning(f"Could not record this instance for `pillion list`: {exc}")

    async def _cleanup(self) -> None:
        """Whatever path we leave by (an exception included), leave no process or file behind."""
        if self.app is not None and self.app.returncode is None:
            _killpg(self.app.pid, signal.SIGKILL)
        if self.sidecar is not None and self.sidecar.returncode is None:
            _killpg(self.sidecar.pid, signal.SIGKILL)
        for task in (self.app_exit, self.sidecar_exit):
            if task is not None and not task.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5.0)
        for pump in (self.app_pump, self.sidecar_pump):
            if pump is not None:
                pump.cancel()
        if self._registered:
            with contextlib.suppress(OSError):
                remove_instance(self.plan.home, os.getpid())


async def _run_plan(plan: RunPlan) -> int:
    # Built inside the loop so its events belong to it.
    return await Runner(plan).run()


def main(argv: list[str]) -> int:
    ns, command = parse_run_args(argv)
    plan = plan_run(ns, command)
    return asyncio.run(_run_plan(plan))
