"""The gRPC proxy: a call with `dapr-app-id` metadata goes, as raw bytes, to that app's sidecar."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Protocol

import grpc
import grpc.aio

log = logging.getLogger("pillion.api.grpc.proxy")

APP_ID_KEY = "dapr-app-id"
CALLEE_KEY = "dapr-callee-app-id"
CALLER_KEY = "dapr-caller-app-id"
TOKEN_KEY = "dapr-api-token"
# Set on the sidecar-to-sidecar hop: the receiving sidecar must deliver to its own app, never
# forward again, so a stale registry entry cannot bounce a call between sidecars.
HOP_KEY = "pillion-grpc-proxied"

# Request metadata that belongs to one HTTP/2 hop or to gRPC itself, never forwarded.
_DROP_REQUEST = frozenset(
    {"user-agent", "te", "content-type", "host", "connection", "keep-alive", "upgrade"}
)
# Trailers a proxy must pass on although gRPC reserves the prefix: the rich error details.
_KEEP_GRPC = frozenset({"grpc-status-details-bin"})
# The text gRPC core gives when it never reached the peer: only then is a retry known to be safe.
_NOT_CONNECTED = ("failed to connect to all addresses", "DNS resolution failed")
# How long a dropped channel's other calls may still finish before they are cancelled.
_RETIRE_GRACE_S = 5.0

Metadata = tuple[tuple[str, str | bytes], ...]


class GrpcAddress(Protocol):
    """Where a peer sidecar's gRPC API listens."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class GrpcResolver(Protocol):
    async def resolve_grpc(self, app_id: str, namespace: str = "") -> GrpcAddress:
        """A live sidecar of the app; raises LookupError when there is none."""
        ...

    def invalidate(self, app_id: str, namespace: str = "") -> None: ...


def _target(addr: GrpcAddress) -> str:
    return f"[{addr.host}]:{addr.port}" if ":" in addr.host else f"{addr.host}:{addr.port}"


def _reserved(key: str) -> bool:
    return key.startswith((":", "grpc-")) and key not in _KEEP_GRPC


def _forwardable(md: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in md or () if not _reserved(k) and k not in _DROP_REQUEST]


