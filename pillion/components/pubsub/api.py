"""The pub/sub contract: messages, subscriptions, features and errors of a broker component."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pillion.components.metadata import ComponentInfo


class Feature(StrEnum):
    """What a broker declares; undeclared features are done by the runtime or not at all."""

    MESSAGE_TTL = "MESSAGE_TTL"  # the broker expires messages itself (metadata ttlInSeconds)
    BULK_PUBLISH = "BULK_PUBLISH"  # implements BulkPublisher natively
    ORDERED = "ORDERED"  # one subscriber sees a topic's messages in publish order


# Message metadata keys the runtime understands.
TTL_KEY = "ttlInSeconds"
CONTENT_TYPE_KEY = "contentType"


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a published message to one consumer group."""

    topic: str
    data: bytes  # exactly the bytes published (a CloudEvent JSON, or a raw payload)
    metadata: Mapping[str, str] = field(default_factory=dict)
    id: str = ""  # the broker's id for this message, for logs
    attempt: int = 1  # delivery attempt as the broker counts it, when it knows


# Returning normally acknowledges the message (it is done for this consumer group); raising
# any exception leaves it unacknowledged, so the broker delivers it again later (at least once).
Handler = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    topic: str
    metadata: Mapping[str, str] = field(default_factory=dict)


class Subscription(Protocol):
    async def close(self) -> None:
        """Stop consuming and wait for in-flight handlers; unacked messages stay in the broker."""
        ...


class PubSubError(Exception):
    """A broker failure (publish or subscribe); the block maps it to Dapr's codes."""


class TopicNotFound(PubSubError):
    """The broker says the topic does not exist (Dapr: DAPR_PUBSUB_TEST_NOT_FOUND)."""


@dataclass(frozen=True, slots=True)
class BulkEntry:
    entry_id: str
    data: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)


class PubSub(ABC):
    """A broker. The consumer group is the component's `consumerID` metadata (the runtime
    defaults it to the app id), so sidecars of one app id compete for messages while
    different app ids each get every message."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata and connect; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def features(self) -> frozenset[Feature]: ...

    @abstractmethod
    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        """Durably hand the message to the broker before returning (confirms, fsync, ...)."""

    @abstractmethod
    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> Subscription:
        """Start consuming `req.topic` for this component's consumer group.

        The handler may be called concurrently (bounded by the component's concurrency
        setting); a message is acknowledged only after its handler returned.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close connections; subscriptions are closed first by the runtime."""


@runtime_checkable
class BulkPublisher(Protocol):
    """A broker that publishes many messages in one call (feature BULK_PUBLISH)."""

    async def bulk_publish(
        self, topic: str, entries: Sequence[BulkEntry], metadata: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        """Publish all entries; return (entry_id, error) for those that failed."""
        ...
