"""A plain gRPC app with unary, server-streaming and bidi methods (raw bytes), for proxying."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    caller = dict(context.invocation_metadata() or ()).get("dapr-caller-app-id", "")
    await context.send_initial_metadata((("x-app", "streamer"),))
    return b"echo:" + request + b" from:" + str(caller).encode()


async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def chat(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r.upper()


async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not today")
    return b""


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
}


async def main(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Streamer", HANDLERS)]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc streamer listening on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
