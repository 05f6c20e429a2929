"""SQLite pub/sub specifics: groups across processes, crashes, wake-ups, leases, retention."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from pillion.components.pubsub import sqlite as sqlite_mod
from pillion.components.pubsub.api import (
    TTL_KEY,
    BulkEntry,
    Feature,
    Message,
    PubSubError,
    SubscribeRequest,
)
from pillion.components.pubsub.sqlite import SQLitePubSub
from tests.polling import eventually

REPO = Path(__file__).resolve().parents[3]


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("pubsub", "pubsub.sqlite", "v1", "app", Properties(props))


async def open_broker(db: Path | str, group: str = "g", **props: str) -> SQLitePubSub:
    ps = SQLitePubSub()
    await ps.init(info(connectionString=str(db), consumerID=group, **props))
    return ps


def raw(db: Path, sql: str) -> Any:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchone()[0]


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.messages]


# -- subscriber processes -----------------------------------------------------------------------

_WORKER = r"""
import asyncio, json, os, sys, time
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.pubsub.api import SubscribeRequest
from pillion.components.pubsub.sqlite import SQLitePubSub

async def main():
    db, topic, group, out, hold, extra = sys.argv[1:7]
    hold, extra = float(hold), json.loads(extra)
    ps = SQLitePubSub()
    props = Properties({"connectionString": db, "consumerID": group, **extra})
    await ps.init(ComponentInfo("pubsub", "pubsub.sqlite", "v1", "app", props))
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    async def handler(msg):
        started = time.time()
        if hold:
            await asyncio.sleep(hold)
        # One append per message: recorded before the handler returns (and the ack is written).
        os.write(fd, f"{msg.data.decode()} {msg.attempt} {started:.6f}\n".encode())

    sub = await ps.subscribe(SubscribeRequest(topic), handler)
    print("ready", flush=True)
    eof = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(0, lambda: os.read(0, 100) or eof.set())
    await eof.wait()
    loop.remove_reader(0)
    await sub.close()
    await ps.close()
    print("closed", flush=True)

