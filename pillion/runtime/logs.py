"""Log lines in daprd's text and JSON formats, so log tooling written for Dapr keeps working."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time

from pillion import __version__

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


# Loggers whose scope is daprd's own name for them (API logging has its own scopes there).
_SCOPES = {
    "pillion.api.http.calls": "dapr.runtime.http-info",
    "pillion.api.grpc.calls": "dapr.runtime.grpc-info",
}


def _scope(name: str) -> str:
    # pillion.runtime.sidecar -> dapr.runtime (daprd's scopes are dapr.<area>)
    scope = _SCOPES.get(name)
    if scope is not None:
        return scope
    parts = name.split(".")
    return "dapr." + parts[1] if len(parts) > 1 and parts[0] == "pillion" else name


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """Structured fields a call site passed as `extra={"fields": {...}}` (daprd's WithFields)."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int((created % 1) * 1_000_000):06d}Z"
    )


class DaprTextFormatter(logging.Formatter):
    def __init__(self, app_id: str) -> None:
        super().__init__()
        self.app_id = app_id
        self.instance = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            # One line per event: the exception's own text, not a traceback.
            msg = f"{msg}: {record.exc_info[1]!r}"
        extra = "".join(
            f" {k}={json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}"
            for k, v in _fields(record).items()
        )
        return (
            f'time="{_stamp(record.created)}" level={_NAMES.get(record.levelno, "info")} '
            f"msg={json.dumps(msg, ensure_ascii=False)} app_id={self.app_id} "
            f"instance={self.instance} scope={_scope(record.name)} type=log ver={__version__}"
            f"{extra}"
        )


class DaprJsonFormatter(DaprTextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg = f"{msg}: {record.exc_info[1]!r}"
        return json.dumps(
            {
                **_fields(record),
                "time": _stamp(record.created),
                "level": _NAMES.get(record.levelno, "info"),
                "msg": msg,
                "scope": _scope(record.name),
                "app_id": self.app_id,
                "instance": self.instance,
                "type": "log",
                "ver": __version__,
            },
            ensure_ascii=False,
        )


def setup(app_id: str, level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(DaprJsonFormatter(app_id) if as_json else DaprTextFormatter(app_id))
    root = logging.getLogger("pillion")
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    root.propagate = False
