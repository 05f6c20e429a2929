"""`pillion list` and `pillion stop`, over the instance registry that `pillion run` keeps."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence

from pillion.cli import status
from pillion.cli.instances import Instance, pid_alive, read_instances
from pillion.cli.status import CliParser
from pillion.home import pillion_home

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("APP ID", "appId"),
    ("HTTP PORT", "httpPort"),
    ("GRPC PORT", "grpcPort"),
    ("APP PORT", "appPort"),
    ("COMMAND", "command"),
    ("AGE", "age"),
    ("CREATED", "created"),
    ("DAPRD PID", "daprdPid"),
    ("CLI PID", "cliPid"),
    ("APP PID", "appPid"),
)
NO_INSTANCES = "No Dapr instances found."
# `pillion run` needs at most 5 s for the app and grace + 5 s for the sidecar; leave room.
STOP_WAIT_SECONDS = 30.0


def format_table(instances: Sequence[Instance], now: float | None = None) -> str:
    """Left-aligned columns two spaces apart, like the dapr CLI's borderless table."""
    if not instances:
        return NO_INSTANCES + "\n"
    rows = [[title for title, _ in TABLE_COLUMNS]]
    for inst in instances:
        d = inst.to_list_dict(now)
        rows.append([_cell(d[key]) for _, key in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(out) + "\n"


def _cell(value: object) -> str:
    # A command may hold newlines or tabs; one instance must stay one row.
    return "".join(" " if ch.isspace() or not ch.isprintable() else ch for ch in str(value))


def format_json(instances: Sequence[Instance], now: float | None = None) -> str:
    return json.dumps([i.to_list_dict(now) for i in instances], indent=2) + "\n"


def format_yaml(instances: Sequence[Instance], now: float | None = None) -> str:
    import yaml  # only this output needs it

    text: str = yaml.safe_dump(
        [i.to_list_dict(now) for i in instances], sort_keys=False, default_flow_style=False
    )
    return text


def list_main(argv: list[str]) -> int:
    p = CliParser(prog="pillion list", description="List the running pillion instances.")
    p.add_argument(
        "-o", "--output", default="table", choices=("table", "json", "yaml"), help="output format"
    )
    p.add_argument("--pillion-home", default="", help="default $PILLION_HOME or ~/.pillion")
    ns = p.parse_args(argv)
    instances = read_instances(pillion_home(ns.pillion_home))
    now = time.time()
    if ns.output == "json":
        text = format_json(instances, now)
    elif ns.output == "yaml":
        text = format_yaml(instances, now)
    else:
        text = format_table(instances, now)
    status.write_bytes(text.encode("utf-8"))
    return 0


def stop_main(argv: list[str]) -> int:
    p = CliParser(prog="pillion stop", description="Stop pillion instances and their apps.")
    p.add_argument("-a", "--app-id", action="append", default=[], help="app id to stop")
    p.add_argument("app_ids", nargs="*", metavar="APP_ID", help="more app ids to stop")
    p.add_argument("--pillion-home", default="", help="default $PILLION_HOME or ~/.pillion")
    ns = p.parse_args(argv)
    wanted: list[str] = [*ns.app_id, *ns.app_ids]
    if not wanted:
        status.error("Error: pillion stop: give an app id (--app-id ID)")
        return 1
    running = read_instances(pillion_home(ns.pillion_home))
    rc = 0
    for app_id in wanted:
        targets = [i for i in running if i.app_id == app_id]
        if not targets:
            status.failure(f"Failed to stop Dapr and app: couldn't find app id {app_id}")
            rc = 1
            continue
        problem = _stop(targets)
        if problem:
            status.failure(f"Failed to stop Dapr and app: {problem}")
            rc = 1
        else:
            status.success(f"app stopped successfully: {app_id}")
    return rc


def _stop(targets: Sequence[Instance]) -> str:
    """SIGTERM each CLI (it stops its app and sidecar) and wait for it to go; "" on success."""
    signalled: list[Instance] = []
    for inst in targets:
        try:
            os.kill(inst.cli_pid, signal.SIGTERM)
        except ProcessLookupError:
            continue  # gone meanwhile: stopped is what we wanted
        except PermissionError as exc:
            return f"cannot signal process {inst.cli_pid}: {exc.strerror}"
        signalled.append(inst)
    # Waiting lets a script that runs `stop` then reuses the ports find them free.
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while time.monotonic() < deadline:
        if not any(pid_alive(i.cli_pid, i.started_at) for i in signalled):
            return ""
        time.sleep(0.05)
    still = ", ".join(str(i.cli_pid) for i in signalled if pid_alive(i.cli_pid, i.started_at))
    return f"process {still} did not exit within {STOP_WAIT_SECONDS:g}s" if still else ""
