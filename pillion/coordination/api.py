"""The coordination contract backends implement: members, sessions, claims and due queues."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

# Times are ms since the Unix epoch, except `valid_until` (a time.monotonic() deadline).


@dataclass(frozen=True, slots=True)
class Member:
    """One sidecar process incarnation as the other sidecars see it."""

    host: str
    app_id: str
    actor_types: frozenset[str]
    session_id: str
    # The sidecar's internal link address "host:port" ("[::1]:50002" for IPv6): where peers call it.
    address: str
    namespace: str = ""
    pid: int = 0
    api_level: int = 0
    started_ms: int = 0
    # The sidecar's gRPC API address "host:port" (the gRPC proxy's target); "" when it has none.
    grpc_address: str = ""


@dataclass(frozen=True, slots=True)
class MemberView:
    """The live members at one revision; the revision strictly rises with each change."""

    revision: int
    members: Mapping[str, Member]  # keyed by session_id


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of holding `key`: tokens are monotonic per backend, so a newer holder wins."""

    key: str
    token: int
    session_id: str


@dataclass(frozen=True, slots=True)
class Holder:
    """Someone else holds `key` (`member` is None when its member record is already gone)."""

    key: str
    token: int
    member: Member | None


@dataclass(frozen=True, slots=True)
class DueItem:
    """A reminder or job firing time in its partition of a due group."""

    group: str
    partition: int
    key: str
    due_ms: int
    spec: bytes
    attempt: int = 0


class Session(Protocol):
    """A process incarnation's lease: one renewal keeps its member record and claims alive."""

    id: str
    # Set when valid_until passes un-renewed (or the backend dropped the session): self-fence now.
    lost: asyncio.Event

    def valid_until(self) -> float:
        """The time.monotonic() deadline before which the session is certainly still held."""
        ...

    async def close(self) -> None:
        """Revoke: the member record and all claims vanish now."""
        ...


class Membership(Protocol):
    async def join(self, me: Member, ttl_s: float = 5.0) -> Session: ...

    async def view(self) -> MemberView: ...

    def watch_view(self, after_revision: int) -> AsyncIterator[MemberView]:
        """Views newer than `after_revision`, coalesced, never going back."""
        ...


class Claims(Protocol):
    async def try_claim(self, s: Session, key: str) -> Fence | Holder:
        """Claim `key` for `s` (idempotent for the same session), or say who holds it."""
        ...

    async def release(self, f: Fence) -> bool:
        """Compare-and-delete on (key, token)."""
        ...

    async def holder(self, key: str) -> Holder | None: ...

    async def wait_released(self, key: str, timeout_s: float) -> bool: ...

    async def still_held(self, f: Fence) -> bool:
        """A linearizable read; rarely needed because sessions self-fence."""
        ...


class DueQueues(Protocol):
    async def put(self, item: DueItem) -> None:
        """Upsert by (group, partition, key)."""
        ...

    async def delete(self, group: str, partition: int, key: str) -> bool: ...

    async def load(self, owner: Fence, group: str, partition: int) -> list[DueItem]: ...

    def changes(self, group: str, partition: int) -> AsyncIterator[DueItem | tuple[str, None]]:
        """Upserted items, and (key, None) for deleted ones."""
        ...

    async def advance(self, owner: Fence, item: DueItem, next_due_ms: int | None) -> bool:
        """Reschedule (or delete with None) under `owner`; False when the fence was lost."""
        ...


class CoordinationBackend(Membership, Claims, DueQueues, Protocol):
    name: ClassVar[str]  # "local" | "redis" | "etcd" | "kubernetes"

    async def start(self) -> None: ...

    async def close(self) -> None: ...
