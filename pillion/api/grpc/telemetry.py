"""Spans and Dapr's gRPC server metrics around every call of the Dapr gRPC service."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.tracing import (
    SERVER,
    SpanContext,
    Tracer,
    format_traceparent,
    parse_grpc_trace_bin,
    parse_traceparent,
)

api_log = logging.getLogger("pillion.api.grpc.calls")

# The API span's context while a call runs: what the call does next (invoke, publish, bindings)
# continues this trace. Each gRPC call runs in its own task, so the value is per call.
current_context: ContextVar[SpanContext | None] = ContextVar("pillion_grpc_trace", default=None)

_SKIP_TRACE = frozenset({"/dapr.proto.runtime.v1.Dapr/GetMetadata"})


def trace_metadata(md: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, str]:
    """(traceparent, tracestate) for downstream calls: the API span's, else the caller's."""
    ctx = current_context.get()
    if ctx is not None:
        return format_traceparent(ctx).decode(), ctx.tracestate
    traceparent = tracestate = ""
    for k, v in md or ():
        value = v if isinstance(v, str) else v.decode("latin-1")
        if k == "traceparent":
            traceparent = value
        elif k == "tracestate":
            tracestate = value
    return traceparent, tracestate


def _parent(md: Sequence[tuple[str, str | bytes]] | None) -> SpanContext | None:
    traceparent = tracestate = None
    trace_bin: bytes | None = None
    for k, v in md or ():
        if k == "traceparent":
            traceparent = v
        elif k == "tracestate":
            tracestate = v
        elif k == "grpc-trace-bin":
            trace_bin = v if isinstance(v, bytes) else v.encode("latin-1")
    if traceparent is not None:
        return parse_traceparent(traceparent, tracestate)
    if trace_bin is not None:
        return parse_grpc_trace_bin(trace_bin)
    return None


class Instrumented(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Wraps the generated Dapr handler: a server span and dapr_grpc_io_server_* per unary call."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        tracer: Tracer | None,
        metrics: DaprMetrics | None,
        api_logging: bool = False,
    ) -> None:
        self.inner = inner
        self.tracer = tracer if tracer is not None and tracer.enabled else None
        self.metrics = metrics
        self.api_logging = api_logging
        self._cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        try:
            return self._cache[method]
        except KeyError:
            pass
        h = self.inner.service(details)
        if h is not None and h.unary_unary is not None:
            h = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, h.unary_unary),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer,
            )
        self._cache[method] = h
        return h

    def _wrap(
        self, method: str, inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        tracer = None if method in _SKIP_TRACE else self.tracer
        metrics = self.metrics
        logging_on = self.api_logging

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            span = None
            if tracer is not None:
                span, ctx = tracer.start(method, _parent(context.invocation_metadata()), SERVER)
                current_context.set(ctx)
            status = "OK"
            response = None
            try:
                response = await inner(request, context)
                return response
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                if span is not None:
                    if method == "/dapr.proto.runtime.v1.Dapr/InvokeService":
                        app_id = getattr(request, "id", "")
                        target = getattr(getattr(request, "message", None), "method", "")
                        span.name = f"CallLocal/{app_id}/{target}"
                        span.set("dapr.invoke_method", target)
                    span.set("dapr.api", method)
                    span.set("dapr.protocol", "grpc")
                    span.set("rpc.service", "Dapr")
                    span.set("dapr.status_code", status)
                    span.end(None if status == "OK" else status)
                ms = (time.perf_counter() - t0) * 1000
                if metrics is not None:
                    metrics.grpc_server(
                        method,
                        status,
                        ms,
                        request.ByteSize(),
                        response.ByteSize() if response is not None else 0,
                    )
                if logging_on:
                    agent = ""
                    for k, v in context.invocation_metadata() or ():
                        if k == "user-agent":
                            agent = v if isinstance(v, str) else v.decode("latin-1")
                    api_log.info(
                        "gRPC API Called",
                        extra={
                            "fields": {
                                "method": method,
                                "code": status,
                                "duration": round(ms, 3),
                                "useragent": agent,
                            }
                        },
                    )

        return call
