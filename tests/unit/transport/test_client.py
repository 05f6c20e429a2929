"""Tests of the pooled HTTP/1.1 client against pillion's server and scripted raw servers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from pillion.transport.client import (
    ConnectError,
    ConnectionClosed,
    HttpClient,
    ResponseTimeout,
    ResponseTooLarge,
)
from pillion.transport.http import Request, Response
from tests.unit.transport.test_server import HOST, Recorder, Run, run, serve, tls_contexts

__all__ = ["run"]  # the loop-parametrised fixture, shared with the server tests

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class RawServer:
    """A scripted server: `script(server, n, reader, writer)` drives the n-th connection."""

    Script = Callable[
        ["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
    ]

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_connection, HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        number = self.connections
        self.connections += 1
        try:
            await self.script(self, number, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One content-length framed request (head + body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


async def answer_ok_forever(
    server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while await server.read_request(reader) is not None:
        writer.write(OK)


def one_shot(response: bytes) -> RawServer.Script:
    """A script that answers one request with `response` and closes."""

    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(response)
        await writer.drain()

    return script


async def raw(script: RawServer.Script) -> tuple[RawServer, int]:
    server = RawServer(script)
    return server, await server.start()


# ---- against pillion's server --------------------------------------------------------------


def test_round_trip_against_the_server(run: Run[None]) -> None:
    async def main() -> None:
        recorder = Recorder()
        server, port = await serve(recorder)
        client = HttpClient()
        response = await client.request(
            HOST, port, "POST", b"/v1.0/invoke/a%2Fb?x=1", [(b"x-test", b"v")], b"body", timeout=5
        )
        assert response.status == 200
        assert response.reason == b"OK"
        assert response.header(b"content-type") == b"application/json"
        doc = json.loads(response.body)
        assert doc["method"] == "POST"
        assert doc["path"] == "/v1.0/invoke/a%2Fb"
        assert doc["query"] == "x=1"
        assert doc["body"] == "body"
        assert doc["x"] == "v"
        seen = recorder.requests[0]
        assert seen.header(b"host") == f"{HOST}:{port}".encode()
        assert seen.header(b"content-length") == b"4"
        # A bodiless POST still declares its length; a GET does not.
        await client.request(HOST, port, "POST", b"/empty", [])
        assert recorder.requests[1].header(b"content-length") == b"0"
        await client.request(HOST, port, "GET", b"/get", [(b"host", b"given")])
        assert recorder.requests[2].header(b"content-length") is None
        assert [v for k, v in recorder.requests[2].headers if k == b"host"] == [b"given"]
        head = await client.request(HOST, port, "HEAD", b"/head", [])
        assert head.status == 200 and head.body == b""
        assert int(head.header(b"content-length") or b"0") > 0
        after = await client.request(HOST, port, "GET", b"/after-head", [])
        assert json.loads(after.body)["path"] == "/after-head"
        await client.close()
        await server.close()

    run(main())


def test_large_bodies_both_ways(run: Run[None]) -> None:
    async def handler(request: Request) -> Response:
        return Response(200, body=request.body[::-1])

    async def main() -> None:
        server, port = await serve(handler, max_body_size=8 * 1024 * 1024)
        client = HttpClient()
        body = bytes(range(256)) * 20_000  # 5 MB
        response = await client.request(HOST, port, "PUT", b"/big", [], body, timeout=10)
        assert response.body == body[::-1]
        await client.close()
        await server.close()

    run(main())


def test_tls_round_trip(run: Run[None]) -> None:
    server_ctx, client_ctx = tls_contexts()

    async def main() -> None:
        server, port = await serve(Recorder(), ssl=server_ctx)
        client = HttpClient(ssl=client_ctx)
        for _ in range(3):
            response = await client.request(HOST, port, "POST", b"/tls", [], b"secret", timeout=5)
            assert json.loads(response.body)["body"] == "secret"
        await client.close()
        # The wrong name fails verification: a connect error, not a hang.
        strict = HttpClient(ssl=client_ctx, server_hostname="not-this-host")
        with pytest.raises(ConnectError):
            await strict.request(HOST, port, "GET", b"/", [], timeout=5)
        await strict.close()
        await server.close()

    run(main())


# ---- pooling and retry -----------------------------------------------------------------------


def test_pooled_connections_are_reused(run: Run[None]) -> None:
    async def main() -> None:
        server, port = await raw(answer_ok_forever)
        client = HttpClient(max_idle_per_host=2)
        for _ in range(5):
            assert (await client.request(HOST, port, "GET", b"/", [], timeout=5)).body == b"ok"
        assert server.connections == 1
        # Four at once need four connections; only two stay pooled afterwards.
        await asyncio.gather(
            *(client.request(HOST, port, "GET", b"/", [], timeout=5) for _ in range(4))
        )
        assert server.connections == 4
        await asyncio.sleep(0.05)
        assert server.closed == 2
        for _ in range(3):
            await client.request(HOST, port, "GET", b"/", [], timeout=5)
        assert server.connections == 4
        await client.close()
        await server.close()

    run(main())


def test_connection_close_response_is_not_pooled(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        for _ in range(3):
            assert (await client.request(HOST, port, "GET", b"/", [], timeout=5)).body == b"ok"
        assert server.connections == 3
        await client.close()
        await server.close()

    run(main())


def test_idle_connection_closed_by_server_leaves_the_pool(run: Run[None]) -> None:
    async def main() -> None:
        server, port = await raw(one_shot(OK))  # answers, then closes while we are idle
        client = HttpClient()
        assert (await client.request(HOST, port, "GET", b"/", [], timeout=5)).body == b"ok"
        await asyncio.sleep(0.1)
        assert (await client.request(HOST, port, "GET", b"/", [], timeout=5)).body == b"ok"
        assert server.connections == 2
        assert len(server.requests) == 2  # noticed in the pool: no request was lost
        await client.close()
        await server.close()

    run(main())


def test_retry_once_when_a_reused_connection_dies_before_any_answer(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(OK)
        if n == 0:
            # Read the next request but close without a byte: the race with an idle close.
            await server.read_request(reader)

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        assert (await client.request(HOST, port, "GET", b"/1", [], timeout=5)).body == b"ok"
        response = await client.request(HOST, port, "POST", b"/2", [], b"x", timeout=5)
        assert response.body == b"ok"
        assert server.connections == 2
        assert [r.split(b" ")[1] for r in server.requests] == [b"/1", b"/2", b"/2"]
        await client.close()
        await server.close()

    run(main())


def test_no_retry_on_a_fresh_connection(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)  # and close without answering

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        with pytest.raises(ConnectionClosed):
            await client.request(HOST, port, "GET", b"/", [], timeout=5)
        assert server.connections == 1
        await client.close()
        await server.close()

    run(main())


def test_no_retry_after_response_bytes_began(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
        await writer.drain()

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        await client.request(HOST, port, "GET", b"/1", [], timeout=5)
        with pytest.raises(ConnectionClosed):
            await client.request(HOST, port, "POST", b"/2", [], b"x", timeout=5)
        assert server.connections == 1
        assert len(server.requests) == 2
        await client.close()
        await server.close()

    run(main())


# ---- response framing ----------------------------------------------------------------------


def test_chunked_response(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"6\r\n world\r\n0\r\n\r\n")

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        for _ in range(2):
            response = await client.request(HOST, port, "GET", b"/", [], timeout=5)
            assert response.body == b"hello world"
            assert response.header(b"transfer-encoding") == b"chunked"
        assert server.connections == 1  # a chunked response keeps the connection
        await client.close()
        await server.close()

    run(main())


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_close_delimited_response(run: Run[None], version: bytes) -> None:
    async def main() -> None:
        server, port = await raw(
            one_shot(b"HTTP/%s 200 OK\r\nx-a: 1\r\n\r\nuntil the end" % version)
        )
        client = HttpClient()
        response = await client.request(HOST, port, "GET", b"/", [], timeout=5)
        assert response.status == 200
        assert response.body == b"until the end"
        assert response.header(b"x-a") == b"1"
        await client.close()
        await server.close()

    run(main())


def test_interim_and_bodiless_responses(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nc"
        )
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # answer to a HEAD
        await server.read_request(reader)
        writer.write(OK)
        await server.read_request(reader)

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        first = await client.request(HOST, port, "POST", b"/", [], b"x", timeout=5)
        assert (first.status, first.reason, first.body) == (201, b"Created", b"c")
        second = await client.request(HOST, port, "DELETE", b"/", [], timeout=5)
        assert (second.status, second.body) == (204, b"")
        third = await client.request(HOST, port, "HEAD", b"/", [], timeout=5)
        assert (third.status, third.body) == (200, b"")
        fourth = await client.request(HOST, port, "GET", b"/", [], timeout=5)
        assert fourth.body == b"ok"
        assert server.connections == 1
        await client.close()
        await server.close()

    run(main())


def test_malformed_response(run: Run[None]) -> None:
    async def main() -> None:
        server, port = await raw(one_shot(b"NOT HTTP AT ALL\r\n\r\n"))
        client = HttpClient()
        with pytest.raises(Exception, match="malformed HTTP response") as info:
            await client.request(HOST, port, "GET", b"/", [], timeout=5)
        assert not isinstance(info.value, ConnectionClosed | ResponseTimeout)
        await client.close()
        await server.close()

    run(main())


# ---- failures --------------------------------------------------------------------------------


def test_timeout_raises_and_drops_the_connection(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(ResponseTimeout):
            await client.request(HOST, port, "GET", b"/", [], timeout=0.2)
        assert 0.15 < loop.time() - began < 2
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.01)
        assert server.closed == 1  # the timed-out connection was closed, not pooled
        await client.close()
        await server.close()

    run(main())


def test_connect_refused_raises_connect_error(run: Run[None]) -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused

        async def main() -> None:
            client = HttpClient()
            with pytest.raises(ConnectError, match=f"{HOST}:{port}"):
                await client.request(HOST, port, "GET", b"/", [], timeout=5)
            await client.close()

        run(main())


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"a" * 100,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"8\r\naaaaaaaa\r\n" * 4,
    ],
)
def test_response_too_large(run: Run[None], response: bytes) -> None:
    async def main() -> None:
        server, port = await raw(one_shot(response))
        client = HttpClient(max_response_size=20)
        with pytest.raises(ResponseTooLarge):
            await client.request(HOST, port, "GET", b"/", [], timeout=5)
        await client.close()
        await server.close()

    run(main())


def test_cancelled_request_does_not_poison_the_pool(run: Run[None]) -> None:
    async def script(
        server: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (request := await server.read_request(reader)) is not None:
            if b" /slow " in request:
                await asyncio.sleep(0.3)
            writer.write(OK)

    async def main() -> None:
        server, port = await raw(script)
        client = HttpClient()
        slow = asyncio.create_task(client.request(HOST, port, "GET", b"/slow", []))
        await asyncio.sleep(0.05)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        # The late answer to /slow must not be taken as the answer to this one.
        assert (await client.request(HOST, port, "GET", b"/next", [], timeout=5)).body == b"ok"
        assert server.connections == 2
        await client.close()
        await server.close()

    run(main())
