"""Tests of the name registry: registration, resolution, round robin and dead members."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from types import MappingProxyType

import pytest

from pillion.coordination.api import Member, MemberView, Session
from pillion.coordination.local import LocalBackend
from pillion.coordination.names import Address, AppNotFound, NameResolver, register

REPO = Path(__file__).resolve().parents[3]

# A sidecar stand-in: registers app argv[2] at 127.0.0.1:argv[3], then idles until killed.
REGISTRANT = """
import asyncio, sys
from pathlib import Path
from pillion.coordination.local import LocalBackend
from pillion.coordination.names import register

async def main() -> None:
    backend = LocalBackend(Path(sys.argv[1]))
    await backend.start()
    address = "127.0.0.1:" + sys.argv[3]
    await register(backend, app_id=sys.argv[2], namespace="", address=address, host="127.0.0.1")
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    asyncio.run(bounded())


async def started(path: Path) -> LocalBackend:
    backend = LocalBackend(path)
    await backend.start()
    return backend


async def reg(backend: LocalBackend, app_id: str, port: int, namespace: str = "") -> Session:
    return await register(
        backend, app_id=app_id, namespace=namespace, address=f"127.0.0.1:{port}", host="127.0.0.1"
    )


def test_address_parse() -> None:
    assert Address.parse("10.0.0.5:50002") == Address("10.0.0.5", 50002)
    assert Address.parse("[::1]:50002") == Address("::1", 50002)
    assert str(Address("::1", 1)) == "[::1]:1"
    assert str(Address("localhost", 80)) == "localhost:80"
    for bad in ("nohost", ":80", "h:", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            Address.parse(bad)


def test_register_rejects_a_bad_address(tmp_path: Path) -> None:
    async def main() -> None:
        backend = await started(tmp_path / "coord.db")
        try:
            with pytest.raises(ValueError):
                await register(backend, app_id="a", namespace="", address="nope", host="h")
            assert (await backend.view()).members == {}
        finally:
            await backend.close()

    run(main())


def test_resolve_a_registered_app_and_namespaces(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        resolver = NameResolver(b)
        try:
            session = await reg(a, "orders", 5001)
            await reg(a, "orders", 6001, namespace="prod")
            await resolver.start()
            assert await resolver.resolve("orders") == Address("127.0.0.1", 5001)
            assert await resolver.resolve("orders", "prod") == Address("127.0.0.1", 6001)
            member = (await b.view()).members[session.id]
            assert (member.app_id, member.pid, member.host) == ("orders", os.getpid(), "127.0.0.1")
        finally:
            await resolver.close()
            await a.close()
            await b.close()

    run(main())


def test_unknown_app_is_not_found_quickly(tmp_path: Path) -> None:
    async def main() -> None:
        backend = await started(tmp_path / "coord.db")
        resolver = NameResolver(backend)
        try:
            await resolver.start()
            t0 = time.monotonic()
            with pytest.raises(AppNotFound) as err:
                await resolver.resolve("ghost")
            assert err.value.app_id == "ghost"
            assert isinstance(err.value, LookupError)
            assert time.monotonic() - t0 < 0.5
        finally:
            await resolver.close()
            await backend.close()

    run(main())


def test_just_registered_app_is_found_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        # A long refresh period: only the miss-triggered read can find the newcomer in time.
        resolver = NameResolver(b, refresh_s=60)
        try:
            await resolver.start()
            await reg(a, "newcomer", 7001)
            t0 = time.monotonic()
            assert await resolver.resolve("newcomer") == Address("127.0.0.1", 7001)
            assert time.monotonic() - t0 < 0.5
        finally:
            await resolver.close()
            await a.close()
            await b.close()

    run(main())


def test_round_robin_over_members_of_one_app(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        resolver = NameResolver(b)
        try:
            await reg(a, "web", 8001)
            await reg(b, "web", 8002)
            await reg(a, "other", 9001)
            await resolver.start()
            got = [(await resolver.resolve("web")).port for _ in range(6)]
            assert sorted(got) == [8001, 8001, 8001, 8002, 8002, 8002]
            assert all(x != y for x, y in itertools.pairwise(got)), got
        finally:
            await resolver.close()
            await a.close()
            await b.close()

    run(main())


def test_dead_member_is_not_returned_after_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "coord.db"

    async def main() -> None:
        backend = await started(path)
        resolver = NameResolver(backend)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        child = subprocess.Popen(
            [sys.executable, "-c", REGISTRANT, str(path), "svc", "7101"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await reg(backend, "svc", 7102)
            await resolver.start()
            deadline = time.monotonic() + 10
            while {(await resolver.resolve("svc")).port for _ in range(2)} != {7101, 7102}:
                assert child.poll() is None, child.communicate()[1].decode()
                assert time.monotonic() < deadline, "the child never registered"
                await asyncio.sleep(0.02)

            os.kill(child.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            deadline = t_kill + 3  # the TTL is 5 s: the watch's pid check must beat it
            while 7101 in {(await resolver.resolve("svc")).port for _ in range(4)}:
                assert time.monotonic() < deadline, "the dead member is still resolved"
                await asyncio.sleep(0.02)
            for _ in range(10):
                assert await resolver.resolve("svc") == Address("127.0.0.1", 7102)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(5)
            await resolver.close()
            await backend.close()

    run(main())


class CountingMembership:
    """A Membership whose view the test edits by hand and whose watch never reports."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.revision = 0
        self.reads = 0

    def set(self, *members: Member) -> None:
        self.members = {m.session_id: m for m in members}
        self.revision += 1

    async def join(self, me: Member, ttl_s: float = 5.0) -> Session:
        raise NotImplementedError

    async def view(self) -> MemberView:
        self.reads += 1
        return MemberView(self.revision, MappingProxyType(dict(self.members)))

    async def watch_view(self, after_revision: int) -> AsyncIterator[MemberView]:
        await asyncio.Event().wait()
        yield await self.view()


def test_resolve_serves_from_memory_and_invalidate_forces_a_reread() -> None:
    def m(sid: str, port: int) -> Member:
        return Member("h", "api", frozenset(), sid, f"127.0.0.1:{port}")

    async def main() -> None:
        backend = CountingMembership()
        backend.set(m("s1", 1001))
        resolver = NameResolver(backend, refresh_s=60)
        try:
            await resolver.start()
            reads = backend.reads
            for _ in range(100):
                assert (await resolver.resolve("api")).port == 1001
            assert backend.reads == reads  # the hot path never reads the backend

            backend.set(m("s2", 1002))  # the watch does not tell: the resolver is stale
            assert (await resolver.resolve("api")).port == 1001
            resolver.invalidate("api")
            assert (await resolver.resolve("api")).port == 1002
            assert backend.reads == reads + 1
            assert (await resolver.resolve("api")).port == 1002
            assert backend.reads == reads + 1  # one re-read per invalidation

            backend.set()
            resolver.invalidate("api")
            with pytest.raises(AppNotFound):
                await resolver.resolve("api")
        finally:
            await resolver.close()

    run(main())


# --- gRPC API addresses (the gRPC proxy's targets) ------------------------------------------------


def test_register_and_resolve_grpc_addresses(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "coord.db"
        a, b = await started(path), await started(path)
        resolver = NameResolver(b, refresh_s=60)
        try:
            with pytest.raises(ValueError):
                await register(
                    a, app_id="x", namespace="", address="h:1", host="h", grpc_address="nope"
                )
            session = await register(
                a,
                app_id="orders",
                namespace="",
                address="127.0.0.1:5001",
                host="127.0.0.1",
                grpc_address="127.0.0.1:5011",
            )
            await reg(a, "legacy", 6001)  # registered without a gRPC address
            await resolver.start()
            assert await resolver.resolve_grpc("orders") == Address("127.0.0.1", 5011)
            assert await resolver.resolve("orders") == Address("127.0.0.1", 5001)
            # Persisted with the member, so another backend instance on the file reads it back.
            assert (await b.view()).members[session.id].grpc_address == "127.0.0.1:5011"
            assert await resolver.resolve("legacy") == Address("127.0.0.1", 6001)
            with pytest.raises(AppNotFound):
                await resolver.resolve_grpc("legacy")
            with pytest.raises(AppNotFound):
                await resolver.resolve_grpc("orders", "prod")
        finally:
            await resolver.close()
            await a.close()
            await b.close()

    run(main())


def test_members_stored_without_a_grpc_address_still_load() -> None:
    from pillion.coordination.local import _member_from_json, _member_to_json

    old = '{"host":"h","app_id":"a","actor_types":[],"session_id":"s","address":"h:1"}'
    m = _member_from_json(old)
    assert (m.app_id, m.address, m.grpc_address) == ("a", "h:1", "")
    new = Member("h", "a", frozenset({"T"}), "s", "h:1", "ns", 7, 1, 2, "h:2")
    assert _member_from_json(_member_to_json(new)) == new


def test_resolve_grpc_round_robin_invalidation_and_fresh_reads() -> None:
    def m(sid: str, port: int, grpc_port: int = 0) -> Member:
        grpc_address = f"127.0.0.1:{grpc_port}" if grpc_port else ""
        return Member("h", "api", frozenset(), sid, f"127.0.0.1:{port}", grpc_address=grpc_address)

    async def main() -> None:
        backend = CountingMembership()
        # s2 has no gRPC API: it serves `resolve` but is skipped by `resolve_grpc`.
        backend.set(m("s1", 1001, 2001), m("s2", 1002), m("s3", 1003, 2003))
        resolver = NameResolver(backend, refresh_s=60)
        try:
            await resolver.start()
            reads = backend.reads
            got = [(await resolver.resolve_grpc("api")).port for _ in range(4)]
            assert got == [2001, 2003, 2001, 2003]
            ports = [(await resolver.resolve("api")).port for _ in range(3)]
            assert sorted(ports) == [1001, 1002, 1003]
            assert backend.reads == reads  # served from memory

            backend.set(m("s4", 1004, 2004))  # unseen until invalidated
            assert (await resolver.resolve_grpc("api")).port in (2001, 2003)
            resolver.invalidate("api")
            assert (await resolver.resolve_grpc("api")).port == 2004
            assert backend.reads == reads + 1

            # An app with members but no gRPC address costs a fresh read, like an unknown one,
            # so a sidecar that just registered one is found at once.
            backend.set(m("s5", 1005))
            resolver.invalidate("api")
            with pytest.raises(AppNotFound):
                await resolver.resolve_grpc("api")
            backend.set(m("s5", 1005, 2005))
            assert (await resolver.resolve_grpc("api")).port == 2005

            backend.set(
                m("s6", 1006, 0), Member("h", "api", frozenset(), "s7", "h:1", "", 0, 0, 0, "bad")
            )
            resolver.invalidate("api")
            with pytest.raises(AppNotFound):
                await resolver.resolve_grpc("api")  # a bad gRPC address is skipped, not raised
            assert (await resolver.resolve("api")).port in (1006, 1)
        finally:
            await resolver.close()

    run(main())
