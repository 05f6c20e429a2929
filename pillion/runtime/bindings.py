"""Input binding events to the app: OPTIONS then POST for HTTP apps, OnBindingEvent for gRPC."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
import grpc.aio
from dapr.proto.runtime.v1 import appcallback_pb2
from google.protobuf import empty_pb2

from pillion.blocks.bindings import BindingEntry
from pillion.blocks.invoke import CallFailed, Unreachable
from pillion.runtime.channels import HttpAppChannel
from pillion.runtime.grpc_app import GrpcAppChannel

log = logging.getLogger("pillion.runtime.bindings")

LIST_INPUT_BINDINGS = "/dapr.proto.runtime.v1.AppCallback/ListInputBindings"
ON_BINDING_EVENT = "/dapr.proto.runtime.v1.AppCallback/OnBindingEvent"
# How long the app may take to answer the OPTIONS probe or ListInputBindings.
PROBE_TIMEOUT_S = 10.0
_SKIP_HEADERS = frozenset({"content-type", "content-length", "host", "connection"})


class AppRejected(Exception):
    """The app did not accept an input binding event."""


class HttpBindingDeliverer:
    """`OPTIONS /{route}` once per binding, then `POST /{route}` per event (dapr-api.md §4.2)."""

    def __init__(self, app: HttpAppChannel) -> None:
        self.app = app

    @staticmethod
    def _path(entry: BindingEntry) -> bytes:
        route = entry.route or entry.name
        return (route if route.startswith("/") else "/" + route).encode()

    async def accepts(self, entry: BindingEntry) -> bool:
        try:
            resp = await self.app.invoke("OPTIONS", self._path(entry), [], b"")
        except (Unreachable, CallFailed) as exc:
            log.warning("OPTIONS probe of input binding %s failed: %s", entry.name, exc)
            return False
        return 200 <= resp.status < 300 or resp.status == 405

    async def deliver(self, entry: BindingEntry, data: bytes, metadata: Mapping[str, str]) -> bytes:
        headers = [(b"content-type", b"application/json")]
        for k, v in metadata.items():
            if k.lower() in _SKIP_HEADERS:
                continue
            headers.append((k.encode("latin-1", "replace"), v.encode("utf-8", "replace")))
        try:
            resp = await self.app.invoke("POST", self._path(entry), headers, data)
        except (Unreachable, CallFailed) as exc:
            raise AppRejected(f"app channel error: {exc}") from exc
        if not 200 <= resp.status < 300:
            raise AppRejected(f"app returned status code {resp.status}")
        return resp.body


class GrpcBindingDeliverer:
    """`ListInputBindings` once, then `OnBindingEvent` per event (dapr-api.md §4.2)."""

    def __init__(self, app: GrpcAppChannel) -> None:
        self.app = app
        self._listed: frozenset[str] | None = None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.app.app_token
        return (("dapr-api-token", token),) if token is not None else ()

    async def accepts(self, entry: BindingEntry) -> bool:
        if self._listed is None:
            self._listed = frozenset()
            try:
                channel = await self.app.get_channel()
                call = channel.unary_unary(
                    LIST_INPUT_BINDINGS,
                    request_serializer=empty_pb2.Empty.SerializeToString,
                    response_deserializer=appcallback_pb2.ListInputBindingsResponse.FromString,
                )
                resp = await call(
                    empty_pb2.Empty(), metadata=self._metadata(), timeout=PROBE_TIMEOUT_S
                )
                self._listed = frozenset(resp.bindings)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    log.error("error listing input bindings of the app: %s", exc.details())
            except (grpc.RpcError, Unreachable) as exc:
                log.error("error listing input bindings of the app: %s", exc)
        return entry.name in self._listed

    async def deliver(self, entry: BindingEntry, data: bytes, metadata: Mapping[str, str]) -> bytes:
        channel = await self.app.get_channel()
        call = channel.unary_unary(
            ON_BINDING_EVENT,
            request_serializer=appcallback_pb2.BindingEventRequest.SerializeToString,
            response_deserializer=appcallback_pb2.BindingEventResponse.FromString,
        )
        req = appcallback_pb2.BindingEventRequest(
            name=entry.name, data=data, metadata=dict(metadata)
        )
        trace = tuple((k, metadata[k]) for k in ("traceparent", "tracestate") if metadata.get(k))
        try:
            resp = await call(req, metadata=self._metadata() + trace)
        except grpc.aio.AioRpcError as exc:
            raise AppRejected(f"error invoking app: {exc.code().name}: {exc.details()}") from exc
        return bytes(resp.data)
