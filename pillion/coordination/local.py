"""The `local` coordination backend: membership for the sidecars of one host in a SQLite file."""

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from pillion.coordination.api import Member, MemberView

log = logging.getLogger("pillion.coordination.local")

T = TypeVar("T")

# How often a watcher re-checks the file when no datagram woke it (lost datagram, no socket).
POLL_S = 0.25
BUSY_TIMEOUT_S = 5.0

_SCHEMA = (
    # `fence` is reserved for claim tokens (actors, later) so the meta row never needs migrating.
    "CREATE TABLE IF NOT EXISTS meta ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " epoch INTEGER NOT NULL,"
    " fence INTEGER NOT NULL DEFAULT 0)",
    "INSERT OR IGNORE INTO meta (id, epoch, fence) VALUES (0, 0, 0)",
    "CREATE TABLE IF NOT EXISTS sessions ("
    " id TEXT PRIMARY KEY,"
    " member TEXT NOT NULL,"
    " pid INTEGER NOT NULL,"
    " proc_start INTEGER NOT NULL,"
    " pidns TEXT NOT NULL,"
    " expires_boot REAL NOT NULL)",
)


def boot_clock() -> float:
    """Seconds on CLOCK_BOOTTIME: monotonic, immune to NTP steps and shared by every process."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _proc_stat(pid: int | str) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses, so split after the last ')'; the rest starts
    # at field 3 (state), which puts field 22 (starttime) at index 19.
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0], int(rest[19])


def _own_pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_alive(pid: int, proc_start: int) -> bool:
    """Whether process `pid` of this pid namespace is the incarnation that started at `proc_start`.

    A stopped (SIGSTOP) process is alive; a zombie is dead (a killed child its parent has not
    waited for yet still has a /proc entry).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        # It exists but /proc hides it (mounted hidepid): only the TTL can tell.
        return True
    state, start = stat
    return state not in (b"Z", b"X") and start == proc_start


def _member_to_json(m: Member) -> str:
    return json.dumps(
        {
            "host": m.host,
            "app_id": m.app_id,
            "actor_types": sorted(m.actor_types),
            "session_id": m.session_id,
            "address": m.address,
            "namespace": m.namespace,
            "pid": m.pid,
            "api_level": m.api_level,
            "started_ms": m.started_ms,
            "grpc_address": m.grpc_address,
        },
        separators=(",", ":"),
    )


def _member_from_json(raw: str) -> Member:
    # Unknown keys are ignored and missing ones defaulted, so sidecars of neighbouring versions
    # can share one file.
    d: dict[str, Any] = json.loads(raw)
    return Member(
        host=str(d.get("host", "")),
        app_id=str(d.get("app_id", "")),
        actor_types=frozenset(str(t) for t in d.get("actor_types", ())),
        session_id=str(d.get("session_id", "")),
        address=str(d.get("address", "")),
        namespace=str(d.get("namespace", "")),
        pid=int(d.get("pid", 0)),
        api_level=int(d.get("api_level", 0)),
        started_ms=int(d.get("started_ms", 0)),
        grpc_address=str(d.get("grpc_address", "")),
    )


@dataclass(frozen=True, slots=True)
class _Row:
    session_id: str
    member: Member
    pid: int
    proc_start: int
    pidns: str
    expires_boot: float


@dataclass(frozen=True, slots=True)
class _Snapshot:
    epoch: int
    rows: tuple[_Row, ...]


