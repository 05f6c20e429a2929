"""The `pubsub.sqlite` broker: durable topics and consumer groups in a file a host's sidecars share.

Schema (tables prefixed `pubsub_`, version in `pubsub_meta`):

- `messages(id AUTOINCREMENT, topic, data, metadata JSON, created, expires)`: the log. A publish
  stores a message only when its topic has a consumer group; nobody could ever read it otherwise.
- `groups(topic, grp, cursor)`: one row per (topic, consumer group); `cursor` is the highest
  message id the group has taken. A new group starts at the newest id ever assigned (Dapr's
  redis `$`: it gets what is published after it was created) and outlives restarts.
- `deliveries(topic, grp, msg_id, owner, due, attempts)`: messages taken but not yet done by a
  group. `owner` set: leased by that component instance until `due` (processingTimeout); owner
  NULL: a failed handler's message waiting until `due` (redeliverInterval). A row past `due` is
  claimable by any member of the group. Done = cursor passed it and no row left.
- `consumers(id, pid, proc_start, pidns)`: live component instances, so a crashed process's leases
  are released at once (its pid is gone) instead of after processingTimeout.

Claims run in `BEGIN IMMEDIATE` transactions (due deliveries first, then fresh messages after the
cursor), so two processes never lease one message at once. Acks, nacks and publishes queue up and
commit together on the next loop iteration. After a commit that adds work, the publisher sends a
unix datagram (the topic names) to every socket in `<file>.notify/`, one per component instance;
a 250 ms poll covers lost datagrams, and a subscription also wakes when its next lease or
redelivery falls due. Retention deletes messages every group of their topic is done with, expired
ones (`ttlInSeconds`) and those older than `maxMessageAge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.pubsub.api import (
    TTL_KEY,
    BulkEntry,
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
    Subscription,
)
from pillion.components.sqlitebusy import is_busy, retry_busy

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
# SQLITE_BUSY and SQLITE_LOCKED: another connection holds the lock we need.
# Queued writes committed per transaction at most, so one flush holds the loop briefly.
_MAX_BATCH = 1000
# Rows deleted per retention transaction.
_CLEANUP_CHUNK = 1000
# How long closing a subscription waits for running handlers before giving their messages back.
DRAIN_S = 5.0
# How often an instance looks for crashed processes' leases.
REAP_INTERVAL_S = 1.0
# Longest unix socket path bind() accepts (sun_path is 108 bytes with its NUL).
_SUN_PATH_MAX = 107
# A datagram longer than this names no topics and wakes every subscription instead.
_MAX_NOTE = 8192
_NO_CURSOR = 2**63 - 1


@dataclass(frozen=True)
class SQLitePubSubMetadata:
    """Metadata of `pubsub.sqlite`; names follow Dapr's redis and sqlite components."""

    connection_string: str = field(
        default="", metadata={"name": "connectionString", "aliases": ("databaseFile",)}
    )
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    concurrency: int = field(default=10, metadata={"name": "concurrency"})
    processing_timeout: Seconds = field(default=Seconds(60), metadata={"name": "processingTimeout"})
    redeliver_interval: Seconds = field(default=Seconds(5), metadata={"name": "redeliverInterval"})
    poll_interval: Seconds = field(default=Seconds(0.25), metadata={"name": "pollInterval"})
    max_message_age: Seconds = field(
        default=Seconds(7 * 24 * 3600), metadata={"name": "maxMessageAge"}
    )
    cleanup_interval: Seconds = field(default=Seconds(10), metadata={"name": "cleanupInterval"})
    busy_timeout: Seconds = field(default=Seconds(5), metadata={"name": "busyTimeout"})
    disable_wal: bool = field(default=False, metadata={"name": "disableWAL"})

    def validate(self) -> None:
        if not self.connection_string.strip():
            raise ComponentConfigError("connectionString", "is required (a file path)")
        if self.concurrency < 1:
            raise ComponentConfigError("concurrency", "must be at least 1")
        for name, value in (
            ("processingTimeout", self.processing_timeout),
            ("pollInterval", self.poll_interval),
            ("cleanupInterval", self.cleanup_interval),
        ):
            if value <= 0:
                raise ComponentConfigError(name, "must be positive")
        for name, value in (
            ("redeliverInterval", self.redeliver_interval),
            ("maxMessageAge", self.max_message_age),
            ("busyTimeout", self.busy_timeout),
        ):
            if value < 0:
                raise ComponentConfigError(name, "must not be negative")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pubsub_meta (
    key TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pubsub_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    metadata TEXT NULL,
    created REAL NOT NULL,
    expires REAL NULL
);
CREATE INDEX IF NOT EXISTS pubsub_messages_topic ON pubsub_messages (topic, id);
CREATE INDEX IF NOT EXISTS pubsub_messages_expires ON pubsub_messages (expires)
    WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS pubsub_groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pubsub_deliveries (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    owner TEXT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (topic, grp, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pubsub_deliveries_owner ON pubsub_deliveries (owner)
    WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS pubsub_consumers (
    id TEXT NOT NULL PRIMARY KEY,
    pid INTEGER NOT NULL,
    proc_start INTEGER NOT NULL,
    pidns TEXT NOT NULL,
    started REAL NOT NULL
)
"""

# The newest message id ever assigned (AUTOINCREMENT never reuses one, even after deletes).
_LAST_ID = "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'pubsub_messages'), 0)"
_SQL = {
    "meta_init": "INSERT OR IGNORE INTO pubsub_meta (key, value) VALUES (?, ?)",
    "meta_get": "SELECT value FROM pubsub_meta WHERE key = ?",
    "group_create": (
        "INSERT INTO pubsub_groups (topic, grp, cursor, created) "
        f"VALUES (?, ?, {_LAST_ID}, ?) ON CONFLICT DO NOTHING"
    ),
    "has_group": "SELECT EXISTS (SELECT 1 FROM pubsub_groups WHERE topic = ?)",
    "insert": (
        "INSERT INTO pubsub_messages (topic, data, metadata, created, expires) "
        "VALUES (?, ?, ?, ?, ?)"
    ),
    "peek": (
        "SELECT EXISTS (SELECT 1 FROM pubsub_messages WHERE topic = ?1 AND id > "
        " COALESCE((SELECT cursor FROM pubsub_groups WHERE topic = ?1 AND grp = ?2), -1)),"
        " (SELECT MIN(due) FROM pubsub_deliveries WHERE topic = ?1 AND grp = ?2)"
    ),
    "due": (
        "SELECT msg_id FROM pubsub_deliveries WHERE topic = ? AND grp = ? AND due <= ? "
        "ORDER BY msg_id LIMIT ?"
    ),
    "lease": (
        "UPDATE pubsub_deliveries SET owner = ?, due = ?, attempts = attempts + 1 "
        "WHERE topic = ? AND grp = ? AND msg_id = ? RETURNING attempts"
    ),
    "cursor": "SELECT cursor FROM pubsub_groups WHERE topic = ? AND grp = ?",
    "fresh": "SELECT id FROM pubsub_messages WHERE topic = ? AND id > ? ORDER BY id LIMIT ?",
    "take": (
        "INSERT INTO pubsub_deliveries (topic, grp, msg_id, owner, due, attempts) "
        "VALUES (?, ?, ?, ?, ?, 1)"
    ),
    "advance": "UPDATE pubsub_groups SET cursor = ? WHERE topic = ? AND grp = ? AND cursor < ?",
    "load": "SELECT id, data, metadata, expires FROM pubsub_messages WHERE id IN ({marks})",
    "ack": "DELETE FROM pubsub_deliveries WHERE topic = ? AND grp = ? AND msg_id = ?",
    # Only the current holder may put a message back; another member may own it by now.
    "nack": (
        "UPDATE pubsub_deliveries SET owner = NULL, due = ? "
        "WHERE topic = ? AND grp = ? AND msg_id = ? AND owner = ?"
    ),
    "consumer_add": (
        "INSERT OR REPLACE INTO pubsub_consumers (id, pid, proc_start, pidns, started) "
        "VALUES (?, ?, ?, ?, ?)"
    ),
    "consumer_del": "DELETE FROM pubsub_consumers WHERE id = ?",
    "consumers": "SELECT id, pid, proc_start, pidns FROM pubsub_consumers WHERE id != ?",
    "release_owner": "UPDATE pubsub_deliveries SET owner = NULL, due = ? WHERE owner = ?",
    "claim_cleanup": (
        "INSERT INTO pubsub_meta (key, value) VALUES ('last-cleanup', ?) ON CONFLICT (key) "
        "DO UPDATE SET value = excluded.value WHERE CAST(value AS REAL) <= ?"
    ),
    # Per topic, the lowest message id some group still needs (cursor + 1, or an open delivery).
    "low_water": (
        "SELECT g.topic, MIN(MIN(g.cursor + 1, COALESCE((SELECT MIN(d.msg_id) "
        " FROM pubsub_deliveries d WHERE d.topic = g.topic AND d.grp = g.grp), g.cursor + 1))) "
        "FROM pubsub_groups g GROUP BY g.topic"
    ),
    "purge_done": (
        "DELETE FROM pubsub_messages WHERE id IN (SELECT id FROM pubsub_messages "
        "WHERE topic = ? AND id < ? ORDER BY id LIMIT ?)"
    ),
    "purge_orphans": (
        "DELETE FROM pubsub_messages WHERE id IN (SELECT id FROM pubsub_messages "
        "WHERE topic NOT IN (SELECT topic FROM pubsub_groups) LIMIT ?)"
    ),
    "purge_expired": (
        "DELETE FROM pubsub_messages WHERE id IN (SELECT id FROM pubsub_messages "
        "WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)"
    ),
    # Ids grow with time, so the oldest messages are the first ids: look at one chunk from the
    # start rather than scanning the table for `created`.
    "purge_aged": (
        "DELETE FROM pubsub_messages WHERE id IN (SELECT id FROM pubsub_messages "
        "ORDER BY id LIMIT ?) AND created < ?"
    ),
    "purge_deliveries": (
        "DELETE FROM pubsub_deliveries WHERE NOT EXISTS "
        "(SELECT 1 FROM pubsub_messages m WHERE m.id = msg_id)"
    ),
}


def _proc_start(pid: int | str) -> int | None:
    """Process start time in clock ticks (field 22 of /proc/<pid>/stat), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None  # a zombie is dead
    return int(rest[19])


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_gone(pid: int, proc_start: int) -> bool:
    """Whether process `pid` of our pid namespace is certainly not the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    start = _proc_start(pid)
    if start is None:
        # A zombie, or /proc hides it (hidepid): only the first is certain.
        return os.path.exists(f"/proc/{pid}")
    return start != proc_start


def parse_ttl(metadata: Mapping[str, str]) -> int | None:
    """`ttlInSeconds` as Dapr's components read it: a positive integer, or absent."""
    raw = next((v for k, v in metadata.items() if k.lower() == TTL_KEY.lower()), "")
    if not raw:
        return None
    try:
        ttl = int(raw.strip())
    except ValueError:
        raise PubSubError(f"{TTL_KEY} must be an integer, got {raw!r}") from None
    if ttl <= 0:
        raise PubSubError(f"{TTL_KEY} must be greater than zero, got {ttl}")
    return ttl


def _sub_option(metadata: Mapping[str, str], name: str) -> str | None:
    for k, v in metadata.items():
        if k.lower() == name.lower() and v.strip():
            return v.strip()
    return None


def _notify_dir(target: str) -> Path | None:
    """`<file>.notify` beside a database file; None for in-memory databases."""
    if target.startswith("file:"):
        path, _, query = target[5:].partition("?")
        if "mode=memory" in query or not path or path == ":memory:":
            return None
        target = path
    if target == ":memory:":
        return None
    p = Path(target)
    return p.with_name(p.name + ".notify")


# Kinds of queued writes.
_PUBLISH, _ACK, _NACK, _RELEASE = 0, 1, 2, 3


class _Unit:
    __slots__ = ("enqueued", "future", "kind", "payload")

    def __init__(
        self, kind: int, payload: Any, future: asyncio.Future[None], enqueued: float
    ) -> None:
        self.kind = kind
        self.payload = payload
        self.future = future
        self.enqueued = enqueued


@dataclass(slots=True)
class _Claimed:
    id: int
    data: bytes
    metadata: Mapping[str, str]
    attempt: int


class _SQLiteSubscription:
    """One subscription: a pump claiming up to `limit` messages and a task per handler."""

    def __init__(
        self, broker: SQLitePubSub, topic: str, group: str, handler: Handler, limit: int
    ) -> None:
        self.topic = topic
        self.group = group
        self._broker = broker
        self._handler = handler
        self._limit = limit
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        # Handler task -> message id, for giving back what closing interrupts.
        self._running: dict[asyncio.Task[None], int] = {}
        self._closed = False
        self._pump = asyncio.get_running_loop().create_task(
            self._pump_forever(), name=f"pubsub.sqlite {topic}/{group}"
        )

    def wake(self) -> None:
        self._wake.set()

    async def _pump_forever(self) -> None:
        broker, meta = self._broker, self._broker._meta()
        backoff = 0.0
        while True:
            free = self._limit - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            # Cleared before looking, so a wake-up that arrives meanwhile is not slept through.
            self._wake.clear()
            try:
                now = time.time()
                has_new, next_due = await broker._read(
                    lambda: broker._db().execute(_SQL["peek"], (self.topic, self.group)).fetchone()
                )
                claimed: list[_Claimed] = []
                if has_new or (next_due is not None and next_due <= now):
                    claimed = await broker._claim(self, free)
                backoff = 0.0
            except PubSubError as exc:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning("pubsub.sqlite: fetching %s failed, retrying: %s", self.topic, exc)
                await asyncio.sleep(backoff)
                continue
            for c in claimed:
                task = asyncio.get_running_loop().create_task(self._handle(c))
                self._running[task] = c.id
                task.add_done_callback(self._done)
            if claimed:
                continue  # there may be more
            timeout = meta.poll_interval
            if next_due is not None:
                timeout = min(timeout, max(0.0, next_due - time.time()) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()

    async def _handle(self, c: _Claimed) -> None:
        broker = self._broker
        msg = Message(self.topic, c.data, c.metadata, str(c.id), c.attempt)
        payload: tuple[Any, ...]
        try:
            await self._handler(msg)
        except Exception as exc:
            log.debug(
                "pubsub.sqlite: handler failed for %s #%d (attempt %d): %r",
                self.topic,
                c.id,
                c.attempt,
                exc,
            )
            due = time.time() + broker._meta().redeliver_interval
            kind, payload = _NACK, (self.topic, self.group, c.id, broker.owner, due)
        else:
            kind, payload = _ACK, (self.topic, self.group, c.id)
        try:
            # Shielded: closing must not cancel a handled message's ack half-way.
            await asyncio.shield(broker._submit(kind, payload))
        except PubSubError as exc:
            # The lease runs out and the message comes again: at least once, not lost.
            log.warning("pubsub.sqlite: recording the outcome of %s #%d: %s", self.topic, c.id, exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        interrupted: list[int] = []
        if self._running:
            running = dict(self._running)
            _, late = await asyncio.wait(set(running), timeout=DRAIN_S)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
            interrupted = [running[t] for t in late if t.cancelled()]
        broker = self._broker
        if interrupted and broker._conn is not None:
            # Unhandled messages go back at once rather than when their lease ends.
            with contextlib.suppress(PubSubError):
                await broker._submit(_RELEASE, (self.topic, self.group, interrupted, broker.owner))
        broker._forget(self)


class SQLitePubSub(PubSub):
    """Topics in a SQLite file every sidecar on the host shares; see the module docstring.

    All SQLite calls run inline on the event loop (microseconds each) with SQLite's busy timeout
    at 0: a lock held by another process is waited for with asyncio sleeps, never in SQLite.
    """

    def __init__(self) -> None:
        self.meta: SQLitePubSubMetadata | None = None
        # This instance's id: the owner of its leases and its row in pubsub_consumers.
        self.owner = uuid.uuid4().hex[:16]
        # Write transactions committed; lets tests see how well writes group.
        self.commits = 0
        self._group = ""
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._queue: list[_Unit] = []
        self._flush_handle: asyncio.Handle | None = None
        self._busy_attempts = 0
        self._subs: dict[str, set[_SQLiteSubscription]] = {}
        self._housekeeper: asyncio.Task[None] | None = None
        self._pidns = _pidns()
        # Wake-ups: our socket, where the others' are, and how to address a long path.
        self._notify_dir: Path | None = None
        self._sock: socket.socket | None = None
        self._sock_name = ""
        self._send_sock: socket.socket | None = None
        self._dir_fd: int | None = None
        self._peers: list[str] = []
        self._peers_mtime = -1
        self._peers_settled = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(SQLitePubSubMetadata, info.properties)
        meta.validate()
        self.meta = meta
        self._group = meta.consumer_id or info.app_id
        self._loop = asyncio.get_running_loop()
        target = meta.connection_string.strip()
        uri = target.startswith("file:")
        if not uri and target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: this class issues BEGIN/COMMIT itself. timeout=0: never sleep
            # inside SQLite while holding up the event loop.
            self._conn = sqlite3.connect(target, timeout=0, isolation_level=None, uri=uri)
        except sqlite3.Error as exc:
            raise PubSubError(f"sqlite open {target!r}: {exc}") from exc
        try:
            await self._retry_busy(self._setup, max(meta.busy_timeout, 5.0), "set up the database")
            start = _proc_start("self") or 0
            await self._write_now(
                lambda c: c.execute(
                    _SQL["consumer_add"],
                    (self.owner, os.getpid(), start, self._pidns, time.time()),
                ),
                "register the consumer",
            )
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        self._notify_dir = _notify_dir(target)
        self._bind_notify()
        self._closed = False
        self._housekeeper = self._loop.create_task(
            self._housekeep_forever(), name=f"pubsub.sqlite housekeeping {info.name}"
        )

    def _setup(self) -> None:
        conn = self._db()
        if not self._meta().disable_wal:
            # WAL lets readers in other processes proceed while one writes; NORMAL sync survives
            # application crashes. Switching needs a lock, hence the retries around _setup.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        # BEGIN IMMEDIATE serialises set-up across sidecars opening the same file at once.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(_SQL["meta_init"], ("schema-version", str(SCHEMA_VERSION)))
            row = conn.execute(_SQL["meta_get"], ("schema-version",)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise PubSubError(
                f"pubsub_meta records schema version {row[0] if row else None}, "
                f"this pillion understands {SCHEMA_VERSION}"
            )

    async def close(self) -> None:
        if self._conn is None:
            return
        self._closed = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                await sub.close()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        # Let queued writes (publishes being awaited, acks) commit before the connection goes.
        while self._queue:
            await asyncio.gather(*(u.future for u in list(self._queue)), return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        with contextlib.suppress(PubSubError):
            await self._write_now(
                lambda c: c.execute(_SQL["consumer_del"], (self.owner,)), "unregister"
            )
        self._unbind_notify()
        self._conn.close()
        self._conn = None

    def features(self) -> frozenset[Feature]:
        features = {Feature.MESSAGE_TTL, Feature.BULK_PUBLISH}
        if self._meta_or_default().concurrency == 1:
            features.add(Feature.ORDERED)
        return frozenset(features)

    # -- publish -----------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        row = self._row(data, metadata, time.time())
        await self._submit(_PUBLISH, (topic, [row]))

    async def bulk_publish(
        self, topic: str, entries: Sequence[BulkEntry], metadata: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        now = time.time()
        rows, failed = [], []
        for e in entries:
            try:
                rows.append(self._row(e.data, {**metadata, **e.metadata}, now))
            except PubSubError as exc:
                failed.append((e.entry_id, str(exc)))
        if failed:
            # One bad entry fails the request before anything is stored, like a bad publish.
            ok = {e for e, _ in failed}
            return failed + [
                (e.entry_id, "not published: another entry was invalid")
                for e in entries
                if e.entry_id not in ok
            ]
        if not rows:
            return []
        try:
            await self._submit(_PUBLISH, (topic, rows))
        except PubSubError as exc:
            return [(e.entry_id, str(exc)) for e in entries]
        return []

    def _row(
        self, data: bytes, metadata: Mapping[str, str], now: float
    ) -> tuple[bytes, str | None, float, float | None]:
        ttl = parse_ttl(metadata)
        meta_json = json.dumps(dict(metadata), separators=(",", ":")) if metadata else None
        return (bytes(data), meta_json, now, None if ttl is None else now + ttl)

    # -- subscribe ---------------------------------------------------------------------------

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> Subscription:
        if self._closed:
            raise PubSubError("pubsub.sqlite is closed")
        meta = self._meta()
        group = _sub_option(req.metadata, "consumerID") or self._group
        limit = meta.concurrency
        raw = _sub_option(req.metadata, "concurrency")
        if raw is not None:
            try:
                limit = int(raw)
            except ValueError:
                raise PubSubError(f"subscription metadata concurrency: {raw!r}") from None
            if limit < 1:
                raise PubSubError("subscription metadata concurrency must be at least 1")
        await self._write_now(
            lambda c: c.execute(_SQL["group_create"], (req.topic, group, time.time())),
            f"create consumer group {group!r} of {req.topic!r}",
        )
        sub = _SQLiteSubscription(self, req.topic, group, handler, limit)
        self._subs.setdefault(req.topic, set()).add(sub)
        return sub

    def _forget(self, sub: _SQLiteSubscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.topic]

    async def _claim(self, sub: _SQLiteSubscription, n: int) -> list[_Claimed]:
        return await self._retry_busy(
            lambda: self._claim_sync(sub.topic, sub.group, n),
            self._meta().busy_timeout,
            f"claim messages of {sub.topic!r}",
        )

    def _claim_sync(self, topic: str, group: str, n: int) -> list[_Claimed]:
        """Lease up to `n` messages for `group`: due redeliveries first, then fresh ones."""
        conn, meta = self._db(), self._meta()
        now = time.time()
        lease_end = now + meta.processing_timeout
        conn.execute("BEGIN IMMEDIATE")
        try:
            attempts: dict[int, int] = {}
            for (mid,) in conn.execute(_SQL["due"], (topic, group, now, n)).fetchall():
                row = conn.execute(_SQL["lease"], (self.owner, lease_end, topic, group, mid))
                attempts[mid] = row.fetchone()[0]
            if len(attempts) < n:
                cur = conn.execute(_SQL["cursor"], (topic, group)).fetchone()
                if cur is None:
                    # The group row vanished (a hand-edited file): start again from now.
                    conn.execute(_SQL["group_create"], (topic, group, now))
                    cur = conn.execute(_SQL["cursor"], (topic, group)).fetchone()
                fresh = [
                    r[0] for r in conn.execute(_SQL["fresh"], (topic, cur[0], n - len(attempts)))
                ]
                if fresh:
                    conn.executemany(
                        _SQL["take"], [(topic, group, mid, self.owner, lease_end) for mid in fresh]
                    )
                    conn.execute(_SQL["advance"], (fresh[-1], topic, group, fresh[-1]))
                    attempts.update(dict.fromkeys(fresh, 1))
            out: list[_Claimed] = []
            if attempts:
                ids = sorted(attempts)
                sql = _SQL["load"].format(marks=",".join("?" * len(ids)))
                found = {r[0]: r for r in conn.execute(sql, ids)}
                gone = []
                for mid in ids:
                    r = found.get(mid)
                    if r is None or (r[3] is not None and r[3] <= now):
                        gone.append((topic, group, mid))  # expired or purged: done, undelivered
                        continue
                    md: dict[str, str] = json.loads(r[2]) if r[2] else {}
                    out.append(_Claimed(mid, r[1], md, attempts[mid]))
                if gone:
                    conn.executemany(_SQL["ack"], gone)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    # -- queued writes -----------------------------------------------------------------------

    def _submit(self, kind: int, payload: Any) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None or self._conn is None or (self._closed and kind == _PUBLISH):
            raise PubSubError("pubsub.sqlite is closed")
        fut = loop.create_future()
        self._queue.append(_Unit(kind, payload, fut, loop.time()))
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Commit every queued write in one transaction, then settle their futures."""
        self._flush_handle = None
        loop = self._loop
        assert loop is not None
        queue = self._queue
        if len(queue) > _MAX_BATCH:
            self._queue = queue[_MAX_BATCH:]
            queue = queue[:_MAX_BATCH]
            self._flush_handle = loop.call_soon(self._flush)
        else:
            self._queue = []
        units = [u for u in queue if not u.future.done()]
        if not units:
            return
        conn = self._conn
        if conn is None:
            for u in units:
                _settle(u, PubSubError("pubsub.sqlite is closed"))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if is_busy(exc):
                self._requeue_busy(units, exc)
            else:
                for u in units:
                    _settle(u, PubSubError(f"sqlite begin: {exc}"))
            return
        self._busy_attempts = 0
        published: set[str] = set()
        returned: set[str] = set()
        try:
            now = time.time()
            has_group: dict[str, bool] = {}
            for u in units:
                if u.kind == _PUBLISH:
                    topic, rows = u.payload
                    if topic not in has_group:
                        has_group[topic] = bool(
                            conn.execute(_SQL["has_group"], (topic,)).fetchone()[0]
                        )
                    if has_group[topic]:
                        # No group, no reader ever: a new group starts after this message.
                        conn.executemany(_SQL["insert"], [(topic, *r) for r in rows])
                        published.add(topic)
                elif u.kind == _ACK:
                    conn.execute(_SQL["ack"], u.payload)
                elif u.kind == _NACK:
                    topic, group, mid, owner, due = u.payload
                    conn.execute(_SQL["nack"], (due, topic, group, mid, owner))
                    returned.add(topic)
                else:
                    topic, group, mids, owner = u.payload
                    conn.executemany(
                        _SQL["nack"], [(now, topic, group, mid, owner) for mid in mids]
                    )
                    published.add(topic)
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = PubSubError(f"sqlite write: {exc}")
            for u in units:
                _settle(u, failure)
            return
        except BaseException:
            # A bug here must not leave callers awaiting forever.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for u in units:
                _settle(u, PubSubError("pubsub.sqlite: write failed"))
            raise
        for u in units:
            _settle(u, None)
        if published:
            self._notify(published)
        for topic in published | returned:
            self._wake_local(topic)

    def _requeue_busy(self, units: list[_Unit], exc: sqlite3.Error) -> None:
        """Another process holds the write lock: fail units that waited too long, retry the rest."""
        loop, budget = self._loop, self._meta().busy_timeout
        assert loop is not None
        now = loop.time()
        waiting = []
        for u in units:
            if now - u.enqueued >= budget:
                _settle(u, PubSubError(f"sqlite write (waited {budget:g}s for the lock): {exc}"))
            else:
                waiting.append(u)
        if not waiting:
            self._busy_attempts = 0
            return
        self._queue[:0] = waiting
        delay = min(0.0005 * (2**self._busy_attempts), 0.02)
        self._busy_attempts += 1
        if self._flush_handle is None:
            self._flush_handle = loop.call_later(delay, self._flush)

    async def _write_now(self, fn: Callable[[sqlite3.Connection], Any], what: str) -> None:
        """Run `fn` in its own write transaction, waiting out other processes' locks."""

        def txn() -> None:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self._retry_busy(txn, self._meta().busy_timeout, what)

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise PubSubError(f"sqlite read: {exc}") from exc
        return await self._retry_busy(fn, self._meta().busy_timeout, "read")

    async def _retry_busy(self, fn: Callable[[], T], budget: float, what: str) -> T:
        return await retry_busy(fn, budget, what, PubSubError)

    # -- wake-ups ----------------------------------------------------------------------------

    def _bind_notify(self) -> None:
        directory = self._notify_dir
        if directory is None:
            return
        name = f"{self.owner}.sock"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if len(str(directory / name)) > _SUN_PATH_MAX:
                # Too long for sun_path: address the folder through a descriptor instead.
                self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(self._address(name))
            except OSError:
                sock.close()
                raise
            send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            send.setblocking(False)
        except OSError as exc:
            log.info("pubsub.sqlite: no wake-ups via %s (%s); polling instead", directory, exc)
            return
        self._sock, self._send_sock, self._sock_name = sock, send, name
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_datagram)

    def _unbind_notify(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self._address(self._sock_name))
        if self._send_sock is not None:
            self._send_sock.close()
            self._send_sock = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _address(self, name: str) -> str:
        if self._dir_fd is not None:
            return f"/proc/self/fd/{self._dir_fd}/{name}"
        assert self._notify_dir is not None
        return str(self._notify_dir / name)

    def _on_datagram(self) -> None:
        sock = self._sock
        if sock is None:
            return
        topics: set[str] = set()
        everything = False
        while True:
            try:
                note = sock.recv(_MAX_NOTE + 16)
            except OSError:
                break
            if note == b"*" or not note:
                everything = True
            else:
                topics.update(note.decode("utf-8", "replace").split("\n"))
        for topic in list(self._subs) if everything else topics:
            self._wake_local(topic)

    def _wake_local(self, topic: str) -> None:
        for sub in self._subs.get(topic, ()):
            sub.wake()

    def _notify(self, topics: set[str]) -> None:
        """Tell every other instance on this file that `topics` have new work."""
        sock, directory = self._send_sock, self._notify_dir
        if sock is None or directory is None:
            return
        note = "\n".join(sorted(topics)).encode()
        if len(note) > _MAX_NOTE:
            note = b"*"
        try:
            # Listing costs more than the stat that tells whether the folder changed. Folder times
            # tick coarsely, so a listing taken soon after a change is not trusted (as git does
            # with racy index entries) and is taken again next time.
            mtime = os.stat(directory).st_mtime_ns
            if mtime != self._peers_mtime or not self._peers_settled:
                self._peers = [
                    n for n in os.listdir(directory) if n.endswith(".sock") and n != self._sock_name
                ]
                self._peers_mtime = mtime
                self._peers_settled = time.time_ns() - mtime > 50_000_000
        except OSError:
            return
        for name in self._peers:
            target = self._address(name)
            try:
                sock.sendto(note, target)
            except ConnectionRefusedError:
                # Nobody is bound there any more (a crashed process): clean it up.
                with contextlib.suppress(OSError):
                    os.unlink(target)
            except OSError:
                pass  # a full buffer (the receiver is due to wake anyway) or a vanished file

    # -- housekeeping ------------------------------------------------------------------------

    async def _housekeep_forever(self) -> None:
        meta = self._meta()
        last_cleanup = float("-inf")
        while True:
            try:
                await self.reap_dead_consumers()
                if time.monotonic() - last_cleanup >= meta.cleanup_interval:
                    last_cleanup = time.monotonic()
                    await self.cleanup()
            except PubSubError as exc:
                log.warning("pubsub.sqlite: housekeeping failed: %s", exc)
            await asyncio.sleep(min(REAP_INTERVAL_S, meta.cleanup_interval))

    async def reap_dead_consumers(self) -> int:
        """Release the leases of instances whose process has exited; returns how many instances."""
        if not self._pidns:
            return 0
        rows = await self._read(
            lambda: self._db().execute(_SQL["consumers"], (self.owner,)).fetchall()
        )
        # Another pid namespace (a container sharing the file) cannot be checked: lease expiry only.
        dead = [
            cid for cid, pid, start, ns in rows if ns == self._pidns and _process_gone(pid, start)
        ]
        if not dead:
            return 0

        def release(c: sqlite3.Connection) -> None:
            now = time.time()
            for cid in dead:
                c.execute(_SQL["release_owner"], (now, cid))
                c.execute(_SQL["consumer_del"], (cid,))

        await self._write_now(release, "release a crashed consumer's leases")
        log.info("pubsub.sqlite: released the leases of %d exited consumer(s)", len(dead))
        self._notify({"*"})
        for topic in list(self._subs):
            self._wake_local(topic)
        return len(dead)

    async def cleanup(self, force: bool = False) -> int:
        """Delete messages no group needs any more, expired or too old; returns how many.

        Sidecars sharing the file take turns (once per cleanupInterval between them) unless `force`.
        """
        meta = self._meta()
        now = time.time()
        if not force:
            claimed = False

            def claim(c: sqlite3.Connection) -> None:
                nonlocal claimed
                slack = now - 0.9 * meta.cleanup_interval
                claimed = c.execute(_SQL["claim_cleanup"], (repr(now), slack)).rowcount > 0

            await self._write_now(claim, "claim the cleanup turn")
            if not claimed:
                return 0
        lows = await self._read(lambda: self._db().execute(_SQL["low_water"]).fetchall())
        steps: list[tuple[str, tuple[Any, ...]]] = [
            ("purge_done", (topic, low, _CLEANUP_CHUNK)) for topic, low in lows
        ]
        steps.append(("purge_orphans", (_CLEANUP_CHUNK,)))
        steps.append(("purge_expired", (now, _CLEANUP_CHUNK)))
        if meta.max_message_age > 0:
            steps.append(("purge_aged", (_CLEANUP_CHUNK, now - meta.max_message_age)))
        total = 0
        for name, args in steps:
            while True:
                n = 0

                def purge(c: sqlite3.Connection, name: str = name, args: Any = args) -> None:
                    nonlocal n
                    n = c.execute(_SQL[name], args).rowcount

                await self._write_now(purge, "purge messages")
                total += n
                if n < _CLEANUP_CHUNK:
                    break
                await asyncio.sleep(0)  # let other work through between chunks
        if total:
            await self._write_now(lambda c: c.execute(_SQL["purge_deliveries"]), "purge deliveries")
            log.debug("pubsub.sqlite: purged %d messages", total)
        return total

    # -- helpers -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise PubSubError("pubsub.sqlite is closed")
        return self._conn

    def _meta(self) -> SQLitePubSubMetadata:
        if self.meta is None:
            raise PubSubError("pubsub.sqlite is not initialised")
        return self.meta

    def _meta_or_default(self) -> SQLitePubSubMetadata:
        return self.meta or SQLitePubSubMetadata()


def _settle(u: _Unit, outcome: BaseException | None) -> None:
    if u.future.done():
        return
    if outcome is None:
        u.future.set_result(None)
    else:
        u.future.set_exception(outcome)
