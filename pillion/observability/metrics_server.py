"""The Prometheus scrape handler for --metrics-port, served by pillion.transport.server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pillion.observability.dapr_metrics import DaprMetrics
from pillion.transport.http import Request, Response, error_body

__all__ = ["CONTENT_TYPE", "handler"]

# What client_golang's promhttp answers a scraper that asks for nothing else.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_PATHS = frozenset({"/", "/metrics"})
_METHODS = frozenset({"GET", "HEAD"})
_JSON = (b"content-type", b"application/json")


def handler(metrics: DaprMetrics) -> Callable[[Request], Awaitable[Response]]:
    """A handler answering GET/HEAD on / and /metrics with the rendered page.

    daprd serves its exporter at the root; /metrics is what scrape configs assume by default,
    so both answer. Other paths get 404 and other methods 405, with pillion's JSON error body.
    """

    async def serve(request: Request) -> Response:
        if request.path not in _PATHS:
            return Response(
                404, [_JSON], error_body("ERR_NOT_FOUND", f"no metrics at {request.path}")
            )
        if request.method not in _METHODS:
            return Response(
                405,
                [_JSON, (b"allow", b"GET, HEAD")],
                error_body("ERR_METHOD_NOT_ALLOWED", f"method {request.method} is not allowed"),
            )
        # HEAD renders too: its content-length must be that of the GET body.
        return Response(200, [(b"content-type", CONTENT_TYPE)], metrics.render())

    return serve