class LocalSession:
    """A session in the local backend; renewed by a task every ttl/4 while the backend runs."""

    def __init__(self, backend: LocalBackend, member: Member, ttl_s: float, sent: float) -> None:
        self.id = member.session_id
        self.member = member
        self.ttl_s = ttl_s
        self.lost = asyncio.Event()
        # Others may take over only once the row's expires_boot (>= send time + ttl) has passed; we
        # stop trusting the session a margin earlier so our last effects land before that.
        self._margin = min(1.0, ttl_s / 5)
        self._backend = backend
        self._loop = asyncio.get_running_loop()
        self._valid_until = sent + ttl_s - self._margin
        self._closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._arm_watchdog()
        self._renewal: asyncio.Task[None] = asyncio.create_task(
            self._renew_loop(), name=f"pillion-coord-renew-{self.id}"
        )

    def valid_until(self) -> float:
        return self._valid_until

    async def close(self) -> None:
        """Delete the member record now and stop renewing; idempotent.

        valid_until() drops to -inf, but `lost` stays unset: a clean leave is not a loss, and a
        sidecar that rejoins on loss must not do so while shutting down.
        """
        if self._closed:
            return
        self._closed = True
        self._stop(lost=False)
        self._renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewal
        self._backend._forget(self)
        await self._backend._delete_session(self.id)

    def _arm_watchdog(self) -> None:
        # A timer, not the renewal task, declares the loss, so a stuck or dead renewal (a SQLite
        # lock held past busy_timeout, a cancelled task) still sets `lost` on time.
        if self._watchdog is not None:
            self._watchdog.cancel()
        delay = max(0.0, self._valid_until - time.monotonic())
        self._watchdog = self._loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        if time.monotonic() >= self._valid_until and not self.lost.is_set():
            log.warning("coordination session %s lost: not renewed in time", self.id)
            self._stop(lost=True)

    def _stop(self, *, lost: bool) -> None:
        self._valid_until = float("-inf")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if lost:
            self.lost.set()

    async def _renew_loop(self) -> None:
        interval = self.ttl_s / 4
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                renewed = await self._backend._renew(self.id, self.ttl_s)
            except (sqlite3.Error, OSError) as e:
                # Possibly transient (a long write lock); the watchdog ends the session if it lasts.
                log.warning("renewing coordination session %s failed: %s", self.id, e)
                continue
            if not renewed:
                log.warning(
                    "coordination session %s lost: its record expired or was reaped", self.id
                )
                self._stop(lost=True)
            elif not self.lost.is_set():
                self._valid_until = sent + self.ttl_s - self._margin
                self._arm_watchdog()
        # A lost session's row must not outlive it: peers would keep routing to a fenced host.
        with contextlib.suppress(sqlite3.Error, OSError, RuntimeError):
            await self._backend._delete_session(self.id)


