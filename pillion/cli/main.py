"""Entry point of the `pillion` command: picks a subcommand and imports only its module."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pillion
from pillion.cli import status
from pillion.cli.status import UsageError

USAGE = """\
pillion: a Dapr-compatible sidecar runtime.

Usage:
  pillion [command] [flags]

Commands:
  run        Run a sidecar and (optionally) your app side by side
  init       Set up the pillion home (default components and configuration)
  list       List running instances
  stop       Stop instances and their apps
  sidecar    Run the sidecar itself (daprd's flags)
  version    Print the CLI and runtime versions

Flags:
  -h, --help      Help for pillion (or for a command: pillion run --help)
  -v, --version   Print the version

Home folder: $PILLION_HOME, or ~/.pillion (override with --pillion-home).
"""


def _sidecar(argv: list[str]) -> int:
    from pillion.runtime.sidecar import main as sidecar_main

    return sidecar_main(argv)


def _run(argv: list[str]) -> int:
    from pillion.cli.run import main as run_main

    return run_main(argv)


def _init(argv: list[str]) -> int:
    from pillion.cli.init import main as init_main

    return init_main(argv)


def _list(argv: list[str]) -> int:
    from pillion.cli.stop_list import list_main

    return list_main(argv)


def _stop(argv: list[str]) -> int:
    from pillion.cli.stop_list import stop_main

    return stop_main(argv)


def _version(argv: list[str]) -> int:
    if argv and argv[0] not in ("-h", "--help"):
        raise UsageError(f"pillion version: unexpected argument {argv[0]!r}")
    status.line(f"CLI version: {pillion.__version__}")
    status.line(f"Runtime version: {pillion.__version__}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _run,
    "init": _init,
    "list": _list,
    "stop": _stop,
    "sidecar": _sidecar,
    "version": _version,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        status.write_bytes(USAGE.encode("utf-8"))
        return 0
    if args[0] in ("-v", "--version"):
        return _version([])
    command = COMMANDS.get(args[0])
    if command is None:
        status.error(f'Error: unknown command "{args[0]}" for "pillion"')
        status.write_bytes(USAGE.encode("utf-8"), sys.stderr)
        return 1
    try:
        return command(args[1:])
    except UsageError as exc:
        status.error(f"Error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
