"""The `state.redis` store: Dapr's hash-per-key layout, written by Lua scripts that check etags."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pillion.components.metadata import (
    ComponentInfo,
    decode,
)
from pillion.components.redisconn import RedisConnMetadata, millis_integers, redis_client
from pillion.components.state.api import (
    TTL_KEY,
    BulkGetItem,
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    Feature,
    GetRequest,
    GetResponse,
    Operation,
    SetRequest,
    StateError,
    StateStore,
)
from pillion.components.state.ttl import expiry_metadata, parse_ttl

log = logging.getLogger(__name__)

_FEATURES = frozenset({Feature.ETAG, Feature.TRANSACTIONAL, Feature.TTL})

# The hash fields of a state key, as Dapr writes them: the value bytes and an integer version
# whose decimal text is the etag.
DATA_FIELD = "data"
VERSION_FIELD = "version"

# Highest version this database has handed out. A key created (or recreated after a delete or
# expiry) starts above it, so an etag from an earlier life of the key never matches again.
# No Dapr state key can start with "||": app ids and key prefixes are never empty.
SEQUENCE_KEY = "||pillion||state-version"

# Keys per read script call; a bulk get of more sends several calls in one pipeline, so one
# call never holds the server for long.
_READ_CHUNK = 256

# Dapr reads a bare integer in these durations as milliseconds (its redis Duration type).
# Dapr parses redis etags with Go's strconv.Atoi: an optional sign and decimal digits.
_ETAG = re.compile(r"[+-]?[0-9]+")
_INT64 = 2**63

# For every key: data, version and PTTL. A string value (written by very old Dapr versions)
# comes back with no version. A key of another type, or a hash without both fields, yields an
# error text in place of the data and -3 in place of the PTTL.
_READ_SCRIPT = """
local out = {}
for _, key in ipairs(KEYS) do
  local data, version, pttl = false, false, -2
  local kind = redis.call("TYPE", key)["ok"]
  if kind == "hash" then
    local fields = redis.call("HMGET", key, "data", "version")
    data, version = fields[1], fields[2]
    pttl = redis.call("PTTL", key)
    if not data or not version then
      data, version, pttl = "hash has no 'data' or 'version' field", false, -3
    end
  elseif kind == "string" then
    data = redis.call("GET", key)
    pttl = redis.call("PTTL", key)
  elseif kind ~= "none" then
    data, pttl = "holds a " .. kind .. " value, not a state hash", -3
  end
  out[#out + 1] = data
  out[#out + 1] = version
  out[#out + 1] = pttl
end
return out
"""
_READ_ERROR = -3

# Applies sets and deletes atomically: every check runs before anything is written, so a
# failed check leaves the database untouched. KEYS[1] is SEQUENCE_KEY and KEYS[i + 1] the key
# of operation i. ARGV holds five values per operation: kind (s = set, d = delete); check
# ("" = none, e = the version must equal the etag, n = the key must not exist); etag; data;
# ttl (seconds, 0 = no expiry). Returns 0, or the number of the first operation whose check
# failed. Later operations see the effect of earlier ones on the same key.
_WRITE_SCRIPT = """
local seq0 = tonumber(redis.call("GET", KEYS[1]) or "0")
local seq = seq0
local known = {}
local function look(key)
  local s = known[key]
  if s == nil then
    local kind = redis.call("TYPE", key)["ok"]
    if kind == "none" then
      s = {exists = false, version = false, foreign = false}
    elseif kind == "hash" then
      s = {exists = true, version = redis.call("HGET", key, "version"), foreign = false}
    else
      s = {exists = true, version = false, foreign = true}
    end
    known[key] = s
  end
  return s
end
local n = #KEYS - 1
local versions, replace = {}, {}
for i = 1, n do
  local key, a = KEYS[i + 1], (i - 1) * 5
  local s = look(key)
  local check = ARGV[a + 2]
  if (check == "e" and s.version ~= ARGV[a + 3]) or (check == "n" and s.exists) then
    return i
  end
  local cur = s.version and tonumber(s.version)
  if cur and cur > seq then
    seq = cur
  end
  if ARGV[a + 1] == "s" then
    local v
    if cur then v = cur + 1 else v = seq + 1 end
    if v > seq then seq = v end
    versions[i] = string.format("%d", v)
    replace[i] = s.foreign
    known[key] = {exists = true, version = versions[i], foreign = false}
  else
    known[key] = {exists = false, version = false, foreign = false}
  end
end
for i = 1, n do
  local key, a = KEYS[i + 1], (i - 1) * 5
  if ARGV[a + 1] == "s" then
    if replace[i] then
      redis.call("DEL", key)
    end
    redis.call("HSET", key, "data", ARGV[a + 4], "version", versions[i])
    local ttl = tonumber(ARGV[a + 5])
    if ttl > 0 then
      redis.call("EXPIRE", key, ttl)
    else
      redis.call("PERSIST", key)
    end
  else
    redis.call("DEL", key)
  end
end
if seq > seq0 then
  redis.call("SET", KEYS[1], string.format("%d", seq))
end
return 0
"""

# Operation kinds and checks, as the write script spells them.
_SET, _DELETE = "s", "d"
_NO_CHECK, _CHECK_ETAG, _CHECK_ABSENT = "", "e", "n"


@dataclass(frozen=True)
class RedisStateMetadata(RedisConnMetadata):
    """Dapr's `state.redis` metadata (single node only: no Cluster, Sentinel or client certs).

    `actorStateStore` and `keyPrefix` belong to the runtime and are not read here; Dapr's
    connection-tuning names not listed (maxConnAge, minIdleConns, idle*) are accepted and
    ignored.
    """

    # Default TTL of every write that names none; 0 or negative means none, as in Dapr.
    ttl_in_seconds: int | None = field(default=None, metadata={"name": "ttlInSeconds"})
    # Accepted and ignored with a warning: pillion's redis store has no query API.
    query_indexes: str = field(default="", metadata={"name": "queryIndexes"})

    def default_ttl(self) -> int:
        """Seconds every write expires after unless it names a TTL; 0 for never."""
        return self.ttl_in_seconds if self.ttl_in_seconds and self.ttl_in_seconds > 0 else 0


_millis_integers = millis_integers


def _version(key: str, etag: str) -> str:
    """The etag as the decimal version the script compares with; ETagInvalid if it is none."""
    if _ETAG.fullmatch(etag) is None or not -_INT64 <= int(etag) < _INT64:
        raise ETagInvalid(f"invalid etag {etag!r} for key {key!r}: expected an integer version")
    return str(int(etag))


# One operation as the write script takes it: key, kind, check, etag, data, ttl.
_Op = tuple[str, str, str, str, bytes, int]


class RedisStateStore(StateStore):
    """State in Redis, laid out as Dapr's `state.redis` lays it out, so both can share data.

    Each key is a hash with `data` (the value bytes) and `version` (an integer; its decimal
    text is the etag). Every write, single or transactional, is one call of a Lua script that
    checks all etags before writing anything, so concurrent writers with the same etag get
    exactly one success. Versions rise by one per write of a key; a key created anew starts
    above every version handed out before (see SEQUENCE_KEY). TTLs are Redis expiries.
    """

    def __init__(self) -> None:
        self.meta: RedisStateMetadata | None = None
        # Set on every connection (CLIENT SETNAME), so operators and tests can find them.
        self.client_name = f"pillion-state-{uuid.uuid4().hex[:12]}"
        self._client: aioredis.Redis | None = None
        self._where = ""
        self._default_ttl = 0
        self._read: AsyncScript | None = None
        self._write: AsyncScript | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(RedisStateMetadata, _millis_integers(info.properties))
        meta.validate()
        if meta.query_indexes.strip():
            log.warning("state.redis %s: queryIndexes is not supported and is ignored", info.name)
        host, port = meta.address()
        self.meta, self._where = meta, f"{host}:{port}"
        self._default_ttl = meta.default_ttl()
        client = redis_client(meta, self.client_name)
        try:
            await client.ping()
            read = client.register_script(_READ_SCRIPT)
            write = client.register_script(_WRITE_SCRIPT)
            # Loading now turns a server that refuses scripts into an init error, not a
            # failure of the first request.
            await client.script_load(_READ_SCRIPT)
            await client.script_load(_WRITE_SCRIPT)
        except (RedisError, OSError) as exc:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
            raise StateError(
                f"redis store: cannot connect to redis at {self._where}: {exc}"
            ) from exc
        self._client, self._read, self._write = client, read, write

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    def max_ops(self) -> int:
        return 0

    async def close(self) -> None:
        client, self._client = self._client, None
        self._read = self._write = None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, req: GetRequest) -> GetResponse | None:
        client, read, _ = self._require()
        try:
            reply = await read(keys=[req.key], client=client)
        except (RedisError, OSError) as exc:
            raise self._error(f"get {req.key!r}", exc) from exc
        data, version, pttl = reply
        if pttl == _READ_ERROR:
            raise StateError(f"redis store: key {req.key!r} {_text(data)}")
        if data is None:
            return None
        return GetResponse(data, _etag(version), _expiry(pttl))

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        if not reqs:
            return []
        client, read, _ = self._require()
        keys = list(dict.fromkeys(r.key for r in reqs))
        chunks = [keys[i : i + _READ_CHUNK] for i in range(0, len(keys), _READ_CHUNK)]
        try:
            replies = await self._read_chunks(client, read, chunks)
        except (RedisError, OSError) as exc:
            raise self._error(f"bulk get of {len(keys)} keys", exc) from exc
        found: dict[str, BulkGetItem] = {}
        flat = [v for reply in replies for v in reply]
        for i, key in enumerate(keys):
            data, version, pttl = flat[3 * i : 3 * i + 3]
            if pttl == _READ_ERROR:
                found[key] = BulkGetItem(key, error=f"redis store: key {key!r} {_text(data)}")
            elif data is None:
                found[key] = BulkGetItem(key)
            else:
                found[key] = BulkGetItem(key, data, _etag(version), _expiry(pttl))
        return [found[r.key] for r in reqs]

    async def _read_chunks(
        self, client: aioredis.Redis, read: AsyncScript, chunks: list[list[str]]
    ) -> list[Any]:
        """The read script's reply for each chunk, in one round trip.

        A pipeline (not a transaction: reads need none) of EVALSHA calls. redis-py's own script
        support in pipelines asks SCRIPT EXISTS first, a second round trip on every call; here
        the script is loaded only when the server answers NOSCRIPT (after a restart or SCRIPT
        FLUSH), and the reads are sent again.
        """

        async def send() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for chunk in chunks:
                pipe.evalsha(read.sha, len(chunk), *chunk)
            replies: list[Any] = await pipe.execute()
            return replies

        try:
            return await send()
        except NoScriptError:
            read.sha = await client.script_load(_READ_SCRIPT)
        return await send()

    # -- writes ------------------------------------------------------------------------------

    async def set(self, req: SetRequest) -> None:
        await self._apply([self._set_op(req)], "set")

    async def delete(self, req: DeleteRequest) -> None:
        await self._apply([self._delete_op(req)], "delete")

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        if not ops:
            return
        # Every etag and TTL is validated before the script runs, so a bad one writes nothing.
        encoded: list[_Op] = []
        for op in ops:
            if isinstance(op, SetRequest):
                encoded.append(self._set_op(op))
            elif isinstance(op, DeleteRequest):
                encoded.append(self._delete_op(op))
            else:
                raise ValueError(f"unsupported transaction operation {op!r}")
        await self._apply(encoded, "transaction")

    def _set_op(self, req: SetRequest) -> _Op:
        # Absent: the component default, else no expiry; -1: none, dropping an earlier one.
        ttl = self._default_ttl
        if req.metadata and req.metadata.get(TTL_KEY):
            ttl = parse_ttl(req.metadata) or 0
        if req.concurrency == Concurrency.LAST_WRITE:
            return (req.key, _SET, _NO_CHECK, "", req.value, ttl)
        if req.etag:
            return (req.key, _SET, _CHECK_ETAG, _version(req.key, req.etag), req.value, ttl)
        if req.concurrency == Concurrency.FIRST_WRITE:
            return (req.key, _SET, _CHECK_ABSENT, "", req.value, ttl)
        return (req.key, _SET, _NO_CHECK, "", req.value, ttl)

    def _delete_op(self, req: DeleteRequest) -> _Op:
        if req.etag and req.concurrency != Concurrency.LAST_WRITE:
            return (req.key, _DELETE, _CHECK_ETAG, _version(req.key, req.etag), b"", 0)
        return (req.key, _DELETE, _NO_CHECK, "", b"", 0)

    async def _apply(self, ops: Sequence[_Op], what: str) -> None:
        client, _, write = self._require()
        keys = [SEQUENCE_KEY]
        args: list[Any] = []
        for key, kind, check, etag, data, ttl in ops:
            keys.append(key)
            args += (kind, check, etag, data, ttl)
        try:
            failed = await write(keys=keys, args=args, client=client)
        except (RedisError, OSError) as exc:
            subject = f"{what} of {ops[0][0]!r}" if len(ops) == 1 else f"{what} of {len(ops)} ops"
            raise self._error(subject, exc) from exc
        if failed:
            key, _, check, *_ = ops[int(failed) - 1]
            if check == _CHECK_ABSENT:
                raise ETagMismatch(f"key {key!r} already exists (first-write)")
            raise ETagMismatch(f"etag mismatch for key {key!r}")

    # -- helpers ----------------------------------------------------------------------------

    def _require(self) -> tuple[aioredis.Redis, AsyncScript, AsyncScript]:
        if self._client is None or self._read is None or self._write is None:
            raise StateError("redis store: the component is closed")
        return self._client, self._read, self._write

    def _error(self, what: str, exc: BaseException) -> StateError:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            return StateError(
                f"redis store: {what} failed: cannot reach redis at {self._where}: {exc}"
            )
        return StateError(f"redis store: {what} failed: {exc}")


def _etag(version: bytes | None) -> str | None:
    return None if version is None else version.decode("ascii", "replace")


def _expiry(pttl: int) -> dict[str, str]:
    # PTTL: -1 when the key never expires; otherwise milliseconds left.
    return expiry_metadata(None if pttl < 0 else time.time() + pttl / 1000)


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")
