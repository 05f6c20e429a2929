"""The binding contracts: output bindings (invoke an operation) and input bindings (read events)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pillion.components.metadata import ComponentInfo

# An input event handed to the app: (data, metadata) -> the app's answer body. It raises when
# the app did not take the event; the binding decides whether to retry.
InputHandler = Callable[[bytes, Mapping[str, str]], Awaitable[bytes]]


class BindingError(Exception):
    """Base of the errors a binding raises; the bindings block maps them to Dapr's codes."""


@dataclass
class BindingResponse:
    """What an output binding answers: raw data and response metadata."""

    data: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)


class OutputBinding(ABC):
    """A binding the app invokes with `POST /v1.0/bindings/{name}` or gRPC InvokeBinding."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def operations(self) -> list[str]:
        """The operations `invoke` accepts."""

    @abstractmethod
    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        """Run one operation; raise BindingError when it fails."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release files, connections and background tasks."""


class InputBinding(ABC):
    """A binding that delivers events to the app until it is closed."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    async def read(self, handler: InputHandler) -> None:
        """Start delivering events to `handler` in the background and return; close stops it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop reading and release resources; safe to call twice."""
