"""The processes behind bench/grpc.py: servers and the load generator.

    grpc_app.py echo PORT      a bare grpc.aio server (uvloop) with one raw-bytes unary echo method
    grpc_app.py app PORT       a grpc.aio app: AppCallback/OnInvoke echo, its health check, and the
                               same raw echo method (the target of the sidecar's gRPC proxy)
    grpc_app.py sdkapp PORT    the official SDK's `dapr.ext.grpc.App` with an `echo` method
    grpc_app.py forward PORT TARGET
                               a bare grpc.aio unary forwarder: the echo method, passed as raw bytes
                               to the echo method at TARGET (host:port); a Python hop's floor
    grpc_app.py load ...       the load generator (see `load --help`); prints one RESULT JSON line

Run it with `python -P`: this directory also holds grpc.py, which would otherwise shadow grpcio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import grpc
import grpc.aio
import uvloop
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import (
    appcallback_pb2,
    appcallback_pb2_grpc,
    dapr_pb2_grpc,
    invoke_pb2,
    state_pb2,
)
from google.protobuf import any_pb2

ECHO_SERVICE = "pillion.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
GET_STATE = "/dapr.proto.runtime.v1.Dapr/GetState"
SAVE_STATE = "/dapr.proto.runtime.v1.Dapr/SaveState"
INVOKE_SERVICE = "/dapr.proto.runtime.v1.Dapr/InvokeService"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- servers ----------------------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def echo_handler() -> grpc.GenericRpcHandler:
    """One unary method, no (de)serializers: request bytes in, the same bytes out."""
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )


class AppCallback(appcallback_pb2_grpc.AppCallbackServicer):  # type: ignore[misc]
    async def OnInvoke(
        self, request: common_pb2.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.InvokeResponse:
        return common_pb2.InvokeResponse(data=request.data, content_type=request.content_type)


class Health(appcallback_pb2_grpc.AppCallbackHealthCheckServicer):  # type: ignore[misc]
    async def HealthCheck(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return appcallback_pb2.HealthCheckResponse()


async def serve(port: int, *, app: bool) -> None:
    server = grpc.aio.server()
    if app:
        appcallback_pb2_grpc.add_AppCallbackServicer_to_server(AppCallback(), server)
        appcallback_pb2_grpc.add_AppCallbackHealthCheckServicer_to_server(Health(), server)
    server.add_generic_rpc_handlers((echo_handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc {'app' if app else 'echo'} listening on {port}", flush=True)
    await server.wait_for_termination()


async def forward(port: int, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    upstream = channel.unary_unary(ECHO_METHOD)

    async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply: bytes = await upstream(request, timeout=context.time_remaining())
        return reply

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(relay)}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc forwarder listening on {port}", flush=True)
    await server.wait_for_termination()


def serve_sdk(port: int) -> None:
    from dapr.ext.grpc import App, InvokeMethodRequest, InvokeMethodResponse

    sdk = App()

    @sdk.method("echo")
    def echo(req: InvokeMethodRequest) -> InvokeMethodResponse:
        return InvokeMethodResponse(req.data, req.content_type)

    print(f"grpc sdk app listening on {port}", flush=True)
    sdk.run(port, "127.0.0.1")


# --- the load generator -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def _check(channel: grpc.aio.Channel, args: argparse.Namespace) -> tuple[str, bytes, bytes]:
    """One call through the generated stubs, checked; the (method, request, reply) bytes to repeat.

    The timed loop then sends the same serialized request on the same method without stubs, so
    the client's own cost is the same for every row, and compares each reply with this one.
    """
    payload = b"x" * args.size
    if args.mode == "echo":
        reply = await channel.unary_unary(ECHO_METHOD)(payload, timeout=5)
        if reply != payload:
            raise SystemExit(f"echo answered {reply!r}")
        return ECHO_METHOD, payload, reply
    if args.mode == "proxy":
        md = (("dapr-app-id", args.app_id),)
        reply = await channel.unary_unary(ECHO_METHOD)(payload, metadata=md, timeout=5)
        if reply != payload:
            raise SystemExit(f"proxied echo answered {reply!r}")
        return ECHO_METHOD, payload, reply
    stub = dapr_pb2_grpc.DaprStub(channel)
    if args.mode == "getstate":
        req = state_pb2.GetStateRequest(store_name=args.store, key=args.key)
        got = await stub.GetState(req, timeout=5)
        if got.data != args.expect.encode():
            raise SystemExit(f"GetState answered {got!r}, expected {args.expect!r}")
        return GET_STATE, req.SerializeToString(), got.SerializeToString()
    if args.mode == "savestate":
        item = common_pb2.StateItem(key=args.key, value=args.expect.encode() or payload)
        save = state_pb2.SaveStateRequest(store_name=args.store, states=[item])
        done = await stub.SaveState(save, timeout=5)
        return SAVE_STATE, save.SerializeToString(), done.SerializeToString()
    req = invoke_pb2.InvokeServiceRequest(
        id=args.app_id,
        message=common_pb2.InvokeRequest(method="echo", data=any_pb2.Any(value=payload)),
    )
    got = await stub.InvokeService(req, timeout=5)
    if got.data.value != payload:
        raise SystemExit(f"InvokeService answered {got!r}")
    return INVOKE_SERVICE, req.SerializeToString(), got.SerializeToString()


async def load(args: argparse.Namespace) -> dict[str, Any]:
    # A local subchannel pool per channel: otherwise channels to one target share a connection.
    opts = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(args.target, options=opts) for _ in range(args.channels)]
    try:
        method, request, expected = await _check(channels[0], args)
        md = (("dapr-app-id", args.app_id),) if args.mode == "proxy" else None
        calls = [ch.unary_unary(method) for ch in channels]
        latencies: list[float] = []
        errors: list[str] = []
        recording = False
        stop = False
        perf = time.perf_counter

        async def worker(i: int) -> None:
            call = calls[i % len(calls)]
            while not stop:
                t0 = perf()
                try:
                    reply = await call(request, metadata=md, timeout=args.call_timeout)
                except grpc.aio.AioRpcError as exc:
                    if recording:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                t1 = perf()
                if recording:
                    if reply != expected:
                        errors.append(f"unexpected reply {reply[:60]!r}")
                    else:
                        latencies.append(t1 - t0)

        workers = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        cpu0 = [cpu_seconds(p) for p in args.watch]
        own0 = time.process_time()
        t_start = perf()
        recording = True
        deadline = t_start + args.seconds
        # Ends at the deadline, or early once max_calls replies are in (bounds the memory).
        while perf() < deadline and len(latencies) + len(errors) < args.max_calls:
            await asyncio.sleep(0.05)
        recording = False
        elapsed = perf() - t_start
        cpu1 = [cpu_seconds(p) for p in args.watch]
        own1 = time.process_time()
        stop = True
        await asyncio.wait(workers, timeout=args.call_timeout + 1)
        for w in workers:
            w.cancel()
    finally:
        for ch in channels:
            await ch.close()
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return {
        "calls": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "cpu_s": [b - a for a, b in zip(cpu0, cpu1, strict=True)],
        "client_cpu_s": own1 - own0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("echo", "app", "sdkapp"):
        sub.add_parser(name).add_argument("port", type=int)
    fp = sub.add_parser("forward")
    fp.add_argument("port", type=int)
    fp.add_argument("target")
    lp = sub.add_parser("load")
    lp.add_argument("--target", required=True, help="host:port")
    lp.add_argument(
        "--mode", choices=("echo", "getstate", "savestate", "invoke", "proxy"), required=True
    )
    lp.add_argument("--app-id", default="")
    lp.add_argument("--store", default="statestore")
    lp.add_argument("--key", default="")
    lp.add_argument("--expect", default="", help="the value GetState must return")
    lp.add_argument("--size", type=int, default=16, help="payload bytes (echo, invoke, proxy)")
    lp.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    lp.add_argument("--channels", type=int, default=1, help="channels (TCP connections)")
    lp.add_argument("--warmup", type=float, default=2.0)
    lp.add_argument("--seconds", type=float, default=6.0)
    lp.add_argument("--max-calls", type=int, default=1_000_000)
    lp.add_argument("--call-timeout", type=float, default=5.0)
    lp.add_argument("--watch", type=int, action="append", default=[], help="pid to read CPU of")
    args = ap.parse_args()
    if args.cmd == "sdkapp":
        serve_sdk(args.port)
    elif args.cmd == "forward":
        uvloop.run(forward(args.port, args.target))
    elif args.cmd == "load":
        result = uvloop.run(load(args))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        uvloop.run(serve(args.port, app=args.cmd == "app"))


if __name__ == "__main__":
    sys.exit(main())
