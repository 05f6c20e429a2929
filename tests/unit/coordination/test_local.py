"""Tests of the local (SQLite) coordination backend's membership, with real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pillion.coordination import local
from pillion.coordination.api import Member, Membership, MemberView
from pillion.coordination.local import LocalBackend, process_alive

REPO = Path(__file__).resolve().parents[3]

# A sidecar stand-in: joins as app argv[2] with ttl argv[3], then idles until killed.
JOINER = """
import asyncio, sys
from pathlib import Path
from pillion.coordination.api import Member
from pillion.coordination.local import LocalBackend

async def main() -> None:
    backend = LocalBackend(Path(sys.argv[1]))
    await backend.start()
    me = Member("127.0.0.1", sys.argv[2], frozenset(), "", "127.0.0.1:" + sys.argv[4])
    await backend.join(me, ttl_s=float(sys.argv[3]))
    await asyncio.sleep(3600)

asyncio.run(main())
"""

# Joins and leaves in a loop, reopening its backend now and then; all start at argv[2] (time.time).
CHURNER = """
import asyncio, sys, time
from pathlib import Path
from pillion.coordination.api import Member
from pillion.coordination.local import LocalBackend

async def main() -> None:
    path, start_at = Path(sys.argv[1]), float(sys.argv[2])
    rounds, name = int(sys.argv[3]), sys.argv[4]
    while time.time() < start_at:
        time.sleep(0.001)
    backend = LocalBackend(path)
    await backend.start()
    for i in range(rounds):
        if i % 5 == 4:
            await backend.close()
            backend = LocalBackend(path)
            await backend.start()
        s = await backend.join(Member("127.0.0.1", name, frozenset(), "", "127.0.0.1:1"))
        view = await backend.view()
        assert s.id in view.members, (s.id, view)
        await s.close()
    await backend.close()

