"""The name registry: sidecars register their internal address; callers resolve app ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from pillion.coordination.api import Member, Membership, MemberView, Session

log = logging.getLogger("pillion.coordination.names")


class AppNotFound(LookupError):
    """No live member has this app id (in this namespace)."""

    def __init__(self, app_id: str, namespace: str = "") -> None:
        where = f" in namespace {namespace!r}" if namespace else ""
        super().__init__(f"app id {app_id!r} not found{where}")
        self.app_id = app_id
        self.namespace = namespace


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, raw: str) -> Address:
        """Parse "host:port" or "[v6]:port"."""
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad address {raw!r}: want host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_Key = tuple[str, str]  # (namespace, app_id)
_Index = dict[_Key, tuple[Address, ...]]


def _index(view: MemberView) -> tuple[_Index, _Index]:
    """(internal link addresses, gRPC API addresses) of each app's members."""
    found: dict[_Key, list[Address]] = {}
    found_grpc: dict[_Key, list[Address]] = {}
    # Sorted by session id so every resolver walks a scaled-out app's members in the same order.
    for sid in sorted(view.members):
        m = view.members[sid]
        if not m.app_id:
            continue
        key = (m.namespace, m.app_id)
        try:
            addr = Address.parse(m.address)
        except ValueError:
            log.warning("member %s of app %r has a bad address %r", sid, m.app_id, m.address)
            continue
        found.setdefault(key, []).append(addr)
        if not m.grpc_address:
            continue  # a sidecar without a gRPC API (or of an older version)
        try:
            grpc_addr = Address.parse(m.grpc_address)
        except ValueError:
            log.warning(
                "member %s of app %r has a bad gRPC address %r", sid, m.app_id, m.grpc_address
            )
            continue
        found_grpc.setdefault(key, []).append(grpc_addr)
    return {k: tuple(v) for k, v in found.items()}, {k: tuple(v) for k, v in found_grpc.items()}


class NameResolver:
    """Resolves app ids to sidecar addresses from an in-memory copy of the membership view.

    A background task follows `watch_view`, and re-reads the view every `refresh_s` in case a
    backend's watch misses a change. An unknown or invalidated app id costs one fresh view read,
    so a sidecar that has just registered is found at once.
    """

    def __init__(self, backend: Membership, *, refresh_s: float = 1.0) -> None:
        self._backend = backend
        self._refresh_s = refresh_s
        self._revision = -1
        self._index: Mapping[_Key, tuple[Address, ...]] = {}
        self._grpc_index: Mapping[_Key, tuple[Address, ...]] = {}
        self._next: dict[_Key, int] = {}
        self._next_grpc: dict[_Key, int] = {}
        self._stale: set[_Key] = set()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def revision(self) -> int:
        """The revision of the view being served (-1 before the first read)."""
        return self._revision

    async def start(self) -> None:
        await self._refresh()
        self._tasks = [
            asyncio.create_task(self._follow(), name="pillion-names-watch"),
            asyncio.create_task(self._poll(), name="pillion-names-refresh"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def resolve(self, app_id: str, namespace: str = "") -> Address:
        """An address of a live sidecar of `app_id`, round-robin over its members."""
        return await self._pick(app_id, namespace, grpc=False)

    async def resolve_grpc(self, app_id: str, namespace: str = "") -> Address:
        """The gRPC API address of a live sidecar of `app_id`, round-robin over its members.

        AppNotFound also when the app's members registered no gRPC address.
        """
        return await self._pick(app_id, namespace, grpc=True)

    async def _pick(self, app_id: str, namespace: str, *, grpc: bool) -> Address:
        key = (namespace, app_id)
        # A fresh read refreshes both indexes, so one invalidation serves whichever asks first.
        if key in self._stale or key not in (self._grpc_index if grpc else self._index):
            self._stale.discard(key)
            await self._refresh()
        index, turns = (self._grpc_index, self._next_grpc) if grpc else (self._index, self._next)
        addrs = index.get(key)
        if not addrs:
            raise AppNotFound(app_id, namespace)
        i = turns.get(key, 0)
        turns[key] = i + 1
        return addrs[i % len(addrs)]

    def invalidate(self, app_id: str, namespace: str = "") -> None:
        """The caller failed to connect: read the view afresh on the next resolve of this app."""
        self._stale.add((namespace, app_id))

    async def _refresh(self) -> None:
        self._apply(await self._backend.view())

    def _apply(self, view: MemberView) -> None:
        # The watch and the fresh reads race; never replace a view with an older one.
        if view.revision < self._revision:
            return
        self._revision = view.revision
        self._index, self._grpc_index = _index(view)

    async def _follow(self) -> None:
        while True:
            try:
                async for view in self._backend.watch_view(self._revision):
                    self._apply(view)
                return  # the backend closed
            except Exception:
                log.exception("watching the membership view failed; retrying")
            await asyncio.sleep(self._refresh_s)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self._refresh()
            except Exception:
                log.exception("reading the membership view failed")


async def register(
    backend: Membership,
    *,
    app_id: str,
    namespace: str,
    address: str,
    host: str,
    actor_types: frozenset[str] = frozenset(),
    ttl_s: float = 5.0,
    grpc_address: str = "",
) -> Session:
    """Join as a member serving `app_id` at `address` ("host:port" of the internal port).

    `grpc_address` is the "host:port" of the sidecar's gRPC API, where peers proxy gRPC calls.
    Call it once both ports listen, so nobody resolves to an address that refuses.
    """
    # A bad address fails here, not in every caller's resolve.
    Address.parse(address)
    if grpc_address:
        Address.parse(grpc_address)
    me = Member(
        host=host,
        app_id=app_id,
        actor_types=actor_types,
        session_id=f"{host}#{uuid.uuid4().hex}",
        address=address,
        namespace=namespace,
        pid=os.getpid(),
        started_ms=int(time.time() * 1000),
        grpc_address=grpc_address,
    )
    return await backend.join(me, ttl_s)
