"""A minimal, fast HTTP app for benchmarks: answers every request with 200 "ok"."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from pillion.transport.http import Request, Response
from pillion.transport.server import HttpServer

OK = Response(200, [(b"content-type", b"text/plain")], b"ok")


async def handler(req: Request) -> Response:
    return OK


async def main(port: int) -> None:
    server = HttpServer(handler)
    await server.start("127.0.0.1", port)
    print(f"bench app listening on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
