"""The gRPC API server: the Dapr servicer, generic handlers, message limits and the API token."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from dapr.proto.runtime.v1 import dapr_pb2_grpc

from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.telemetry import Instrumented
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.tracing import Tracer

log = logging.getLogger("pillion.api.grpc.server")

TOKEN_KEY = "dapr-api-token"


class ApiTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call (Dapr's own and proxied ones) whose `dapr-api-token` is not the token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        given = _metadata_value(details.invocation_metadata, TOKEN_KEY)
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            return await continuation(details)
        # Dapr's messages (pkg/api/grpc/server.go). A bidi handler that aborts at once fits
        # any call shape and never waits for a request message.
        message = (
            "missing api token in request metadata"
            if given is None
            else "authentication error: api token mismatch"
        )

        async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.stream_stream_rpc_method_handler(deny)


def _metadata_value(md: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in md or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class _GenericOnly:
    """Takes the generated code's handlers as one generic handler, not as registered methods.

    grpcio's aio server waits on one task per *registered* method for every call; the Dapr
    service has ~95 methods, which costs ~100 µs a call. A generic handler is a dict lookup.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        tracer: Tracer | None = None,
        metrics: DaprMetrics | None = None,
        api_logging: bool = False,
    ) -> None:
        self._server = server
        self._tracer = tracer
        self._metrics = metrics
        self._api_logging = api_logging

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        traced = self._tracer is not None and self._tracer.enabled
        if traced or self._metrics is not None or self._api_logging:
            handlers = tuple(
                Instrumented(h, self._tracer, self._metrics, self._api_logging) for h in handlers
            )
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        pass  # the same handlers were just added as a generic handler


async def start_grpc_server(
    dapr_api: DaprApi,
    *,
    host: str | Sequence[str],
    port: int,
    max_message_size: int,
    api_token: str | None,
    generic_handlers: Sequence[grpc.GenericRpcHandler] = (),
    tracer: Tracer | None = None,
    metrics: DaprMetrics | None = None,
    api_logging: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Serve `dapr_api` (and `generic_handlers` for other services) on `port` of every host.

    Port 0 picks a free port, the same one on every host; the bound port is returned. Raises
    OSError when an address cannot be bound.
    """
    interceptors = [ApiTokenInterceptor(api_token)] if api_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_size),
            ("grpc.max_send_message_length", max_message_size),
            # gRPC sets SO_REUSEPORT by default: two sidecars could then share a port silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    dapr_pb2_grpc.add_DaprServicer_to_server(
        dapr_api, _GenericOnly(server, tracer, metrics, api_logging)
    )  # type: ignore[no-untyped-call]
    # Registered after the Dapr service, so they only see calls for other services.
    if generic_handlers:
        server.add_generic_rpc_handlers(tuple(generic_handlers))
    hosts = [host] if isinstance(host, str) else list(host)
    bound = port
    for h in hosts:
        address = f"[{h}]:{bound}" if ":" in h else f"{h}:{bound}"
        try:
            got = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for the gRPC API on {address}: {exc}") from exc
        if not got:
            raise OSError(f"cannot listen for the gRPC API on {address}")
        bound = got
    await server.start()
    log.info("gRPC API listening on %s port %d", ", ".join(hosts), bound)
    return server, bound