asyncio.run(main())
"""


def member(app_id: str = "app", port: int = 1, session_id: str = "") -> Member:
    return Member("127.0.0.1", app_id, frozenset(), session_id, f"127.0.0.1:{port}")


async def started(path: Path) -> LocalBackend:
    backend = LocalBackend(path)
    await backend.start()
    return backend


async def wait_for_view(
    backend: Membership, pred: Callable[[MemberView], bool], timeout_s: float
) -> MemberView:
    deadline = time.monotonic() + timeout_s
    while True:
        view = await backend.view()
        if pred(view):
            return view
        assert time.monotonic() < deadline, f"view never matched: {view}"
        await asyncio.sleep(0.02)


def apps(view: MemberView) -> set[str]:
    return {m.app_id for m in view.members.values()}


@contextmanager
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Collect spawned processes; kill any still running on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)


def spawn(procs: list[subprocess.Popen[bytes]], script: str, *argv: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    procs.append(p)
    return p


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    asyncio.run(bounded())


def test_join_view_close(tmp_path: Path) -> None:
    async def main() -> None:
        backend = await started(tmp_path / "home" / "coord.db")
        try:
            assert (await backend.view()).members == {}
            session = await backend.join(member("orders", 5001))
            assert session.id.startswith("127.0.0.1#")
            assert session.valid_until() > time.monotonic()
            view = await backend.view()
            got = view.members[session.id]
            assert (got.app_id, got.address, got.pid) == ("orders", "127.0.0.1:5001", os.getpid())
            assert got.started_ms > 0
            await session.close()
            after = await backend.view()
            assert after.members == {}
            assert after.revision > view.revision
            assert session.valid_until() < time.monotonic()
            assert not session.lost.is_set()  # a clean leave is not a loss
            await session.close()  # idempotent
        finally:
            await backend.close()
        assert (tmp_path / "home" / "coord.db").exists()

    run(main())


def test_two_backends_on_one_file_see_each_other(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        try:
            sa = await a.join(member("a", 1))
            sb = await b.join(member("b", 2))
            for backend in (a, b):
                view = await backend.view()
                assert set(view.members) == {sa.id, sb.id}
                assert apps(view) == {"a", "b"}
            await a.close()  # closes the sessions it opened
            assert apps(await b.view()) == {"b"}
        finally:
            await a.close()
            await b.close()

    run(main())


def test_join_twice_with_the_same_session_id_fails(tmp_path: Path) -> None:
    async def main() -> None:
        backend = await started(tmp_path / "coord.db")
        try:
            await backend.join(member(session_id="h#1"))
            try:
                await backend.join(member(session_id="h#1"))
            except ValueError:
                pass
            else:
                raise AssertionError("second join with one session id succeeded")
        finally:
            await backend.close()

    run(main())


def test_revisions_strictly_rise_and_watch_never_goes_back(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        try:
            start = (await b.view()).revision
            seen: list[int] = []

            async def watch(until: int) -> None:
                async for view in b.watch_view(start):
                    seen.append(view.revision)
                    if view.revision >= until:
                        return

            revisions = [start]
            sessions = []
            watcher = asyncio.create_task(watch(start + 10))
            for i in range(5):
                sessions.append(await a.join(member(f"app{i}", i + 1)))
                revisions.append((await a.view()).revision)
                if i % 2:
                    await asyncio.sleep(0.05)  # let some changes arrive singly, others coalesced
            for s in sessions:
                await s.close()
                revisions.append((await a.view()).revision)
            async with asyncio.timeout(5):
                await watcher
            assert revisions == sorted(set(revisions)), revisions
            assert revisions[-1] == start + 10
            assert seen == sorted(set(seen)) and seen[0] > start and seen[-1] == start + 10, seen

            # Nothing changed since: a watch from the current revision yields nothing.
            quiet = b.watch_view(revisions[-1])
            try:
                async with asyncio.timeout(0.6):
                    got = await anext(quiet)
                raise AssertionError(f"watch went back or repeated: {got}")
            except TimeoutError:
                pass
        finally:
            await a.close()
            await b.close()

    run(main())


def test_watch_wakes_on_change_without_waiting_for_the_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the fallback poll out of reach, only the datagram can wake the watcher in time.
    monkeypatch.setattr(local, "POLL_S", 30.0)

    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        try:
            start = (await b.view()).revision

            async def first_view() -> MemberView:
                async for view in b.watch_view(start):
                    return view
                raise AssertionError("the watch ended")

            first = asyncio.create_task(first_view())
            await asyncio.sleep(0.1)  # the watcher is now asleep
            t0 = time.monotonic()
            await a.join(member())
            async with asyncio.timeout(2):
                view = await first
            latency = time.monotonic() - t0
            assert view.revision == start + 1
            assert latency < 1.0, latency  # typically ~1 ms
        finally:
            await a.close()
            await b.close()

    run(main())


def test_killed_member_drops_at_once_and_stopped_one_after_its_ttl(tmp_path: Path) -> None:
    path = tmp_path / "coord.db"

    async def main() -> None:
        backend = await started(path)
        try:
            with spawned() as procs:
                killed = spawn(procs, JOINER, str(path), "killed", "5.0", "7001")
                stopped = spawn(procs, JOINER, str(path), "stopped", "1.5", "7002")
                await wait_for_view(backend, lambda v: apps(v) == {"killed", "stopped"}, 10)

                os.kill(stopped.pid, signal.SIGSTOP)
                t_stop = time.monotonic()
                os.kill(killed.pid, signal.SIGKILL)
                t_kill = time.monotonic()
                # Not waited for yet, so it lingers as a zombie, which must count as dead.
                view = await wait_for_view(backend, lambda v: "killed" not in apps(v), 3)
                assert time.monotonic() - t_kill < 1.5  # TTL is 5 s: the pid check dropped it
                assert "stopped" in apps(view)  # a stopped process is alive

                view = await wait_for_view(backend, lambda v: "stopped" not in apps(v), 5)
                # It expires by its TTL, 1.5 s after its last renewal (before SIGSTOP).
                assert time.monotonic() - t_stop > 1.5 - 1.5 / 4 - 0.1
                assert apps(view) == set()
                for p in procs:
                    p.kill()
        finally:
            await backend.close()

    run(main())


def test_member_that_stops_renewing_expires_after_its_ttl_and_is_lost(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        try:
            keep = await a.join(member("keep", 1), ttl_s=1.2)
            stop = await a.join(member("stop", 2), ttl_s=1.2)
            stop._renewal.cancel()  # simulate a renewal that never lands
            t0 = time.monotonic()
            lost_at: list[float] = []

            async def note_lost() -> None:
                await stop.lost.wait()
                lost_at.append(time.monotonic())

            watcher = asyncio.create_task(note_lost())
            view = await wait_for_view(b, lambda v: stop.id not in v.members, 5)
            gone_at = time.monotonic()
            assert gone_at - t0 > 1.0
            # The owner fenced itself before anyone else could see the session gone.
            assert lost_at and lost_at[0] <= gone_at
            assert stop.valid_until() < time.monotonic()
            # The renewed one outlived the TTL and is still valid.
            assert keep.id in view.members
            assert not keep.lost.is_set()
            assert keep.valid_until() > time.monotonic()
            watcher.cancel()
        finally:
            await a.close()
            await b.close()

    run(main())


def test_renewal_of_a_reaped_session_marks_it_lost(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        try:
            session = await a.join(member(), ttl_s=0.8)
            # Someone else (an operator, a reaper that judged it dead) deletes the row.
            await b._delete_session(session.id)
            async with asyncio.timeout(2):
                await session.lost.wait()
            assert session.id not in (await a.view()).members
        finally:
            await a.close()
            await b.close()

    run(main())


def test_three_processes_joining_and_leaving_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "coord.db"  # created by the racing processes themselves
    rounds = 30
    start_at = time.time() + 0.8
    with spawned() as procs:
        for i in range(3):
            spawn(procs, CHURNER, str(path), str(start_at), str(rounds), f"churn{i}")
        deadline = time.monotonic() + 15
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
        errors = [p.stderr.read().decode() if p.stderr else "" for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        assert errors == ["", "", ""]

    async def main() -> None:
        backend = await started(path)
        try:
            view = await backend.view()
            assert view.members == {}
            # Every join and every leave bumped the epoch exactly once: nothing lost in races.
            assert view.revision == 3 * rounds * 2
        finally:
            await backend.close()

    run(main())


def test_process_alive() -> None:
    from pillion.coordination.local import _proc_stat

    stat = _proc_stat(os.getpid())
    assert stat is not None
    assert process_alive(os.getpid(), stat[1])
    assert not process_alive(os.getpid(), stat[1] + 1)  # same pid, another incarnation
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not process_alive(p.pid, 0)