def _response_metadata(md: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    return tuple((k, v) for k, v in md or () if not _reserved(k) and k != "content-type")


def _first(md: Iterable[tuple[str, str | bytes]] | None, key: str) -> str:
    for k, v in md or ():
        if k == key and isinstance(v, str):
            return v
    return ""


def _split(raw: str) -> tuple[str, str]:
    """("app", "ns") from "app.ns" (Dapr's rule: at most one dot)."""
    if raw.count(".") > 1:
        raise ValueError(f"invalid app id {raw}: more than one '.' in the id")
    app, _, ns = raw.partition(".")
    if not app:
        raise ValueError(f"invalid app id {raw!r}")
    return app, ns


class _Requests:
    """The caller's request stream, read once across attempts, keeping what a replay needs.

    A read in progress is shared through a future, so cancelling one attempt's pump does not
    cancel (and lose) the read that the retry's pump then continues.
    """

    def __init__(self, requests: AsyncIterable[bytes]) -> None:
        # Iterated lazily: a call refused before forwarding never starts gRPC's reader, which
        # would otherwise be left un-awaited.
        self._requests = requests
        self._it: AsyncIterator[bytes] | None = None
        self._pending: asyncio.Future[bytes | None] | None = None
        self._done = False
        self.count = 0
        self.first: bytes | None = None

    @property
    def replayable(self) -> bool:
        """A retry can resend everything taken so far (at most one message: a unary request)."""
        return self.count <= 1

    async def next(self) -> bytes | None:
        if self._done:
            return None
        if self._pending is None:
            if self._it is None:
                self._it = aiter(self._requests)
            self._pending = asyncio.ensure_future(anext(self._it, None))
        msg = await asyncio.shield(self._pending)
        self._pending = None
        if msg is None:
            self._done = True
        else:
            self.count += 1
            self.first = msg if self.count == 1 else None
        return msg

    async def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait([pending])
        elif pending is not None and not pending.cancelled():
            pending.exception()  # retrieved, so asyncio does not log it as never retrieved


class GrpcProxy(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    """Serves every method the sidecar itself does not, for calls naming a target app.

    Register it after the Dapr servicer so the servicer's own methods win. Messages pass as raw
    bytes (no (de)serializers), and one stream-stream handler carries unary, client-streaming,
    server-streaming and bidi calls alike, since they differ only in how many messages flow.
    """

    def __init__(
        self,
        *,
        app_id: str,
        namespace: str,
        resolver: GrpcResolver | None,
        local_app: Callable[[], grpc.aio.Channel | None],
        max_message_size: int,
        app_token: str | None = None,
        peer_token: str | None = None,
    ) -> None:
        self._app_id = app_id
        self._namespace = namespace
        self._resolver = resolver
        self._local_app = local_app
        self._app_token = app_token
        # Peers guard their gRPC port with DAPR_API_TOKEN too; sidecars of one deployment share
        # it (standalone), so the hop carries ours. mTLS identities replace this later.
        self._peer_token = peer_token
        self._options = (
            ("grpc.max_send_message_length", max_message_size),
            ("grpc.max_receive_message_length", max_message_size),
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._closed = False

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        md = handler_call_details.invocation_metadata
        target = _first(md, APP_ID_KEY) or _first(md, CALLEE_KEY)
        if not target:
            return None  # not a proxied call: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._proxy, str(method), target)
        )

    async def close(self) -> None:
        """Close the channels opened to other sidecars (not the app channel, which we borrow)."""
        self._closed = True
        channels = list(self._channels.values())
        self._channels = {}
        retiring, self._retiring = self._retiring, {}
        for task, ch in retiring.items():
            # Stop waiting out the grace; the close below cancels what is left at once.
            task.cancel()
            await asyncio.wait([task])
            channels.append(ch)
        for ch in channels:
            await ch.close()

    # --- one call ----------------------------------------------------------------------------

    async def _proxy(
        self,
        method: str,
        raw_target: str,
        requests: AsyncIterable[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        try:
            app, ns = _split(raw_target)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        ns = ns or self._namespace
        incoming = context.invocation_metadata()
        source = _Requests(requests)
        try:
            if app == self._app_id and ns == self._namespace:
                await self._to_local_app(method, incoming, source, context)
            elif _first(incoming, HOP_KEY):
                # Another sidecar resolved this app to us, but we serve a different one.
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"failed to proxy request: this sidecar serves app id {self._app_id!r}, "
                    f"not {raw_target!r}",
                )
            else:
                await self._to_remote(method, raw_target, app, ns, incoming, source, context)
        finally:
            await source.close()

    async def _to_local_app(
        self,
        method: str,
        incoming: Iterable[tuple[str, str | bytes]] | None,
        source: _Requests,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        channel = self._local_app()
        if channel is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "app channel is not initialized"
            )
            return
        # The caller's token is for the sidecar; the app gets the app token instead.
        md = [(k, v) for k, v in _forwardable(incoming) if k not in (TOKEN_KEY, HOP_KEY)]
        if self._app_token:
            md.append((TOKEN_KEY, self._app_token))
        unreachable = await self._forward(channel, method, tuple(md), source, context, replay=False)
        if unreachable is not None:
            await self._unreachable(context, f"the app is not reachable: {unreachable}")

    async def _to_remote(
        self,
        method: str,
        raw_target: str,
        app: str,
        ns: str,
        incoming: Iterable[tuple[str, str | bytes]] | None,
        source: _Requests,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        # `dapr-app-id` stays, so the target sidecar delivers to its own app.
        replaced = (TOKEN_KEY, CALLER_KEY, CALLEE_KEY, HOP_KEY)
        md = [(k, v) for k, v in _forwardable(incoming) if k not in replaced]
        md += [(CALLER_KEY, self._app_id), (CALLEE_KEY, app), (HOP_KEY, "1")]
        if self._peer_token:
            md.append((TOKEN_KEY, self._peer_token))
        unreachable = ""
        for attempt in range(2):
            address = await self._resolve(app, ns, raw_target, context)
            if address is None:
                return
            target = _target(address)
            channel = self._channel(target)
            failed = await self._forward(
                channel, method, tuple(md), source, context, replay=attempt > 0
            )
            if failed is None:
                return
            unreachable = f"{raw_target} at {target} is not reachable: {failed}"
            # Never connected: the entry may be stale (a sidecar restarted elsewhere), and the
            # channel would sit in reconnect backoff, so both are dropped.
            assert self._resolver is not None
            self._resolver.invalidate(app, ns)
            self._evict(target, channel)
            if not source.replayable:
                break  # a stream's earlier messages are gone: the caller must retry
        await self._unreachable(context, unreachable)

    async def _resolve(
        self,
        app: str,
        ns: str,
        raw_target: str,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> GrpcAddress | None:
        if self._resolver is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to proxy request: no name resolution is configured for {raw_target}",
            )
            return None
        try:
            return await self._resolver.resolve_grpc(app, ns)
        except LookupError:
            message = f"failed to proxy request: couldn't find service: {raw_target}"
        except Exception as exc:
            log.warning("resolving %r failed", raw_target, exc_info=True)
            message = f"failed to proxy request: resolving {raw_target} failed: {exc}"
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        return None

    @staticmethod
    async def _unreachable(context: grpc.aio.ServicerContext[bytes, bytes], why: str) -> None:
        log.debug("gRPC proxy: %s", why)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"failed to proxy request: {why}")

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            if self._closed:
                raise RuntimeError("the gRPC proxy is closed")
            ch = grpc.aio.insecure_channel(target, options=self._options)
            self._channels[target] = ch
        return ch

    def _evict(self, target: str, channel: grpc.aio.Channel) -> None:
        # Only if no concurrent call has replaced it already.
        if not any(ch is channel for ch in self._channels.values()):
            return
        del self._channels[target]
        # Closed with a grace, not at once: a concurrent call on it must end with its own status
        # (and retry), not be cancelled under it.
        task = asyncio.create_task(channel.close(_RETIRE_GRACE_S), name="pillion-grpc-retire")
        self._retiring[task] = channel
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _forward(
        self,
        channel: grpc.aio.Channel,
        method: str,
        metadata: Metadata,
        source: _Requests,
        context: grpc.aio.ServicerContext[bytes, bytes],
        *,
        replay: bool,
    ) -> str | None:
        """Run one upstream call, relaying both ways, and set the caller's status from it.

        Returns gRPC's reason, having sent the caller nothing, when the upstream was never
        connected; None once the caller's status is set.
        """
        remaining = context.time_remaining()
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(
            method, request_serializer=None, response_deserializer=None
        )(metadata=metadata, timeout=remaining)
        pump = asyncio.create_task(self._pump(call, source, replay))
        answered = False
        me = asyncio.current_task()
        try:
            try:
                initial = await call.initial_metadata()
                head = _response_metadata(initial)
                if head:
                    answered = True
                    await context.send_initial_metadata(head)
                while True:
                    msg = await call.read()
                    if not isinstance(msg, bytes):
                        break  # grpc.aio.EOF: the upstream finished its responses
                    answered = True
                    await context.write(msg)
            except grpc.aio.AioRpcError:
                pass  # the status is read from the call below
            except asyncio.CancelledError:
                # The pump cancelled the upstream call (the caller's stream broke); anything
                # else is our own cancellation and must propagate.
                if not call.cancelled() or (me is not None and me.cancelling()):
                    raise
            code = await call.code()
            details = await call.details() or ""
            if (
                code == grpc.StatusCode.UNAVAILABLE
                and not answered
                and details.startswith(_NOT_CONNECTED)
            ):
                return details
            context.set_trailing_metadata(_response_metadata(await call.trailing_metadata()))
            if code != grpc.StatusCode.OK:
                context.set_code(code)
                context.set_details(details)
            return None
        finally:
            # Cancellation by the caller (or any failure here) must not leave the upstream running.
            if not call.done():
                call.cancel()
            if not pump.done():
                pump.cancel()
            await asyncio.wait([pump])

    @staticmethod
    async def _pump(
        call: grpc.aio.StreamStreamCall[bytes, bytes], source: _Requests, replay: bool
    ) -> None:
        """Copy the caller's messages upstream as they come (bidi needs both ways at once)."""
        try:
            if replay and source.first is not None:
                await call.write(source.first)
            while True:
                try:
                    msg = await source.next()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The caller's stream broke: the upstream must not wait for more forever.
                    log.debug("gRPC proxy: reading the caller's stream failed", exc_info=True)
                    call.cancel()
                    return
                if msg is None:
                    break
                await call.write(msg)
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the upstream call ended; its status reaches the caller from `_forward`