asyncio.run(main())
"""


class Worker:
    """A subscriber process; it appends `data attempt handler-start-time` per message to `out`."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.proc = proc
        self.out = out
        self.err = err

    @classmethod
    async def start(
        cls, db: Path, topic: str, group: str, out: Path, hold: float = 0.0, **extra: str
    ) -> Worker:
        err = out.with_suffix(".err")
        with open(err, "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _WORKER,
                str(db),
                topic,
                group,
                str(out),
                str(hold),
                json.dumps(extra),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        w = cls(proc, out, err)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
        except TimeoutError:
            line = b""
        assert line == b"ready\n", f"worker did not start: {line!r} {w.stderr()}"
        return w

    def stderr(self) -> str:
        try:
            return self.err.read_text()[-4000:]
        except OSError:
            return ""

    def records(self) -> list[tuple[str, int, float]]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            data, attempt, started = line.split(" ")
            out.append((data, int(attempt), float(started)))
        return out

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # utime and stime are fields 14 and 15; the split starts at field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        rest = await asyncio.wait_for(self.proc.stdout.read(), 30)
        await asyncio.wait_for(self.proc.wait(), 30)
        assert self.proc.returncode == 0, self.stderr()
        assert rest == b"closed\n", (rest, self.stderr())

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def publish_all(ps: SQLitePubSub, topic: str, names: list[str]) -> None:
    for start in range(0, len(names), 50):
        await asyncio.gather(
            *(ps.publish(topic, n.encode(), {}) for n in names[start : start + 50])
        )


def test_two_processes_in_one_group_share_the_messages(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"
    sent = [f"m{i}" for i in range(400)]

    async def main() -> None:
        publisher = await open_broker(db, "publisher")
        workers: list[Worker] = []
        try:
            for name in ("a", "b"):
                workers.append(
                    await Worker.start(db, "orders", "g", tmp_path / f"{name}.out", hold=0.005)
                )
            await publish_all(publisher, "orders", sent)

            def got() -> list[str]:
                return [r[0] for w in workers for r in w.records()]

            await eventually(
                lambda: set(got()) >= set(sent),
                30,
                lambda: f"{len(set(got()))} of {len(sent)} delivered",
            )
            await asyncio.sleep(0.5)  # any duplicate would show up by now
            shares = [len(w.records()) for w in workers]
            print(f"shares {shares}")
            assert sorted(got()) == sorted(sent), "lost or duplicated messages"
            assert all(s >= 20 for s in shares), shares
            for w in workers:
                await w.stop()
        finally:
            for w in workers:
                await w.kill()
            await publisher.close()

    asyncio.run(main())


@pytest.mark.parametrize("recovery", ["other-member", "restart"])
def test_sigkilled_subscriber_loses_nothing(tmp_path: Path, recovery: str) -> None:
    db = tmp_path / "pubsub.db"
    sent = [f"m{i}" for i in range(300)]
    # Far longer than the test: recovery must come from noticing the dead process.
    extra = {"processingTimeout": "60s"}

    async def main() -> None:
        publisher = await open_broker(db, "publisher")
        workers: list[Worker] = []
        try:
            victim = await Worker.start(db, "jobs", "g", tmp_path / "victim.out", 0.05, **extra)
            workers.append(victim)
            if recovery == "other-member":
                workers.append(
                    await Worker.start(db, "jobs", "g", tmp_path / "other.out", 0.05, **extra)
                )
            await publish_all(publisher, "jobs", sent)
            await eventually(
                lambda: len(victim.records()) >= 30, 30, lambda: "victim handled nothing"
            )
            await victim.kill()
            killed_at = time.monotonic()
            leased = raw(db, "SELECT COUNT(*) FROM pubsub_deliveries WHERE owner IS NOT NULL")
            if recovery == "restart":
                workers.append(
                    await Worker.start(db, "jobs", "g", tmp_path / "restart.out", 0.05, **extra)
                )

            def got() -> list[str]:
                return [r[0] for w in workers for r in w.records()]

            await eventually(
                lambda: set(got()) >= set(sent),
                30,
                lambda: f"{len(set(sent) - set(got()))} messages lost after the kill",
            )
            recovered = time.monotonic() - killed_at
            counts = Counter(got())
            duplicates = sum(n - 1 for n in counts.values())
            retried = sum(1 for w in workers for r in w.records() if r[1] > 1)
            print(
                f"{recovery}: 0 lost, {duplicates} duplicates, {retried} redeliveries, "
                f"{leased} leases at the kill, all done {recovered:.2f}s after it"
            )
            assert set(counts) == set(sent)
            # Only messages the victim had recorded but not yet acked may come twice.
            assert duplicates <= 10, counts.most_common(5)
            for w in workers[1:]:
                await w.stop()
        finally:
            for w in workers:
                await w.kill()
            await publisher.close()

    asyncio.run(main())


def test_wakeup_latency_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        publisher = await open_broker(db, "publisher")
        # A 10 s poll: only the datagram wake-up can make delivery fast.
        worker = await Worker.start(db, "ping", "g", tmp_path / "w.out", pollInterval="10s")
        try:
            published: dict[str, float] = {}
            for i in range(60):
                name = f"p{i}"
                published[name] = time.time()
                await publisher.publish("ping", name.encode(), {})
                await asyncio.sleep(0.01)  # spaced out: each publish is measured alone
            await eventually(
                lambda: len(worker.records()) >= 60, 20, lambda: f"{len(worker.records())} of 60"
            )
            lat = sorted(started - published[data] for data, _, started in worker.records())
            p50, p90 = statistics.median(lat), lat[int(len(lat) * 0.9)]
            print(f"publish->handler p50 {p50 * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms")
            assert p50 < 0.2, lat
            await worker.stop()
        finally:
            await worker.kill()
            await publisher.close()

    asyncio.run(main())


def test_idle_subscriber_uses_almost_no_cpu(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        worker = await Worker.start(db, "quiet", "g", tmp_path / "w.out")
        try:
            await asyncio.sleep(0.5)  # past start-up work
            before, t0 = worker.cpu_seconds(), time.monotonic()
            await asyncio.sleep(2.0)  # measuring idleness takes idle time
            share = (worker.cpu_seconds() - before) / (time.monotonic() - t0)
            print(f"idle subscriber CPU {share * 100:.2f} %")
            assert share < 0.05, share
            await worker.stop()
        finally:
            await worker.kill()

    asyncio.run(main())


# -- in-process behaviour -----------------------------------------------------------------------


def test_new_group_starts_after_creation_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        pub = await open_broker(db, "publisher")
        try:
            first = await open_broker(db)
            inbox = Inbox()
            sub = await first.subscribe(SubscribeRequest("t"), inbox)
            # Stored (group "g" exists) but older than group "late", which never sees it.
            await pub.publish("t", b"early", {})
            await eventually(lambda: inbox.data == [b"early"], 5, lambda: str(inbox.data))
            late = await open_broker(db, "late")
            late_inbox = Inbox()
            await late.subscribe(SubscribeRequest("t"), late_inbox)
            await sub.close()
            await first.close()
            await pub.publish("t", b"while-down", {})
            await eventually(
                lambda: late_inbox.data == [b"while-down"], 5, lambda: str(late_inbox.data)
            )
            again = await open_broker(db)  # group "g" is remembered across the restart
            inbox2 = Inbox()
            await again.subscribe(SubscribeRequest("t"), inbox2)
            await eventually(lambda: inbox2.data == [b"while-down"], 5, lambda: str(inbox2.data))
            await late.close()
            await again.close()
        finally:
            await pub.close()

    asyncio.run(main())


def test_expired_lease_goes_to_another_member(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        stuck = asyncio.Event()
        a = await open_broker(db, processingTimeout="300ms")
        b = await open_broker(db, processingTimeout="300ms")
        try:
            seen_a: list[Message] = []

            async def hang(msg: Message) -> None:
                seen_a.append(msg)
                await stuck.wait()

            await a.subscribe(SubscribeRequest("t"), hang)
            await a.publish("t", b"slow", {})
            await eventually(lambda: len(seen_a) == 1, 5, lambda: "a never got it")
            inbox = Inbox()
            started = time.monotonic()
            await b.subscribe(SubscribeRequest("t"), inbox)
            await eventually(lambda: inbox.data == [b"slow"], 5, lambda: "never redelivered")
            waited = time.monotonic() - started
            assert 0.1 <= waited < 4, waited
            # A's own free slots may re-lease it once more before B does: at least the 2nd try.
            assert inbox.messages[0].attempt >= 2
            stuck.set()
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_close_gives_back_unhandled_messages_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "pubsub.db"
    monkeypatch.setattr(sqlite_mod, "DRAIN_S", 0.2)

    async def main() -> None:
        a = await open_broker(db, processingTimeout="60s")
        b = await open_broker(db, processingTimeout="60s")
        try:
            entered: list[bytes] = []

            async def never(msg: Message) -> None:
                entered.append(msg.data)
                await asyncio.Event().wait()

            await a.subscribe(SubscribeRequest("t"), never)
            for i in range(20):
                await a.publish("t", f"m{i}".encode(), {})
            # a's 10 slots fill with handlers that never return; b gets the other 10.
            await eventually(lambda: len(entered) == 10, 5, lambda: f"a entered {entered}")
            inbox = Inbox()
            await b.subscribe(SubscribeRequest("t"), inbox)
            await eventually(lambda: len(inbox.data) == 10, 5, lambda: str(inbox.data))
            await a.close()
            await eventually(
                lambda: len(set(inbox.data)) == 20, 3, lambda: f"b has {len(inbox.data)} of 20"
            )
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_failed_message_waits_for_redeliver_interval(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db, redeliverInterval="300ms")
        try:
            times: list[tuple[float, int]] = []

            async def flaky(msg: Message) -> None:
                times.append((time.monotonic(), msg.attempt))
                if len(times) < 3:
                    raise RuntimeError("not yet")

            await ps.subscribe(SubscribeRequest("t"), flaky)
            await ps.publish("t", b"x", {})
            await eventually(lambda: len(times) == 3, 5, lambda: str(times))
            assert [a for _, a in times] == [1, 2, 3]
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(times)]
            assert all(0.25 <= g < 1.0 for g in gaps), gaps
            await asyncio.sleep(0.4)
            assert len(times) == 3
            assert raw(db, "SELECT COUNT(*) FROM pubsub_deliveries") == 0
        finally:
            await ps.close()

    asyncio.run(main())


def test_concurrency_fills_and_bounds_the_slots(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db, concurrency="4")
        try:
            in_flight = peak = done = 0

            async def work(msg: Message) -> None:
                nonlocal in_flight, peak, done
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1
                done += 1

            await ps.subscribe(SubscribeRequest("t"), work)
            await publish_all(ps, "t", [f"m{i}" for i in range(40)])
            await eventually(lambda: done == 40, 10, lambda: f"{done} of 40")
            assert peak == 4
            assert Feature.ORDERED not in ps.features()
        finally:
            await ps.close()

    asyncio.run(main())


def test_ordered_with_concurrency_one_even_when_backlogged(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db, concurrency="1")
        try:
            assert Feature.ORDERED in ps.features()
            inbox = Inbox()
            sub = await ps.subscribe(SubscribeRequest("t"), inbox)
            await sub.close()  # the group exists; a backlog builds up
            sent = [f"{i:04d}".encode() for i in range(200)]
            await publish_all(ps, "t", [s.decode() for s in sent])
            await ps.subscribe(SubscribeRequest("t"), inbox)
            await eventually(lambda: len(inbox.data) == 200, 10, lambda: str(len(inbox.data)))
            assert inbox.data == sent
        finally:
            await ps.close()

    asyncio.run(main())


def test_retention_keeps_what_a_group_still_needs(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        fast = await open_broker(db, "fast")
        slow = await open_broker(db, "slow")
        try:
            inbox = Inbox()
            await fast.subscribe(SubscribeRequest("t"), inbox)
            # Group "slow" exists but is not consuming.
            await (await slow.subscribe(SubscribeRequest("t"), Inbox())).close()
            await publish_all(fast, "t", [f"m{i}" for i in range(10)])
            await fast.publish("nobody-listens", b"x", {})
            await eventually(lambda: len(inbox.data) == 10, 5, lambda: str(inbox.data))
            await fast.cleanup(force=True)
            assert raw(db, "SELECT COUNT(*) FROM pubsub_messages") == 10  # slow needs them
            slow_inbox = Inbox()
            await slow.subscribe(SubscribeRequest("t"), slow_inbox)
            await eventually(lambda: len(slow_inbox.data) == 10, 5, lambda: str(slow_inbox.data))
            await eventually(
                lambda: raw(db, "SELECT COUNT(*) FROM pubsub_deliveries") == 0,
                5,
                lambda: "acks not written",
            )
            assert await fast.cleanup(force=True) == 10
            assert raw(db, "SELECT COUNT(*) FROM pubsub_messages") == 0
        finally:
            await fast.close()
            await slow.close()

    asyncio.run(main())


def test_retention_purges_expired_and_old_messages(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db, maxMessageAge="1h")
        try:
            await (await ps.subscribe(SubscribeRequest("t"), Inbox())).close()
            await ps.publish("t", b"ttl", {TTL_KEY: "1"})
            await ps.publish("t", b"old", {})
            await ps.publish("t", b"new", {})
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE pubsub_messages SET expires = 0 WHERE data = x'74746c'")
                conn.execute("UPDATE pubsub_messages SET created = 0 WHERE data = x'6f6c64'")
            assert await ps.cleanup(force=True) == 2
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest("t"), inbox)
            await eventually(lambda: inbox.data == [b"new"], 5, lambda: str(inbox.data))
        finally:
            await ps.close()

    asyncio.run(main())


def test_cleanup_takes_turns(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        a = await open_broker(db, cleanupInterval="1h")
        b = await open_broker(db, cleanupInterval="1h")
        try:
            await (await a.subscribe(SubscribeRequest("t"), Inbox())).close()
            await a.publish("t", b"x", {TTL_KEY: "1"})
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE pubsub_messages SET expires = 0")
            # Both instances' housekeeping ran a cleanup at start; nobody's turn for an hour.
            assert await a.cleanup() == 0
            assert await b.cleanup() == 0
            assert await b.cleanup(force=True) == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_publishes_share_commits_and_bulk_publish(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db)
        try:
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest("t"), inbox)
            before = ps.commits
            await asyncio.gather(*(ps.publish("t", str(i).encode(), {}) for i in range(200)))
            assert ps.commits - before <= 3, ps.commits - before
            entries = [BulkEntry(f"e{i}", f"b{i}".encode(), {"k": str(i)}) for i in range(5)]
            assert await ps.bulk_publish("t", entries, {"shared": "yes"}) == []
            bad = [BulkEntry("ok", b"1"), BulkEntry("bad", b"2", {TTL_KEY: "zero"})]
            failed = dict(await ps.bulk_publish("t", bad, {}))
            assert set(failed) == {"ok", "bad"} and "integer" in failed["bad"]
            await eventually(lambda: len(inbox.data) == 205, 5, lambda: str(len(inbox.data)))
            bulk = {m.data: m.metadata for m in inbox.messages if m.data.startswith(b"b")}
            assert bulk[b"b3"] == {"shared": "yes", "k": "3"}
        finally:
            await ps.close()

    asyncio.run(main())


def test_long_notify_path_still_wakes(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    db = deep / "pubsub.db"

    async def main() -> None:
        pub = await open_broker(db, "publisher", pollInterval="10s")
        sub = await open_broker(db, pollInterval="10s")
        try:
            inbox = Inbox()
            await sub.subscribe(SubscribeRequest("t"), inbox)
            assert len(os.listdir(deep / "pubsub.db.notify")) == 2
            started = time.monotonic()
            await pub.publish("t", b"x", {})
            await eventually(lambda: inbox.data == [b"x"], 5, lambda: "not delivered")
            assert time.monotonic() - started < 1.0  # not the 10 s poll
        finally:
            await pub.close()
            await sub.close()
        assert os.listdir(deep / "pubsub.db.notify") == []

    asyncio.run(main())


def test_lock_held_by_another_process_does_not_block_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "pubsub.db"

    async def main() -> None:
        ps = await open_broker(db)
        other = sqlite3.connect(db, isolation_level=None)
        try:
            await (await ps.subscribe(SubscribeRequest("t"), Inbox())).close()
            other.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            tick_task = asyncio.create_task(ticker())
            started = time.monotonic()
            await ps.publish("t", b"x", {})
            waited = time.monotonic() - started
            tick_task.cancel()
            assert 0.25 <= waited < 3, waited
            assert ticks >= 10, "the event loop was blocked while waiting for the lock"
        finally:
            other.close()
            await ps.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "connectionString"),
        ({"connectionString": "x.db", "concurrency": "0"}, "concurrency"),
        ({"connectionString": "x.db", "processingTimeout": "0s"}, "processingTimeout"),
        ({"connectionString": "x.db", "redeliverInterval": "soon"}, "redeliverInterval"),
    ],
)
def test_bad_metadata(props: dict[str, str], field: str) -> None:
    with pytest.raises(ComponentConfigError) as exc:
        asyncio.run(SQLitePubSub().init(info(**props)))
    assert exc.value.field == field


@pytest.mark.parametrize("ttl", ["0", "-1", "abc", "1.5"])
def test_bad_ttl_is_rejected(tmp_path: Path, ttl: str) -> None:
    async def main() -> None:
        ps = await open_broker(tmp_path / "pubsub.db")
        try:
            with pytest.raises(PubSubError):
                await ps.publish("t", b"x", {TTL_KEY: ttl})
        finally:
            await ps.close()

    asyncio.run(main())


def test_database_file_alias_and_schema(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "pubsub.db"

    async def main() -> None:
        ps = SQLitePubSub()
        await ps.init(info(databaseFile=str(db)))
        await ps.close()
        await ps.close()

    asyncio.run(main())
    assert raw(db, "PRAGMA journal_mode") == "wal"
    assert raw(db, "SELECT value FROM pubsub_meta WHERE key = 'schema-version'") == "1"
    assert raw(db, "SELECT COUNT(*) FROM pubsub_consumers") == 0
