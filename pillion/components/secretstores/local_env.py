"""The `secretstores.local.env` store: the sidecar's environment variables as secrets."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pillion.components.metadata import ComponentInfo, decode
from pillion.components.secretstores.api import Feature, SecretStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalEnvMetadata:
    """Dapr's `secretstores.local.env` metadata."""

    prefix: str = field(default="", metadata={"name": "prefix"})


class LocalEnvSecretStore(SecretStore):
    """Secret `NAME` is the variable `<prefix>NAME`; bulk lists the prefixed ones, prefix removed.

    As in Dapr, an unset variable reads as an empty value (not an error), and the sidecar's own
    credentials (`APP_API_TOKEN`, `DAPR_*`) are never given out. Matching is case-sensitive.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        # Read at each call: the environment is the store, and tests may swap it.
        self._environ = os.environ if environ is None else environ
        self._prefix = ""

    async def init(self, info: ComponentInfo) -> None:
        self._prefix = decode(LocalEnvMetadata, info.properties).prefix

    def features(self) -> frozenset[Feature]:
        return frozenset()

    async def get(self, key: str, metadata: Mapping[str, str]) -> dict[str, str]:
        name = self._prefix + key
        if not _allowed(name):
            log.warning("Access to env var %s is forbidden", key)
            return {key: ""}
        return {key: self._environ.get(name, "")}

    async def bulk_get(self, metadata: Mapping[str, str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        p = self._prefix
        for name, value in self._environ.items():
            if p and (len(name) <= len(p) or not name.startswith(p)):
                continue
            if not _allowed(name):
                continue
            key = name[len(p) :]
            out[key] = {key: value}
        return out


def _allowed(name: str) -> bool:
    """The sidecar's own credentials stay out of reach, whatever the prefix."""
    up = name.upper()
    return up != "APP_API_TOKEN" and not up.startswith("DAPR_")
