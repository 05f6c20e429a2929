"""The pillion home folder (`~/.pillion`, or $PILLION_HOME): default resources, registry, state."""

from __future__ import annotations

import os
from pathlib import Path


def pillion_home(override: str = "") -> Path:
    """The home folder; `override` (a flag) wins over $PILLION_HOME, then ~/.pillion."""
    raw = override or os.environ.get("PILLION_HOME", "")
    return Path(raw).expanduser() if raw else Path.home() / ".pillion"


def resources_dir(home: Path) -> Path:
    return home / "components"


def config_file(home: Path) -> Path:
    return home / "config.yaml"


def registry_file(home: Path) -> Path:
    """SQLite file of the local coordination backend (name registry, membership)."""
    return home / "coord.db"


def instances_dir(home: Path) -> Path:
    """One JSON file per running `pillion run`, for `pillion list` and `pillion stop`."""
    return home / "instances"
