"""Status lines and argument errors, printed as the dapr CLI prints them (scripts grep them)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, TextIO

SUCCESS = "✅  "
FAILURE = "❌  "
WARNING = "⚠  "
PENDING = "⌛  "
# U+2139 U+FE0F: the information emoji exactly as the dapr CLI prints it.
INFO = "\u2139\ufe0f  "


def write_bytes(data: bytes, stream: TextIO | None = None) -> None:
    """Write raw bytes to a text stream's buffer and flush, so child output passes unchanged."""
    out = sys.stdout if stream is None else stream
    try:
        # Text written earlier through the wrapper must reach the buffer first to keep the order.
        out.flush()
        buf = getattr(out, "buffer", None)
        if buf is None:
            out.write(data.decode("utf-8", "replace"))
            out.flush()
        else:
            buf.write(data)
            buf.flush()
    except (OSError, ValueError):
        # A closed or broken pipe (`pillion run | head`) must not take the app and sidecar down.
        pass


def line(text: str, stream: TextIO | None = None) -> None:
    """One whole line, encoded as UTF-8 whatever the locale says (the emoji must not crash us)."""
    write_bytes((text + "\n").encode("utf-8", "replace"), stream)


def info(text: str) -> None:
    line(INFO + text)


def success(text: str) -> None:
    line(SUCCESS + text)


def warning(text: str) -> None:
    line(WARNING + text)


def pending(text: str) -> None:
    line(PENDING + text)


def failure(text: str) -> None:
    # dapr writes failures to stderr; both are flushed per line so a merged capture keeps order.
    line(FAILURE + text, sys.stderr)


def error(text: str) -> None:
    """A plain one-line error (argument mistakes) on stderr."""
    line(text, sys.stderr)


class UsageError(Exception):
    """A mistake on the command line; `main` prints it as one line and exits 1."""


class CliParser(argparse.ArgumentParser):
    """An argparse parser that raises UsageError instead of printing usage and exiting 2."""

    def __init__(self, *, prog: str, description: str = "") -> None:
        super().__init__(prog=prog, description=description, allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")
