"""The instance registry: one JSON file per running `pillion run`, read by `list` and `stop`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pillion.home import instances_dir

# `dapr list` reports a process start time with this Go layout ("2006-01-02 15:04.05").
CREATED_FORMAT = "%Y-%m-%d %H:%M.%S"

# The keys of `dapr list -o json`, in its order.
LIST_KEYS: tuple[str, ...] = (
    "appId",
    "httpPort",
    "grpcPort",
    "appPort",
    "metricsEnabled",
    "command",
    "age",
    "created",
    "daprdPid",
    "cliPid",
    "appPid",
    "maxRequestBodySize",
    "httpReadBufferSize",
    "runTemplatePath",
    "appLogPath",
    "daprdLogPath",
    "runTemplateName",
)

# A process that started this much later than the instance's startedAt is another process that
# reused the pid; the slack absorbs the coarse boot-time clock that /proc start times hang off.
_PID_REUSE_SLACK_SECONDS = 10.0


@dataclass(frozen=True)
class Instance:
    """One running `pillion run`: what `dapr list` shows about it."""

    app_id: str
    http_port: int
    grpc_port: int
    app_port: int
    metrics_enabled: bool
    command: str
    daprd_pid: int
    cli_pid: int
    app_pid: int
    # In MB and KB, as `dapr list` reports the sidecar's body and read-buffer limits.
    max_request_body_size: int
    http_read_buffer_size: int
    run_template_path: str = ""
    app_log_path: str = ""
    daprd_log_path: str = ""
    run_template_name: str = ""
    started_at: float = 0.0

    def created(self) -> str:
        return time.strftime(CREATED_FORMAT, time.localtime(self.started_at))

    def to_list_dict(self, now: float | None = None) -> dict[str, Any]:
        """The `dapr list -o json` object, keys in dapr's order; `age` is computed now."""
        clock = time.time() if now is None else now
        return {
            "appId": self.app_id,
            "httpPort": self.http_port,
            "grpcPort": self.grpc_port,
            "appPort": self.app_port,
            "metricsEnabled": self.metrics_enabled,
            "command": truncate(self.command, 20),
            "age": age_text(clock - self.started_at),
            "created": self.created(),
            "daprdPid": self.daprd_pid,
            "cliPid": self.cli_pid,
            "appPid": self.app_pid,
            "maxRequestBodySize": self.max_request_body_size,
            "httpReadBufferSize": self.http_read_buffer_size,
            "runTemplatePath": self.run_template_path,
            "appLogPath": self.app_log_path,
            "daprdLogPath": self.daprd_log_path,
            "runTemplateName": self.run_template_name,
        }

    def to_file_dict(self) -> dict[str, Any]:
        """What the registry file holds: the list fields (age excepted) plus startedAt."""
        d = self.to_list_dict(self.started_at)
        del d["age"]
        d["command"] = self.command
        d["startedAt"] = self.started_at
        return d

    @classmethod
    def from_file_dict(cls, d: dict[str, Any]) -> Instance:
        """Raises ValueError (or TypeError/KeyError) on a malformed file."""
        return cls(
            app_id=_str(d["appId"]),
            http_port=_int(d.get("httpPort", 0)),
            grpc_port=_int(d.get("grpcPort", 0)),
            app_port=_int(d.get("appPort", 0)),
            metrics_enabled=bool(d.get("metricsEnabled", True)),
            command=_str(d.get("command", "")),
            daprd_pid=_int(d.get("daprdPid", 0)),
            cli_pid=_int(d["cliPid"]),
            app_pid=_int(d.get("appPid", 0)),
            max_request_body_size=_int(d.get("maxRequestBodySize", 4)),
            http_read_buffer_size=_int(d.get("httpReadBufferSize", 4)),
            run_template_path=_str(d.get("runTemplatePath", "")),
            app_log_path=_str(d.get("appLogPath", "")),
            daprd_log_path=_str(d.get("daprdLogPath", "")),
            run_template_name=_str(d.get("runTemplateName", "")),
            started_at=float(d.get("startedAt", 0.0)),
        )

    def with_app(self, app_pid: int) -> Instance:
        return replace(self, app_pid=app_pid)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return int(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def age_text(seconds: float) -> str:
    """`dapr list`'s AGE: whole seconds up to a minute, then minutes, hours, days."""
    s = max(seconds, 0.0)
    if s <= 60:
        return f"{int(s)}s"
    if s <= 3600:
        return f"{int(s // 60)}m"
    if s <= 86400:
        return f"{int(s // 3600)}h"
    return f"{int(s // 86400)}d"


def truncate(text: str, limit: int) -> str:
    """Cut to `limit` characters ending in "..." as `dapr list` does for COMMAND."""
    if len(text) <= limit or limit <= 3:
        return text
    return text[: limit - 3] + "..."


def instance_path(home: Path, cli_pid: int) -> Path:
    return instances_dir(home) / f"{cli_pid}.json"


def write_instance(home: Path, inst: Instance) -> Path:
    """Write atomically, so a concurrent `pillion list` never reads half a file."""
    target = instance_path(home, inst.cli_pid)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(inst.to_file_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def remove_instance(home: Path, cli_pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        instance_path(home, cli_pid).unlink()


def read_instances(home: Path, *, prune: bool = True) -> list[Instance]:
    """Running instances, oldest first; files of dead CLIs (or unreadable ones) are deleted."""
    folder = instances_dir(home)
    if not folder.is_dir():
        return []
    found: list[Instance] = []
    for path in folder.glob("*.json"):
        try:
            inst = Instance.from_file_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue  # its CLI removed it while we looked
        except (OSError, ValueError, TypeError, KeyError):
            if prune and _older_than(path, 60.0):
                # Atomic writes make a torn file impossible, so an old unreadable one is junk.
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if not pid_alive(inst.cli_pid, inst.started_at):
            if prune:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        found.append(inst)
    found.sort(key=lambda i: (i.started_at, i.cli_pid))
    return found


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def pid_alive(pid: int, started_at: float | None = None) -> bool:
    """Whether `pid` runs (zombies count as dead), and, given startedAt, is the same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start_epoch = stat
    if state == "Z":
        return False
    return not (
        started_at is not None
        and started_at > 0
        and start_epoch is not None
        and start_epoch > started_at + _PID_REUSE_SLACK_SECONDS
    )


def _proc_stat(pid: int) -> tuple[str, float | None] | None:
    """(state, start time as epoch seconds) from /proc on Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields resume after the last ")".
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    state = fields[0]
    boot = _boot_time()
    try:
        ticks = int(fields[19])
        hz = os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return state, None
    return state, (boot + ticks / hz) if boot is not None else None


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            for row in f:
                if row.startswith("btime "):
                    return float(row.split()[1])
    except (OSError, ValueError):
        return None
    return None
