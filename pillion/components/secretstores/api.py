"""The secret store contract: features, errors and the store interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum

from pillion.components.metadata import ComponentInfo


class Feature(StrEnum):
    """Capabilities a store declares; `GET /v1.0/metadata` lists them."""

    # A secret is a map of several keys, not one value named like the secret.
    MULTIPLE_KEY_VALUES_PER_SECRET = "MULTIPLE_KEY_VALUES_PER_SECRET"


class SecretStoreError(Exception):
    """Base of the errors a store raises; the secrets block maps them to ERR_SECRET_GET."""


class SecretNotFound(SecretStoreError):
    """The store holds no secret of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"secret {name} not found")
        self.name = name


class SecretStore(ABC):
    """A read-only secret store. Secrets are maps of string keys to string values."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata and load or connect; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def features(self) -> frozenset[Feature]: ...

    @abstractmethod
    async def get(self, key: str, metadata: Mapping[str, str]) -> dict[str, str]:
        """The secret `key` as {name: value}; raise SecretNotFound when it does not exist.

        A single-valued store answers `{key: value}`.
        """

    @abstractmethod
    async def bulk_get(self, metadata: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Every secret the store holds: secret name -> its map."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release files, connections and background tasks."""
