"""A gRPC API server over real blocks in a background loop, with recording invoke fakes."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from dapr.proto.runtime.v1 import dapr_pb2_grpc

from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.server import start_grpc_server
from pillion.blocks.invoke import Headers, InvokeBlock, InvokeResponse
from pillion.blocks.metadata import AppConnection, ComponentView, MetadataBlock
from pillion.blocks.state import StateBlock, StoreEntry
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import Feature
from pillion.components.state.inmemory import InMemoryStateStore

APP_ID = "app"
T = TypeVar("T")


@dataclass(frozen=True)
class Addr:
    host: str
    port: int


class Resolver:
    """Knows one other app, "other", at a fixed address."""

    async def resolve(self, app_id: str, namespace: str = "") -> Addr:
        if app_id != "other":
            raise LookupError(app_id)
        return Addr("127.0.0.1", 9)

    def invalidate(self, app_id: str, namespace: str = "") -> None:
        return None


@dataclass
class LinkCall:
    verb: str
    target: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Link:
    """Answers each forwarded call with the next queued response (default: 200 "remote")."""

    responses: list[InvokeResponse] = field(default_factory=list)
    calls: list[LinkCall] = field(default_factory=list)

    async def forward(
        self, addr: Addr, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        self.calls.append(LinkCall(verb, target, list(headers), body))
        if self.responses:
            return self.responses.pop(0)
        return InvokeResponse(200, b"OK", [(b"content-type", b"text/plain")], b"remote")


class NoTxStore(InMemoryStateStore):
    """The in-memory store without TRANSACTIONAL."""

    def features(self) -> frozenset[Feature]:
        return frozenset({Feature.ETAG})


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where the sidecar runs on it, so the tests exercise grpc.aio on the same loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class GrpcSidecar:
    """The gRPC API on 127.0.0.1:<random> in its own thread and event loop.

    Blocking clients (the official SDK, sync stubs) and asyncio.run() clients in the test
    thread can both talk to it.
    """

    def __init__(
        self,
        api_token: str | None = None,
        generic_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> None:
        self.api_token = api_token
        self.generic_handlers = generic_handlers
        self.link = Link()
        self.shutdowns = 0
        self.port = 0
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stores: list[InMemoryStateStore] = []

    def __enter__(self) -> GrpcSidecar:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        entries = {}
        for name, store in (("statestore", InMemoryStateStore()), ("notx", NoTxStore())):
            await store.init(ComponentInfo(name, "state.in-memory", "v1", APP_ID, Properties()))
            self._stores.append(store)
            entries[name] = StoreEntry(name, store)
        self.state = StateBlock(APP_ID, "", entries)
        self.invoke = InvokeBlock(APP_ID, "", Resolver(), self.link, None)
        self.metadata = MetadataBlock(
            APP_ID,
            lambda: [
                ComponentView("statestore", "state.in-memory", "v1", ("ETAG", "TRANSACTIONAL"))
            ],
            app=AppConnection(
                8080,
                "http",
                "127.0.0.1",
                health_check_path="/healthz",
                health_probe_interval=5,
                health_probe_timeout=0.5,
                health_threshold=3,
            ),
            enabled_features=("HotReload",),
        )
        api = DaprApi(
            state=self.state,
            invoke=self.invoke,
            metadata=self.metadata,
            request_shutdown=self._on_shutdown,
            app_id=APP_ID,
        )
        self.server, self.port = await start_grpc_server(
            api,
            host="127.0.0.1",
            port=0,
            max_message_size=4 << 20,
            api_token=self.api_token,
            generic_handlers=self.generic_handlers,
        )

    def _on_shutdown(self) -> None:
        self.shutdowns += 1

    async def _stop(self) -> None:
        await self.server.stop(None)
        for s in self._stores:
            await s.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, fn: Callable[[dapr_pb2_grpc.DaprStub], Awaitable[T]]) -> T:
        """Run `fn(stub)` with a grpc.aio stub connected to this server, in a fresh loop."""

        async def main() -> T:
            async with grpc.aio.insecure_channel(self.address) as channel:
                return await fn(dapr_pb2_grpc.DaprStub(channel))

        return asyncio.run(main())


@pytest.fixture(scope="module")
def sidecar() -> Iterator[GrpcSidecar]:
    with GrpcSidecar() as s:
        yield s


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def healthz_port() -> Iterator[int]:
    """A stub of the sidecar's HTTP port: the SDK polls /v1.0/healthz/outbound before gRPC."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
