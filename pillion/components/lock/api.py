"""The lock store contract: unlock statuses, errors and the store interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import IntEnum, StrEnum

from pillion.components.metadata import ComponentInfo


class Feature(StrEnum):
    """Capabilities a lock store declares; Dapr defines none yet, so none are listed."""


class UnlockStatus(IntEnum):
    """The outcome of an unlock, numbered as Dapr's `UnlockResponse.Status`."""

    SUCCESS = 0
    LOCK_DOES_NOT_EXIST = 1
    LOCK_BELONGS_TO_OTHERS = 2
    INTERNAL_ERROR = 3


class LockError(Exception):
    """A store failed; the lock block answers ERR_TRY_LOCK or ERR_UNLOCK."""


class LockStore(ABC):
    """A lock store. Resource ids reaching it are already prefixed (`lock||appid||id`).

    A lock is held by one owner until it is unlocked or its expiry passes; locks are not
    reentrant (the owner's second try_lock fails, as with Dapr's stores).
    """

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata, open connections; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def features(self) -> frozenset[Feature]: ...

    @abstractmethod
    async def try_lock(self, resource_id: str, lock_owner: str, expiry_seconds: int) -> bool:
        """Take the lock for `expiry_seconds` if nobody holds it; False when someone does."""

    @abstractmethod
    async def unlock(self, resource_id: str, lock_owner: str) -> UnlockStatus:
        """Release the lock if `lock_owner` holds it; otherwise say why not."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