class LocalBackend:
    """Membership in a SQLite file shared by the sidecars of one host.

    Every SQLite call runs on one dedicated thread per instance, so a busy_timeout wait never blocks
    the event loop. Sessions expire on CLOCK_BOOTTIME; rows also carry pid and process start time,
    so whoever reads the view drops a crashed process at once instead of after its TTL.

    Changes are announced by a unix datagram to every backend's socket in `<stem>.notify/` next to
    the file; watchers also poll `PRAGMA data_version` every 250 ms in case a datagram is lost.
    Claims and due queues (CoordinationBackend) arrive with actors.
    """

    name: ClassVar[str] = "local"

    def __init__(self, path: Path, *, clock: Callable[[], float] = boot_clock) -> None:
        self.path = path
        self._clock = clock
        self._notify_dir = path.with_name(f"{path.stem}.notify")
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._sessions: dict[str, LocalSession] = {}
        self._pid = os.getpid()
        stat = _proc_stat("self")
        self._proc_start = stat[1] if stat else 0
        self._pidns = _own_pidns()
        # Wake-up socket (bound on the loop thread) and the event watchers wait on.
        self._sock: socket.socket | None = None
        self._sock_path: Path | None = None
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Touched only on the SQLite thread.
        self._conn: sqlite3.Connection | None = None
        self._send_sock: socket.socket | None = None
        self._cache: _Snapshot | None = None
        self._cache_dv = -1
        self._dirty = True

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None:
            raise RuntimeError("LocalBackend already started")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pillion-coord")
        await self._call(self._open_sync)
        self._bind_notify()

    async def close(self) -> None:
        """Close the sessions this instance opened, stop its tasks and its SQLite thread."""
        if self._closed:
            return
        for session in list(self._sessions.values()):
            with contextlib.suppress(sqlite3.Error, OSError):
                await session.close()
        self._closed = True
        self._changed.set()  # lets watchers notice the close
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._sock_path is not None:
            with contextlib.suppress(OSError):
                self._sock_path.unlink()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
            executor.shutdown(wait=True)

    # --- Membership ------------------------------------------------------------------------

    async def join(self, me: Member, ttl_s: float = 5.0) -> LocalSession:
        """Open a session for `me`; an empty session_id gets `host#uuid`, pid is this process."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        member = replace(
            me,
            session_id=me.session_id or f"{me.host}#{uuid.uuid4().hex}",
            pid=self._pid,
            started_ms=me.started_ms or int(time.time() * 1000),
        )
        sent = time.monotonic()
        await self._call(lambda: self._insert_sync(member, ttl_s))
        session = LocalSession(self, member, ttl_s, sent)
        self._sessions[session.id] = session
        return session

    async def view(self) -> MemberView:
        """Live members: unexpired and, on this host, whose process still runs; reaps the rest."""
        snap = await self._call(self._view_sync)
        return MemberView(
            revision=snap.epoch,
            members=MappingProxyType({r.session_id: r.member for r in snap.rows}),
        )

    async def watch_view(self, after_revision: int) -> AsyncIterator[MemberView]:
        last = after_revision
        while not self._closed:
            # Take the event before reading so a change during the read is not slept through.
            changed = self._changed
            try:
                view = await self.view()
            except RuntimeError:
                if self._closed:
                    return  # the backend closed under us: end quietly, like a finished watch
                raise
            if view.revision > last:
                last = view.revision
                yield view
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await changed.wait()

    # --- used by LocalSession ---------------------------------------------------------------

    async def _renew(self, session_id: str, ttl_s: float) -> bool:
        return await self._call(lambda: self._renew_sync(session_id, ttl_s))

    async def _delete_session(self, session_id: str) -> None:
        await self._call(lambda: self._delete_sync(session_id))

    def _forget(self, session: LocalSession) -> None:
        self._sessions.pop(session.id, None)

    # --- plumbing ----------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("LocalBackend is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _bind_notify(self) -> None:
        try:
            self._notify_dir.mkdir(parents=True, exist_ok=True)
            path = self._notify_dir / f"{uuid.uuid4().hex[:12]}.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(str(path))
            except OSError:
                sock.close()
                raise
        except OSError as e:
            # E.g. a path over the 108-byte sun_path limit: polling alone still works.
            log.info("no change notifications for %s (%s); polling instead", self.path, e)
            return
        self._sock, self._sock_path = sock, path
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_datagram)

    def _on_datagram(self) -> None:
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            while sock.recv(16):
                pass
        # Wake every current watcher; later ones wait on a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- on the SQLite thread ----------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("LocalBackend is not running")
        return self._conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # Several sidecars may create the file at once; switching to WAL takes an exclusive
            # lock that can fail with "locked" without consulting the busy handler, so retry.
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    self._conn = conn
                    self._write(lambda c: [c.execute(sql) for sql in _SCHEMA])
                    break
                except sqlite3.OperationalError as e:
                    self._conn = None
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        except BaseException:
            conn.close()
            raise
        self._send_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send_sock.setblocking(False)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._send_sock is not None:
            self._send_sock.close()
            self._send_sock = None

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout) instead of failing
        # with SQLITE_BUSY when a read transaction later tries to upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Our own commits do not change our data_version, so the cache must be told.
        self._dirty = True
        return result

    def _insert_sync(self, member: Member, ttl_s: float) -> None:
        def txn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO sessions (id, member, pid, proc_start, pidns, expires_boot)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    member.session_id,
                    _member_to_json(member),
                    self._pid,
                    self._proc_start,
                    self._pidns,
                    self._clock() + ttl_s,
                ),
            )
            c.execute("UPDATE meta SET epoch = epoch + 1 WHERE id = 0")

        try:
            self._write(txn)
        except sqlite3.IntegrityError:
            raise ValueError(f"session {member.session_id!r} already joined") from None
        self._notify()

    def _renew_sync(self, session_id: str, ttl_s: float) -> bool:
        def txn(c: sqlite3.Connection) -> bool:
            now = self._clock()
            # An expired row is not revived: peers may already have acted on its expiry.
            cur = c.execute(
                "UPDATE sessions SET expires_boot = ? WHERE id = ? AND expires_boot > ?",
                (now + ttl_s, session_id, now),
            )
            return cur.rowcount == 1

        return self._write(txn)

    def _delete_sync(self, session_id: str) -> None:
        def txn(c: sqlite3.Connection) -> bool:
            cur = c.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            if cur.rowcount:
                c.execute("UPDATE meta SET epoch = epoch + 1 WHERE id = 0")
            return cur.rowcount > 0

        if self._write(txn):
            self._notify()

    def _read_sync(self) -> _Snapshot:
        conn = self._db()
        # One read transaction, so epoch and rows come from the same snapshot.
        conn.execute("BEGIN")
        try:
            epoch = int(conn.execute("SELECT epoch FROM meta WHERE id = 0").fetchone()[0])
            rows = tuple(
                _Row(sid, _member_from_json(raw), pid, start, pidns, expires)
                for sid, raw, pid, start, pidns, expires in conn.execute(
                    "SELECT id, member, pid, proc_start, pidns, expires_boot FROM sessions"
                    " ORDER BY id"
                )
            )
        finally:
            conn.execute("COMMIT")
        return _Snapshot(epoch, rows)

    def _dead(self, row: _Row, now: float) -> bool:
        if row.expires_boot <= now:
            return True
        if not self._pidns or row.pidns != self._pidns or row.pid == self._pid:
            # Another pid namespace (a container sharing the file) cannot be checked: TTL only.
            return False
        return not process_alive(row.pid, row.proc_start)

    def _view_sync(self) -> _Snapshot:
        conn = self._db()
        # data_version is read before the rows, so a commit in between only causes a re-read.
        dv = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if self._cache is None or self._dirty or dv != self._cache_dv:
            self._dirty = False
            self._cache, self._cache_dv = self._read_sync(), dv
        now = self._clock()
        dead = [r.session_id for r in self._cache.rows if self._dead(r, now)]
        if dead:
            # Even when someone else reaped first and we delete nothing, the cache is stale.
            self._reap_sync(dead)
            self._dirty = False
            dv = int(conn.execute("PRAGMA data_version").fetchone()[0])
            self._cache, self._cache_dv = self._read_sync(), dv
        return self._cache

    def _reap_sync(self, candidates: list[str]) -> None:
        def txn(c: sqlite3.Connection) -> int:
            now = self._clock()
            reaped = 0
            for sid in candidates:
                # Re-check under the write lock: the owner may have renewed since we looked.
                found = c.execute(
                    "SELECT member, pid, proc_start, pidns, expires_boot FROM sessions"
                    " WHERE id = ?",
                    (sid,),
                ).fetchone()
                if found is None:
                    continue
                row = _Row(sid, _member_from_json(found[0]), *found[1:])
                if self._dead(row, now):
                    c.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                    reaped += 1
                    log.info("reaped coordination session %s (pid %d)", sid, row.pid)
            if reaped:
                c.execute("UPDATE meta SET epoch = epoch + 1 WHERE id = 0")
            return reaped

        if self._write(txn):
            self._notify()

    def _notify(self) -> None:
        """Tell every backend on this file (ourselves included) that membership changed."""
        sock = self._send_sock
        if sock is None:
            return
        try:
            names = os.listdir(self._notify_dir)
        except OSError:
            return
        for name in names:
            if not name.endswith(".sock"):
                continue
            target = os.path.join(self._notify_dir, name)
            try:
                sock.sendto(b"!", target)
            except ConnectionRefusedError:
                # Nobody is bound there any more (a crashed process): clean it up.
                with contextlib.suppress(OSError):
                    os.unlink(target)
            except OSError:
                pass  # full buffer (the receiver is already due to wake) or a vanished file
