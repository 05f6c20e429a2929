"""The `lock.redis` store: Dapr's standalone Redis lock (SET NX PX, Lua compare-and-delete)."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import ClassVar

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from pillion.components.lock.api import Feature, LockError, LockStore, UnlockStatus
from pillion.components.metadata import (
    ComponentInfo,
    decode,
)
from pillion.components.redisconn import RedisConnMetadata, millis_integers, redis_client

# Dapr's unlock script (components-contrib lock/redis): -1 no such lock, -2 someone else's,
# otherwise the number of keys DEL removed.
UNLOCK_SCRIPT = (
    'local v = redis.call("get",KEYS[1]); if v==false then return -1 end; '
    'if v~=ARGV[1] then return -2 else return redis.call("del",KEYS[1]) end'
)

# Dapr reads a bare integer in these durations as milliseconds (its redis Duration type).


@dataclass(frozen=True)
class RedisLockMetadata(RedisConnMetadata):
    """Dapr's `lock.redis` metadata: its common Redis settings, standalone servers only.

    `keyPrefix` belongs to the runtime and is not read here.
    """

    # As in Dapr: a failover to a replica could hand a lock out twice.
    failover_reason: ClassVar[str] = "is not supported by lock.redis"


_millis_integers = millis_integers


class RedisLockStore(LockStore):
    """Locks as plain Redis keys holding the owner, as Dapr's `lock.redis` keeps them.

    try_lock is `SET key owner NX PX expiry`: Redis grants it to exactly one caller and
    expires it on its own. unlock runs Dapr's Lua script, which deletes the key only when it
    still holds the caller's owner. Like Dapr's, the store refuses a server with replicas
    (a failover could hand a lock out twice).
    """

    def __init__(self) -> None:
        self.meta: RedisLockMetadata | None = None
        # Set on every connection (CLIENT SETNAME), so operators and tests can find them.
        self.client_name = f"pillion-lock-{uuid.uuid4().hex[:12]}"
        self._client: aioredis.Redis | None = None
        self._unlock: AsyncScript | None = None
        self._where = ""

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(RedisLockMetadata, _millis_integers(info.properties))
        meta.validate()
        host, port = meta.address()
        self.meta, self._where = meta, f"{host}:{port}"
        client = redis_client(meta, self.client_name)
        try:
            await client.ping()
            replication = await client.info("replication")
            script = client.register_script(UNLOCK_SCRIPT)
            await client.script_load(UNLOCK_SCRIPT)
        except (RedisError, OSError) as exc:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
            raise LockError(f"lock.redis: cannot connect to redis at {self._where}: {exc}") from exc
        replicas = int(replication.get("connected_slaves", 0) or 0)
        if replicas > 0:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
            raise LockError(
                f"lock.redis: the server at {self._where} has {replicas} replica(s); "
                "replication is not supported"
            )
        self._client, self._unlock = client, script

    def features(self) -> frozenset[Feature]:
        return frozenset()

    async def close(self) -> None:
        client, self._client, self._unlock = self._client, None, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def try_lock(self, resource_id: str, lock_owner: str, expiry_seconds: int) -> bool:
        client, _ = self._require()
        try:
            ok = await client.set(resource_id, lock_owner, nx=True, px=expiry_seconds * 1000)
        except (RedisError, OSError) as exc:
            raise LockError(f"lock.redis at {self._where}: lock {resource_id!r}: {exc}") from exc
        return bool(ok)

    async def unlock(self, resource_id: str, lock_owner: str) -> UnlockStatus:
        client, script = self._require()
        try:
            reply = await script(keys=[resource_id], args=[lock_owner], client=client)
        except (RedisError, OSError) as exc:
            raise LockError(f"lock.redis at {self._where}: unlock {resource_id!r}: {exc}") from exc
        n = int(reply)
        if n >= 0:
            return UnlockStatus.SUCCESS
        if n == -1:
            return UnlockStatus.LOCK_DOES_NOT_EXIST
        if n == -2:
            return UnlockStatus.LOCK_BELONGS_TO_OTHERS
        return UnlockStatus.INTERNAL_ERROR

    def _require(self) -> tuple[aioredis.Redis, AsyncScript]:
        if self._client is None or self._unlock is None:
            raise LockError("lock.redis store is not initialised or already closed")
        return self._client, self._unlock
