"""The `dapr.proto.runtime.v1.Dapr` servicer: decode protobuf, await a block, encode the answer."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final, TypeVar
from urllib.parse import quote

import grpc
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import (
    appcallback_pb2,
    binding_pb2,
    configuration_pb2,
    dapr_pb2,
    dapr_pb2_grpc,
    invoke_pb2,
    lock_pb2,
    metadata_pb2,
    pubsub_pb2,
    secret_pb2,
    state_pb2,
)
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2

from pillion.api.grpc.errors import abort, make_status, status_code
from pillion.api.grpc.telemetry import current_context, trace_metadata
from pillion.blocks import cloudevents as ce
from pillion.blocks.bindings import BindingsBlock
from pillion.blocks.configuration import ConfigurationBlock
from pillion.blocks.invoke import (
    ANY_TYPE_HEADER,
    APP_PROTOCOL_HEADER,
    GRPC_DETAILS_HEADER,
    GRPC_MESSAGE_HEADER,
    GRPC_STATUS_HEADER,
    NO_VERB_HEADER,
    Headers,
    InvokeBlock,
    InvokeRequest,
    InvokeResponse,
    decode_grpc_message,
    response_headers,
    set_trace_context,
)
from pillion.blocks.lock import LockBlock
from pillion.blocks.metadata import MetadataBlock
from pillion.blocks.pubsub import (
    BulkItem,
    BulkPublishEntry,
    Delivery,
    PubSubBlock,
    SubscriptionSpec,
    deliver_each,
)
from pillion.blocks.routing import Routes
from pillion.blocks.secrets import SecretsBlock
from pillion.blocks.state import SaveItem, StateBlock, TxOperation
from pillion.components.pubsub.api import PubSubError
from pillion.components.state.api import Concurrency, Consistency
from pillion.errors import DOMAIN, Code, GrpcCode, PillionError, bad_request, unimplemented

log = logging.getLogger("pillion.api.grpc.dapr_api")

_Opts = common_pb2.StateOptions
_CONCURRENCY: dict[int, Concurrency] = {
    _Opts.CONCURRENCY_FIRST_WRITE: Concurrency.FIRST_WRITE,
    _Opts.CONCURRENCY_LAST_WRITE: Concurrency.LAST_WRITE,
}
_CONSISTENCY: dict[int, Consistency] = {
    _Opts.CONSISTENCY_EVENTUAL: Consistency.EVENTUAL,
    _Opts.CONSISTENCY_STRONG: Consistency.STRONG,
}
# HTTPExtension.Verb number -> HTTP method; NONE (0) and unknown numbers are absent on purpose.
_VERBS: dict[int, str] = {
    number: name
    for name, number in common_pb2.HTTPExtension.Verb.items()
    if number != common_pb2.HTTPExtension.NONE
}
_ACTOR_STATUS = metadata_pb2.ActorRuntime.ActorRuntimeStatus

# Caller metadata that describes the gRPC call itself, not the invocation: never forwarded.
_REQUEST_MD_DROP = frozenset({"content-type", "user-agent", "te", "dapr-api-token"})
# Prefix of pillion's own link headers: a caller must not be able to inject them.
_INTERNAL_PREFIX = "pillion-"
# Response headers Dapr renames `dapr-<name>` in gRPC metadata (IANA permanent HTTP headers,
# InternalMetadataToGrpcMetadata in dapr/pkg/messaging/v1/util.go).
_PERMANENT = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-language",
        "accept-ranges",
        "cache-control",
        "content-type",
        "cookie",
        "date",
        "expect",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-schedule-tag-match",
        "if-unmodified-since",
        "max-forwards",
        "origin",
        "pragma",
        "referer",
        "via",
        "warning",
    }
)
_MD_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
# Characters a method name keeps as-is when it becomes the callee's request path; everything
# else is percent-encoded as Go's URL writer does for Dapr (existing %XX escapes are kept).
_PATH_SAFE = "/%!$&'()*+,;=:@~"
# Go's http.StatusText where it differs from Python's phrase (Dapr puts it in ErrorInfo.reason).
_GO_STATUS_TEXT = {414: "Request URI Too Long", 418: "I'm a teapot"}
# ErrorInfo metadata values are limited to 63 characters (maxMetadataValueLen in Dapr).
_MAX_MD_VALUE = 63

# Dapr's CodeFromHTTPStatus (dapr/pkg/messaging/v1/util.go): other 2xx are OK, the rest UNKNOWN.
_HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    408: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.UNKNOWN,
    400: grpc.StatusCode.INTERNAL,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    403: grpc.StatusCode.PERMISSION_DENIED,
    401: grpc.StatusCode.UNAUTHENTICATED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

_Self = TypeVar("_Self", bound="DaprApi")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[_Self, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def _rpc(fn: _Handler[_Self, _Req, _Resp]) -> _Handler[_Self, _Req, _Resp]:
    """Encode a block's PillionError as Dapr's status; any other exception is a bug."""

    @functools.wraps(fn)
    async def wrapper(self: _Self, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await fn(self, request, context)
        except PillionError as err:
            await abort(context, err)
        except grpc.aio.AbortError:
            raise  # context.abort() already set the status
        except Exception as exc:
            log.exception("unhandled error serving %s", fn.__name__)
            await abort(
                context,
                PillionError(
                    Code.ERROR, f"internal error: {type(exc).__name__}", 500, GrpcCode.UNKNOWN
                ),
            )

    return wrapper


class DaprApi(dapr_pb2_grpc.DaprServicer):
    """Dapr's gRPC API over the same blocks as the HTTP API; RPCs not built answer UNIMPLEMENTED."""

    def __init__(
        self,
        *,
        state: StateBlock,
        invoke: InvokeBlock,
        metadata: MetadataBlock,
        request_shutdown: Callable[[], None],
        app_id: str,
        pubsub: PubSubBlock | None = None,
        lock: LockBlock | None = None,
        secrets: SecretsBlock | None = None,
        bindings: BindingsBlock | None = None,
        configuration: ConfigurationBlock | None = None,
    ) -> None:
        self.state = state
        self.invoke = invoke
        self.metadata = metadata
        self.request_shutdown = request_shutdown
        self.app_id = app_id
        self.pubsub = pubsub
        # No block means no lock stores: the block itself gives Dapr's answer for that.
        self.lock = lock or LockBlock(app_id, {})
        # No block means no secret stores: the block itself gives Dapr's answer for that.
        self.secrets = secrets or SecretsBlock(app_id, {})
        # No block means no bindings: the block itself gives Dapr's answer for that.
        self.bindings = bindings or BindingsBlock(app_id, {})
        # No block means no configuration stores: the block gives Dapr's answer for that.
        self.configuration = configuration or ConfigurationBlock(app_id, {})

    # --- state ----------------------------------------------------------------------------------

    @_rpc
    async def GetState(
        self, request: state_pb2.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetStateResponse:
        res = await self.state.get(
            request.store_name,
            request.key,
            consistency=_CONSISTENCY.get(request.consistency, Consistency.UNSPECIFIED),
            metadata=dict(request.metadata),
        )
        if res is None:
            return state_pb2.GetStateResponse()
        return state_pb2.GetStateResponse(
            data=res.data, etag=res.etag or "", metadata=dict(res.metadata)
        )

    @_rpc
    async def GetBulkState(
        self, request: state_pb2.GetBulkStateRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetBulkStateResponse:
        # `parallelism` is ignored: the block reads all keys in one go.
        items = await self.state.bulk_get(
            request.store_name, list(request.keys), metadata=dict(request.metadata)
        )
        return state_pb2.GetBulkStateResponse(
            items=[
                state_pb2.BulkStateItem(
                    key=it.key,
                    data=it.data or b"",
                    etag=it.etag or "",
                    error=it.error or "",
                    metadata=dict(it.metadata),
                )
                for it in items
            ]
        )

    @_rpc
    async def SaveState(
        self, request: state_pb2.SaveStateRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.state.save(request.store_name, [_save_item(s) for s in request.states])
        return empty_pb2.Empty()

    @_rpc
    async def DeleteState(
        self, request: state_pb2.DeleteStateRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.state.delete(
            request.store_name,
            request.key,
            etag=request.etag.value if request.HasField("etag") else None,
            concurrency=_CONCURRENCY.get(request.options.concurrency, Concurrency.UNSPECIFIED),
            consistency=_CONSISTENCY.get(request.options.consistency, Consistency.UNSPECIFIED),
            metadata=dict(request.metadata),
        )
        return empty_pb2.Empty()

    @_rpc
    async def DeleteBulkState(
        self, request: state_pb2.DeleteBulkStateRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.state.bulk_delete(request.store_name, [_save_item(s) for s in request.states])
        return empty_pb2.Empty()

    @_rpc
    async def ExecuteStateTransaction(
        self,
        request: state_pb2.ExecuteStateTransactionRequest,
        context: grpc.aio.ServicerContext,
    ) -> empty_pb2.Empty:
        ops = [TxOperation(o.operationType, _save_item(o.request)) for o in request.operations]
        await self.state.transaction(request.storeName, ops, dict(request.metadata))
        return empty_pb2.Empty()

    @_rpc
    async def QueryStateAlpha1(
        self, request: state_pb2.QueryStateRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.QueryStateResponse:
        resp = await self.state.query(
            request.store_name, request.query.encode(), dict(request.metadata)
        )
        return state_pb2.QueryStateResponse(
            results=[
                state_pb2.QueryStateItem(
                    key=it.key, data=it.data, etag=it.etag or "", error=it.error or ""
                )
                for it in resp.results
            ],
            token=resp.token,
            metadata=dict(resp.metadata),
        )

    # --- secrets --------------------------------------------------------------------------------

    @_rpc
    async def GetSecret(
        self, request: secret_pb2.GetSecretRequest, context: grpc.aio.ServicerContext
    ) -> secret_pb2.GetSecretResponse:
        data = await self.secrets.get(request.store_name, request.key, dict(request.metadata))
        return secret_pb2.GetSecretResponse(data=data)

    @_rpc
    async def GetBulkSecret(
        self, request: secret_pb2.GetBulkSecretRequest, context: grpc.aio.ServicerContext
    ) -> secret_pb2.GetBulkSecretResponse:
        data = await self.secrets.bulk(request.store_name, dict(request.metadata))
        return secret_pb2.GetBulkSecretResponse(
            data={name: secret_pb2.SecretResponse(secrets=s) for name, s in data.items()}
        )

    # --- configuration ----------------------------------------------------------------------------

    @_rpc
    async def GetConfiguration(
        self,
        request: configuration_pb2.GetConfigurationRequest,
        context: grpc.aio.ServicerContext,
    ) -> configuration_pb2.GetConfigurationResponse:
        items = await self.configuration.get(
            request.store_name, list(request.keys), dict(request.metadata)
        )
        return configuration_pb2.GetConfigurationResponse(
            items={
                k: common_pb2.ConfigurationItem(
                    value=i.value, version=i.version, metadata=i.metadata
                )
                for k, i in items.items()
            }
        )

    GetConfigurationAlpha1 = GetConfiguration

    @_rpc
    async def SubscribeConfiguration(
        self,
        request: configuration_pb2.SubscribeConfigurationRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """First message: the id alone (the SDK waits for it); then one per change batch."""
        sub_id, updates = await self.configuration.subscribe(
            request.store_name, list(request.keys), dict(request.metadata)
        )
        try:
            await context.write(configuration_pb2.SubscribeConfigurationResponse(id=sub_id))
            async for batch in updates:
                await context.write(
                    configuration_pb2.SubscribeConfigurationResponse(
                        id=sub_id,
                        items={
                            k: common_pb2.ConfigurationItem(
                                value=i.value, version=i.version, metadata=i.metadata
                            )
                            for k, i in batch.items()
                        },
                    )
                )
        finally:
            # Ending the stream unsubscribes, as in Dapr.
            await asyncio.shield(self.configuration.unsubscribe(sub_id))

    SubscribeConfigurationAlpha1 = SubscribeConfiguration

    @_rpc
    async def UnsubscribeConfiguration(
        self,
        request: configuration_pb2.UnsubscribeConfigurationRequest,
        context: grpc.aio.ServicerContext,
    ) -> configuration_pb2.UnsubscribeConfigurationResponse:
        if await self.configuration.unsubscribe(request.id, request.store_name or None):
            return configuration_pb2.UnsubscribeConfigurationResponse(ok=True)
        return configuration_pb2.UnsubscribeConfigurationResponse(
            ok=False, message=f"subscription with id {request.id} does not exist"
        )

    UnsubscribeConfigurationAlpha1 = UnsubscribeConfiguration

    # --- bindings -------------------------------------------------------------------------------

    @_rpc
    async def InvokeBinding(
        self, request: binding_pb2.InvokeBindingRequest, context: grpc.aio.ServicerContext
    ) -> binding_pb2.InvokeBindingResponse:
        md = dict(request.metadata)
        traceparent, tracestate = _trace_context(context.invocation_metadata() or ())
        if traceparent:
            md.setdefault("traceparent", traceparent)
        if tracestate:
            md.setdefault("tracestate", tracestate)
        resp = await self.bindings.invoke(request.name, request.operation, request.data, md)
        return binding_pb2.InvokeBindingResponse(data=resp.data, metadata=resp.metadata)

    # --- distributed lock (alpha) ----------------------------------------------------------------

    @_rpc
    async def TryLockAlpha1(
        self, request: lock_pb2.TryLockRequest, context: grpc.aio.ServicerContext
    ) -> lock_pb2.TryLockResponse:
        won = await self.lock.try_lock(
            request.store_name, request.resource_id, request.lock_owner, request.expiry_in_seconds
        )
        return lock_pb2.TryLockResponse(success=won)

    @_rpc
    async def UnlockAlpha1(
        self, request: lock_pb2.UnlockRequest, context: grpc.aio.ServicerContext
    ) -> lock_pb2.UnlockResponse:
        status = await self.lock.unlock(request.store_name, request.resource_id, request.lock_owner)
        return lock_pb2.UnlockResponse(status=lock_pb2.UnlockResponse.Status.ValueType(status))

    # --- metadata / shutdown --------------------------------------------------------------------

    @_rpc
    async def GetMetadata(
        self, request: metadata_pb2.GetMetadataRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.GetMetadataResponse:
        return _metadata_response(self.metadata.snapshot())

    @_rpc
    async def SetMetadata(
        self, request: metadata_pb2.SetMetadataRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        self.metadata.set(request.key, request.value)
        return empty_pb2.Empty()

    @_rpc
    async def Shutdown(
        self, request: dapr_pb2.ShutdownRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        self.request_shutdown()
        return empty_pb2.Empty()

    # --- service invocation ---------------------------------------------------------------------

    @_rpc
    async def InvokeService(
        self, request: invoke_pb2.InvokeServiceRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.InvokeResponse:
        msg = request.message
        headers: Headers = []
        verb = _VERBS.get(msg.http_extension.verb)
        if verb is None:
            # An HTTP callee needs a verb (its app channel answers InvalidArgument); a gRPC one
            # does not, so the call still travels, as a POST.
            verb = "POST"
            headers.append((NO_VERB_HEADER, b"1"))
        if msg.content_type:
            headers.append((b"content-type", msg.content_type.encode()))
        if msg.data.type_url:
            headers.append((ANY_TYPE_HEADER, msg.data.type_url.encode()))
        headers.extend(_request_headers(context.invocation_metadata() or ()))
        ctx = current_context.get()
        if ctx is not None:
            set_trace_context(headers, ctx)
        resp = await self.invoke.invoke(
            InvokeRequest(
                app_id=request.id,
                method=quote(msg.method, safe=_PATH_SAFE),
                verb=verb,
                query=msg.http_extension.querystring.encode(),
                headers=headers,
                body=msg.data.value,
                peer=_peer_ip(context.peer()),
                protocol="grpc",
            )
        )
        # Dapr sends the HTTP status and the callee's headers, also before an error. With
        # nothing to send (a gRPC app's bare answer) the response goes without a separate
        # metadata batch: the headers ride with the message, as grpc-go sends them.
        md = _response_metadata(resp)
        if md:
            await context.send_initial_metadata(md)
        failure = _failure_status(resp)
        if failure is not None:
            await context.abort_with_status(failure)
        return common_pb2.InvokeResponse(
            data=any_pb2.Any(
                type_url=_header(resp.headers, ANY_TYPE_HEADER).decode("latin-1"),
                value=resp.body,
            ),
            content_type=_header(resp.headers, b"content-type").decode("latin-1"),
        )

    # --- pub/sub --------------------------------------------------------------------------------

    def _pubsub(self) -> PubSubBlock:
        if self.pubsub is None:
            raise unimplemented("pub/sub")
        return self.pubsub

    @_rpc
    async def PublishEvent(
        self, request: pubsub_pb2.PublishEventRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        traceparent, tracestate = _trace_context(context.invocation_metadata() or ())
        await self._pubsub().publish(
            request.pubsub_name,
            request.topic,
            request.data,
            # Empty means "not given": the block applies text/plain (dapr-api.md §3.4).
            content_type=request.data_content_type or None,
            metadata=dict(request.metadata),
            traceparent=traceparent,
            tracestate=tracestate,
        )
        return empty_pb2.Empty()

    @_rpc
    async def BulkPublishEvent(
        self, request: pubsub_pb2.BulkPublishRequest, context: grpc.aio.ServicerContext
    ) -> pubsub_pb2.BulkPublishResponse:
        return await self._bulk_publish(request, context)

    @_rpc
    async def BulkPublishEventAlpha1(
        self, request: pubsub_pb2.BulkPublishRequest, context: grpc.aio.ServicerContext
    ) -> pubsub_pb2.BulkPublishResponse:
        # Deprecated twin of BulkPublishEvent, same messages (older SDKs call only this one).
        return await self._bulk_publish(request, context)

    async def _bulk_publish(
        self, request: pubsub_pb2.BulkPublishRequest, context: grpc.aio.ServicerContext
    ) -> pubsub_pb2.BulkPublishResponse:
        traceparent, tracestate = _trace_context(context.invocation_metadata() or ())
        failed = await self._pubsub().bulk_publish(
            request.pubsub_name,
            request.topic,
            [
                BulkPublishEntry(e.entry_id, e.event, e.content_type, dict(e.metadata))
                for e in request.entries
            ],
            dict(request.metadata),
            traceparent=traceparent,
            tracestate=tracestate,
        )
        # Failed entries are an answer, not an error: the call itself succeeds, as in Dapr.
        return pubsub_pb2.BulkPublishResponse(
            failedEntries=[
                pubsub_pb2.BulkPublishResponseFailedEntry(entry_id=entry_id, error=error)
                for entry_id, error in failed
            ]
        )

    @_rpc
    async def SubscribeTopicEventsAlpha1(
        self,
        request_iterator: AsyncIterator[pubsub_pb2.SubscribeTopicEventsRequestAlpha1],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """A streaming subscription (dapr-api.md §3.8): it lives as long as the stream."""
        block = self._pubsub()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof(_REQUEST_ONEOF) != "initial_request":
            raise bad_request("initial request is required")
        init = first.initial_request
        block.entry(init.pubsub_name, init.topic)  # unknown pubsub, empty names: rich errors
        spec = SubscriptionSpec(
            init.pubsub_name,
            init.topic,
            Routes([], "/"),
            dict(init.metadata),
            init.dead_letter_topic,
            "STREAMING",
        )
        stream = EventStream(context)
        try:
            # Subscribed before the initial response, as daprd does: an event published once
            # the client's subscribe() returned reaches it. Events wait for the response.
            try:
                subscribed = await block.subscribe(spec, stream)
            except PubSubError as exc:
                raise PillionError(
                    Code.ERROR,
                    f"error subscribing to topic {init.topic} in pubsub {init.pubsub_name}: {exc}",
                    500,
                    GrpcCode.INTERNAL,
                ) from exc
            if not subscribed:
                # The block refuses only for topic scoping here (the pubsub was looked up above).
                raise PillionError(
                    "ERR_PUBSUB_FORBIDDEN",
                    f"topic {init.topic} is not allowed for app id {block.app_id}",
                    403,
                    GrpcCode.PERMISSION_DENIED,
                    reason="DAPR_PUBSUB_FORBIDDEN",
                    metadata={"appID": block.app_id, "topic": init.topic},
                    resource_type="pubsub",
                    resource_name=init.pubsub_name,
                )
            # The SDK reads exactly one message before it starts iterating: answer at once.
            await stream.open()
            async for msg in request_iterator:
                if msg.WhichOneof(_REQUEST_ONEOF) != "event_processed":
                    raise bad_request("duplicate initial request received")
                stream.processed(msg.event_processed.id, msg.event_processed.status.status)
        finally:
            # Deliveries waiting on this stream get RETRY (the broker keeps their messages).
            stream.close()
            await asyncio.shield(block.unsubscribe(spec))


# --- RPCs of blocks not built yet -----------------------------------------------------------------

# Substring of the lowercased RPC name -> the block named in the UNIMPLEMENTED message; the first
# match wins, so more specific entries come first.
UNIMPLEMENTED_BLOCKS: tuple[tuple[str, str], ...] = (
    ("actor", "actors"),
    ("crypt", "cryptography"),
    ("subtle", "cryptography"),
    ("workflow", "workflow"),
    ("job", "jobs"),
    ("converse", "conversation"),
    ("vector", "vector store"),
    ("collection", "vector store"),
    ("binaryfile", "binary file store"),
    ("index", "search"),
    ("document", "search"),
    ("search", "search"),
)


def block_of(rpc: str) -> str | None:
    """The block an RPC of the Dapr service belongs to, from UNIMPLEMENTED_BLOCKS."""
    low = rpc.lower()
    for needle, block in UNIMPLEMENTED_BLOCKS:
        if needle in low:
            return block
    return None


def _unimplemented_rpc(name: str, block: str) -> Callable[..., Awaitable[None]]:
    err = unimplemented(block)

    # One coroutine serves unary and streaming RPCs alike: grpc.aio runs a coroutine handler
    # of a streaming RPC without reading requests, so the answer comes at once.
    async def rpc(self: DaprApi, request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, err)

    rpc.__name__ = rpc.__qualname__ = name
    return rpc


def _install_unimplemented(cls: type[DaprApi]) -> None:
    for name in dir(dapr_pb2_grpc.DaprServicer):
        if name.startswith("_") or name in cls.__dict__:
            continue
        # An RPC added by a newer SDK that fits no entry still answers UNIMPLEMENTED.
        setattr(cls, name, _unimplemented_rpc(name, block_of(name) or name))


_install_unimplemented(DaprApi)


# --- pub/sub over gRPC: shared with the gRPC app channel ------------------------------------------

_REQUEST_ONEOF: Final = "subscribe_topic_events_request_type"


def topic_event_request(
    envelope: Mapping[str, Any], path: str, *, topic: str, pubsub: str
) -> appcallback_pb2.TopicEventRequest:
    """The TopicEventRequest for a delivered CloudEvent (OnTopicEvent and streaming).

    `topic` and `pubsub` are the subscription's. Raises ce.CloudEventError where Dapr returns
    a retriable error (undecodable data).
    """
    ev = ce.topic_event_fields(envelope, topic=topic, pubsub=pubsub)
    req = appcallback_pb2.TopicEventRequest(
        id=ev.id,
        source=ev.source,
        type=ev.type,
        spec_version=ev.spec_version,
        data_content_type=ev.data_content_type,
        data=ev.data,
        topic=ev.topic,
        pubsub_name=ev.pubsub_name,
        path=path,
    )
    try:
        req.extensions.update(ev.extensions)
    except (TypeError, ValueError) as exc:
        raise ce.CloudEventError(f"cloud event extensions: {exc}") from exc
    return req


class EventStream:
    """One SubscribeTopicEventsAlpha1 stream as the block's AppDeliverer.

    Each event goes out as `event_message`; its delivery waits for the client's matching
    `event_processed`. Events may be in flight concurrently (the broker bounds how many).
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._send_lock = asyncio.Lock()  # grpc allows one write in flight per call
        self._opened = asyncio.Event()
        self._waiting: dict[str, list[asyncio.Future[ce.Result]]] = {}
        self.closed = False

    async def _send(self, msg: pubsub_pb2.SubscribeTopicEventsResponseAlpha1) -> None:
        async with self._send_lock:
            await self._context.write(msg)

    async def open(self) -> None:
        """Send `initial_response`; events are streamed only after it."""
        await self._send(
            pubsub_pb2.SubscribeTopicEventsResponseAlpha1(
                initial_response=pubsub_pb2.SubscribeTopicEventsResponseInitialAlpha1()
            )
        )
        self._opened.set()

    async def deliver_bulk(
        self, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
    ) -> dict[str, ce.Result]:
        return await deliver_each(self, spec, path, items)

    async def deliver(self, d: Delivery) -> ce.Result:
        await self._opened.wait()
        if self.closed:
            return ce.Result.RETRY
        try:
            event = topic_event_request(d.envelope, "", topic=d.spec.topic, pubsub=d.spec.pubsub)
        except ce.CloudEventError as exc:
            log.error("cannot stream event on topic %s: %s", d.spec.topic, exc)
            return ce.Result.RETRY
        fut: asyncio.Future[ce.Result] = asyncio.get_running_loop().create_future()
        # Registered before sending, so an answer that comes back at once is not missed.
        waiting = self._waiting.setdefault(event.id, [])
        waiting.append(fut)
        try:
            try:
                await self._send(pubsub_pb2.SubscribeTopicEventsResponseAlpha1(event_message=event))
            except Exception as exc:  # the stream ended while sending: the client is gone
                log.debug("streaming event %s failed: %r", event.id, exc)
                return ce.Result.RETRY
            return await fut
        finally:
            if fut in waiting:
                waiting.remove(fut)
            if not waiting and self._waiting.get(event.id) is waiting:
                del self._waiting[event.id]

    def processed(self, event_id: str, status: int) -> None:
        """The client's answer for `event_id` (the oldest delivery of that id waiting)."""
        for fut in self._waiting.get(event_id, ()):
            if not fut.done():
                fut.set_result(ce.grpc_result(status))
                return
        log.debug("answer for unknown event %s ignored", event_id)

    def close(self) -> None:
        self.closed = True
        self._opened.set()  # deliveries still waiting for the stream to open give up
        for waiting in self._waiting.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_result(ce.Result.RETRY)


def _trace_context(md: Sequence[tuple[str, str | bytes]]) -> tuple[str, str]:
    """The W3C context downstream calls carry: the API span's, else the caller's own."""
    return trace_metadata(md)


# --- decoding -------------------------------------------------------------------------------------


def _save_item(s: common_pb2.StateItem) -> SaveItem:
    return SaveItem(
        key=s.key,
        value=s.value,
        # An absent or empty etag message means "no etag".
        etag=(s.etag.value or None) if s.HasField("etag") else None,
        metadata=dict(s.metadata),
        concurrency=_CONCURRENCY.get(s.options.concurrency, Concurrency.UNSPECIFIED),
        consistency=_CONSISTENCY.get(s.options.consistency, Consistency.UNSPECIFIED),
    )


def _request_headers(md: Iterable[tuple[str, str | bytes]]) -> Headers:
    """The caller's invocation metadata as HTTP headers, minus what belongs to the gRPC call."""
    out: Headers = []
    for key, value in md:
        k = key.lower()
        if (
            k.startswith((":", "grpc-", _INTERNAL_PREFIX))
            or k.endswith("-bin")
            or k in _REQUEST_MD_DROP
            or not isinstance(value, str)
        ):
            continue
        out.append((k.encode("latin-1"), value.encode("latin-1", "replace")))
    return out


def _peer_ip(peer: str) -> str:
    """The caller's IP as the HTTP adapter gives it: "ipv4:10.0.0.1:5000" -> "10.0.0.1"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest[1:].partition("]")[0] if rest.startswith("[") else rest.rpartition(":")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


# --- encoding -------------------------------------------------------------------------------------


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v
    return b""


def _has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(k.lower() == name for k, _ in headers)


def _md_value_ok(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def _response_metadata(resp: InvokeResponse) -> list[tuple[str, str]]:
    """The callee's headers as gRPC metadata, named as Dapr names them; `dapr-http-status`
    first when an HTTP app (or a sidecar) answered. A gRPC app's content type travels in the
    message, not in the metadata."""
    grpc_app = _has_header(resp.headers, APP_PROTOCOL_HEADER)
    md: list[tuple[str, str]] = [] if grpc_app else [("dapr-http-status", str(resp.status))]
    for raw_key, raw_value in response_headers(resp.headers):
        key = raw_key.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if key.startswith((_INTERNAL_PREFIX, "grpc-", ":")) or key.endswith("-bin"):
            continue
        if grpc_app and key == "content-type":
            continue
        if key in _PERMANENT:
            key = "dapr-" + key
        # gRPC metadata allows fewer characters than HTTP headers; such a header cannot travel.
        if not key or not set(key) <= _MD_KEY_CHARS or not _md_value_ok(value):
            continue
        md.append((key, value))
    return md


def _failure_status(resp: InvokeResponse) -> grpc.Status | None:
    """The gRPC status a non-successful invocation ends with, or None when it succeeded."""
    if _has_header(resp.headers, GRPC_STATUS_HEADER):
        # The callee side reported a gRPC status (a gRPC app's own, or a sidecar error).
        raw = _header(resp.headers, GRPC_STATUS_HEADER)
        try:
            number = int(raw)
        except ValueError:
            number = grpc.StatusCode.UNKNOWN.value[0]
        if number == grpc.StatusCode.OK.value[0]:
            return None
        # Percent-encoded as gRPC's own grpc-message is.
        message = decode_grpc_message(_header(resp.headers, GRPC_MESSAGE_HEADER))
        return make_status(status_code(number), message, _details(resp.headers))
    if 200 <= resp.status < 300:
        return None
    text = _status_text(resp.status)
    info = error_details_pb2.ErrorInfo(
        reason=text,
        domain=DOMAIN,
        metadata={
            "http.code": str(resp.status),
            "http.error_message": resp.body[:_MAX_MD_VALUE].decode("utf-8", "replace"),
        },
    )
    code = _HTTP_TO_GRPC.get(resp.status, grpc.StatusCode.UNKNOWN)
    return make_status(code, text, [info])


def _details(headers: Iterable[tuple[bytes, bytes]]) -> list[any_pb2.Any]:
    raw = _header(headers, GRPC_DETAILS_HEADER)
    if not raw:
        return []
    try:
        st = status_pb2.Status.FromString(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError) as exc:
        # A malformed details header loses the details, never the status itself.
        log.warning("dropping undecodable %s header: %s", GRPC_DETAILS_HEADER.decode(), exc)
        return []
    return list(st.details)


def _status_text(status: int) -> str:
    """Go's http.StatusText: what Dapr uses as the message and ErrorInfo.reason."""
    if status in _GO_STATUS_TEXT:
        return _GO_STATUS_TEXT[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _metadata_response(snap: Mapping[str, Any]) -> metadata_pb2.GetMetadataResponse:
    """The metadata block's snapshot (Dapr's JSON shape) as GetMetadataResponse."""
    resp = metadata_pb2.GetMetadataResponse(
        id=snap.get("id", ""),
        runtime_version=snap.get("runtimeVersion", ""),
        enabled_features=list(snap.get("enabledFeatures", ())),
        extended_metadata=dict(snap.get("extended", {})),
        registered_components=[
            metadata_pb2.RegisteredComponents(
                name=c["name"],
                type=c["type"],
                version=c["version"],
                capabilities=list(c.get("capabilities", ())),
            )
            for c in snap.get("components", ())
        ],
    )
    app = snap.get("appConnectionProperties")
    if app is not None:
        props = resp.app_connection_properties
        props.port = app.get("port", 0)
        props.protocol = app.get("protocol", "")
        props.channel_address = app.get("channelAddress", "")
        props.max_concurrency = app.get("maxConcurrency", 0)
        health = app.get("health")
        if health is not None:
            props.health.health_check_path = health.get("healthCheckPath", "")
            props.health.health_probe_interval = health.get("healthProbeInterval", "")
            props.health.health_probe_timeout = health.get("healthProbeTimeout", "")
            props.health.health_threshold = health.get("healthThreshold", 0)
    actors = snap.get("actorRuntime")
    if actors is not None:
        resp.actor_runtime.runtime_status = _ACTOR_STATUS.Value(
            actors.get("runtimeStatus", "DISABLED")
        )
        resp.actor_runtime.host_ready = bool(actors.get("hostReady", False))
        resp.actor_runtime.placement = actors.get("placement", "")
    return resp
