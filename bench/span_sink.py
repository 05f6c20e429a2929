"""A span sink for benchmarks: takes OTLP/HTTP and Zipkin posts, counts the bytes, answers 200."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from pillion.transport.http import Request, Response
from pillion.transport.server import HttpServer

received = {"posts": 0, "bytes": 0}


async def handler(req: Request) -> Response:
    if req.method == "GET":  # the bench reads what arrived
        body = f"{received['posts']} {received['bytes']}".encode()
        return Response(200, [(b"content-type", b"text/plain")], body)
    received["posts"] += 1
    received["bytes"] += len(req.body)
    return Response(200, [], b"")


async def main(port: int) -> None:
    server = HttpServer(handler, max_body_size=64 << 20)
    await server.start("127.0.0.1", port)
    print(f"span sink listening on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
