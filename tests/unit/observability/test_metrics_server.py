"""Tests of the metrics scrape handler, served by a real HttpServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.metrics_server import handler
from pillion.transport.client import ClientResponse, HttpClient
from pillion.transport.server import HttpServer

HOST = "127.0.0.1"
Fetch = Callable[[str, str], Awaitable[ClientResponse]]


def serve(metrics: DaprMetrics, body: Callable[[Fetch], Awaitable[None]]) -> None:
    """Start the handler on a free port, run `body` with a fetch function, shut down."""

    async def main() -> None:
        server = HttpServer(handler(metrics))
        port = await server.start(HOST, 0)
        client = HttpClient()

        async def fetch(method: str, target: str) -> ClientResponse:
            return await client.request(HOST, port, method, target.encode(), [], timeout=5)

        try:
            await body(fetch)
        finally:
            await client.close()
            await server.close(grace=1)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_get_metrics_and_root_serve_the_page() -> None:
    m = DaprMetrics("myapp")
    m.http_server("GET", "/v1.0/healthz", 204, 0.5, 0, 0)

    async def body(fetch: Fetch) -> None:
        for target in ("/metrics", "/", "/metrics?x=1"):
            r = await fetch("GET", target)
            assert r.status == 200
            assert r.header(b"content-type") == b"text/plain; version=0.0.4; charset=utf-8"
            assert r.body == m.render()
            assert (
                b'dapr_http_server_request_count{app_id="myapp",method="GET",'
                b'path="/v1.0/healthz",status="204"} 1\n' in r.body
            )

    serve(m, body)


def test_head_has_the_length_of_get_and_no_body() -> None:
    m = DaprMetrics("myapp")
    m.component_state("store", "get", True, 1.0)

    async def body(fetch: Fetch) -> None:
        r = await fetch("HEAD", "/metrics")
        assert r.status == 200
        assert r.body == b""
        assert r.header(b"content-length") == str(len(m.render())).encode()

    serve(m, body)


def test_empty_registry_answers_an_empty_page() -> None:
    async def body(fetch: Fetch) -> None:
        r = await fetch("GET", "/metrics")
        assert r.status == 200
        assert r.body == b""

    serve(DaprMetrics("myapp"), body)


def test_other_paths_404_and_other_methods_405() -> None:
    async def body(fetch: Fetch) -> None:
        r = await fetch("GET", "/v1.0/metadata")
        assert r.status == 404
        assert json.loads(r.body)["errorCode"] == "ERR_NOT_FOUND"
        r = await fetch("POST", "/metrics")
        assert r.status == 405
        assert r.header(b"allow") == b"GET, HEAD"
        assert json.loads(r.body)["errorCode"] == "ERR_METHOD_NOT_ALLOWED"
        r = await fetch("DELETE", "/")
        assert r.status == 405

    serve(DaprMetrics("myapp"), body)
