"""GetSecret and GetBulkSecret over a real gRPC server: messages and Dapr's status codes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from dapr.proto.runtime.v1 import dapr_pb2_grpc, secret_pb2

from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.server import start_grpc_server
from pillion.blocks.invoke import InvokeBlock
from pillion.blocks.metadata import MetadataBlock
from pillion.blocks.secrets import SecretsBlock, SecretScope
from pillion.blocks.state import StateBlock
from tests.unit.blocks.test_secrets import FakeStore
from tests.unit.grpc.conftest import Link, Resolver

T = TypeVar("T")
Stub = dapr_pb2_grpc.DaprStub


def serve(secrets: SecretsBlock | None, fn: Callable[[Stub], Awaitable[T]]) -> T:
    async def main() -> T:
        api = DaprApi(
            state=StateBlock("app", "", {}),
            invoke=InvokeBlock("app", "", Resolver(), Link(), None),
            metadata=MetadataBlock("app", lambda: []),
            request_shutdown=lambda: None,
            app_id="app",
            secrets=secrets,
        )
        server, port = await start_grpc_server(
            api, host="127.0.0.1", port=0, max_message_size=4 << 20, api_token=None
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await fn(Stub(ch))
        finally:
            await server.stop(None)

    return asyncio.run(main())


def block() -> tuple[SecretsBlock, FakeStore]:
    store = FakeStore()
    scope = SecretScope("vault", "allow", denied=frozenset({"b"}))
    return SecretsBlock("app", {"vault": store}, {"vault": scope}), store


def test_get_secret() -> None:
    b, store = block()
    req = secret_pb2.GetSecretRequest(store_name="vault", key="a", metadata={"m": "1"})
    resp = serve(b, lambda stub: stub.GetSecret(req))
    assert dict(resp.data) == {"a": "1"}
    assert store.calls == [("a", {"m": "1"})]


def test_get_bulk_secret_leaves_out_denied() -> None:
    b, _ = block()
    resp = serve(
        b, lambda stub: stub.GetBulkSecret(secret_pb2.GetBulkSecretRequest(store_name="vault"))
    )
    assert {k: dict(v.secrets) for k, v in resp.data.items()} == {"a": {"a": "1"}, "c": {"c": "3"}}


@pytest.mark.parametrize(
    ("store", "key", "code", "message"),
    [
        (
            "vault",
            "b",
            grpc.StatusCode.PERMISSION_DENIED,
            'access denied by policy to get "b" from "vault"',
        ),
        (
            "nope",
            "a",
            grpc.StatusCode.INVALID_ARGUMENT,
            "failed finding secret store with key nope",
        ),
        ("vault", "zz", grpc.StatusCode.INTERNAL, None),
    ],
)
def test_errors(store: str, key: str, code: grpc.StatusCode, message: str | None) -> None:
    b, _ = block()

    async def call(stub: Stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.GetSecret(secret_pb2.GetSecretRequest(store_name=store, key=key))
        return ei.value

    err = serve(b, call)
    assert err.code() == code
    if message is not None:
        assert err.details() == message


def test_without_secret_stores_is_failed_precondition() -> None:
    async def call(stub: Stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.GetBulkSecret(secret_pb2.GetBulkSecretRequest(store_name="vault"))
        return ei.value

    err = serve(None, call)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "secret store is not configured"
