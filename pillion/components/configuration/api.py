"""The configuration store contract: items, features, errors, subscriptions and the interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pillion.components.metadata import ComponentInfo


class Feature(StrEnum):
    """Capabilities a store declares; Dapr's configuration stores declare none today."""


@dataclass(frozen=True)
class ConfigurationItem:
    """One configuration value; a deleted key is notified as an item with every field empty."""

    value: str = ""
    version: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


class ConfigurationError(Exception):
    """Base of the errors a store raises; the block maps them to ERR_CONFIGURATION_*."""


# Called with each batch of changed keys, in the order the store saw the changes.
UpdateHandler = Callable[[dict[str, ConfigurationItem]], Awaitable[None]]


class ConfigurationSubscription(ABC):
    """A live subscription; close() stops notifications and is idempotent."""

    @abstractmethod
    async def close(self) -> None: ...


class ConfigurationStore(ABC):
    """A read-only key/value configuration store with change notifications."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata and connect; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def features(self) -> frozenset[Feature]: ...

    @abstractmethod
    async def get(
        self, keys: Sequence[str], metadata: Mapping[str, str]
    ) -> dict[str, ConfigurationItem]:
        """The items of `keys` that exist; every item when `keys` is empty."""

    @abstractmethod
    async def subscribe(
        self, keys: Sequence[str], metadata: Mapping[str, str], handler: UpdateHandler
    ) -> ConfigurationSubscription:
        """Call `handler` on changes to `keys` (every key when empty) until closed."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks (open subscriptions included)."""
