"""`pillion init`: writes the default components and configuration into the pillion home."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pillion.cli import status
from pillion.cli.status import CliParser
from pillion.home import config_file, pillion_home, resources_dir


def _q(value: str) -> str:
    # A JSON string is a valid double-quoted YAML scalar, so paths with odd characters stay intact.
    return json.dumps(value)


def _statestore(home: Path) -> str:
    return (
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Component\n"
        "metadata:\n"
        "  name: statestore\n"
        "spec:\n"
        "  type: state.sqlite\n"
        "  version: v1\n"
        "  metadata:\n"
        "  - name: connectionString\n"
        f"    value: {_q(str(home / 'state.db'))}\n"
        "  - name: actorStateStore\n"
        '    value: "true"\n'
    )


def _pubsub(home: Path) -> str:
    # The embedded broker: one SQLite file shared by every sidecar on the host.
    return (
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Component\n"
        "metadata:\n"
        "  name: pubsub\n"
        "spec:\n"
        "  type: pubsub.sqlite\n"
        "  version: v1\n"
        "  metadata:\n"
        "  - name: connectionString\n"
        f"    value: {_q(str(home / 'pubsub.db'))}\n"
    )


def _lockstore(home: Path) -> str:
    # Locks in one SQLite file shared by every sidecar on the host, so they exclude each other.
    return (
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Component\n"
        "metadata:\n"
        "  name: lockstore\n"
        "spec:\n"
        "  type: lock.sqlite\n"
        "  version: v1\n"
        "  metadata:\n"
        "  - name: connectionString\n"
        f"    value: {_q(str(home / 'lock.db'))}\n"
    )


def _config(home: Path) -> str:
    # No zipkin endpoint: dapr init points at a zipkin container, and none runs here.
    return (
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Configuration\n"
        "metadata:\n"
        "  name: daprConfig\n"
        "spec:\n"
        "  tracing:\n"
        '    samplingRate: "1"\n'
    )


@dataclass(frozen=True)
class DefaultFile:
    """One file `init` creates: where it goes (given the home) and its text (given the home)."""

    path: Callable[[Path], Path]
    render: Callable[[Path], str]


# Adding a default component is one entry here.
DEFAULT_FILES: tuple[DefaultFile, ...] = (
    DefaultFile(lambda h: resources_dir(h) / "statestore.yaml", _statestore),
    DefaultFile(lambda h: resources_dir(h) / "pubsub.yaml", _pubsub),
    DefaultFile(lambda h: resources_dir(h) / "lockstore.yaml", _lockstore),
    DefaultFile(config_file, _config),
)


@dataclass(frozen=True)
class InitResult:
    home: Path
    written: tuple[Path, ...]
    kept: tuple[Path, ...]


def initialise(home: Path) -> InitResult:
    """Create the home and every missing default file; existing files stay as the user left them."""
    home = home.expanduser().resolve()
    written: list[Path] = []
    kept: list[Path] = []
    resources_dir(home).mkdir(parents=True, exist_ok=True)
    for entry in DEFAULT_FILES:
        target = entry.path(home)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two `pillion run`s initialising at once must not clobber each other.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            kept.append(target)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(entry.render(home))
        written.append(target)
    return InitResult(home, tuple(written), tuple(kept))


def is_initialised(home: Path) -> bool:
    return resources_dir(home.expanduser()).is_dir()


def main(argv: list[str]) -> int:
    p = CliParser(prog="pillion init", description="Set up the pillion home folder.")
    p.add_argument("--pillion-home", default="", help="default $PILLION_HOME or ~/.pillion")
    p.add_argument(
        "--slim",
        action="store_true",
        help="accepted for dapr compatibility; pillion has no containers to skip",
    )
    ns = p.parse_args(argv)
    status.pending("Making the jump to hyperspace...")
    result = initialise(pillion_home(ns.pillion_home))
    for path in result.written:
        status.info(f"Created {path}")
    for path in result.kept:
        status.info(f"Kept existing {path}")
    status.success(f"Success! pillion is initialised in {result.home}")
    return 0
