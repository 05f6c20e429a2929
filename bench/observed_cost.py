"""What tracing and metrics add to one service invocation, in process, per sidecar side.

`bench/invoke.py` measures the whole path (wrk, two sidecars, the app) on two shared cores,
where rounds stray by 10-15%; this runs the caller sidecar's handler (HTTP API -> invoke block,
over a link that answers at once) and the callee's (link -> invoke block -> HTTP app channel,
over a client that answers at once) in a loop, with tracing and metrics off, each alone, and
both on, so a change to the per-request cost of observability shows up to a tenth of a
microsecond. Spans are encoded as OTLP/HTTP would send them (the post itself is left out).
Prints microseconds per request and what each setting adds; the variants alternate, and the
best round of each is kept.

Run it with `python -P` (as bench/grpc_app.py): this directory's grpc.py would otherwise shadow
grpcio, which the HTTP API's imports load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Sequence

import uvloop

from pillion.api.http.router import HttpApi
from pillion.blocks.invoke import Headers, InvokeBlock, InvokeResponse
from pillion.blocks.state import StateBlock
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.otlp import encode_export_request
from pillion.observability.tracing import Span, Tracer
from pillion.runtime.channels import HttpAppChannel
from pillion.transport.client import ClientResponse
from pillion.transport.http import Request

Call = Callable[[], Awaitable[object]]

# What the caller sidecar sends the callee for `GET /v1.0/invoke/app/method/ping` from wrk.
LINK_HEADERS: Headers = [
    (b"host", b"127.0.0.1:3500"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    (b"dapr-caller-app-id", b"caller"),
    (b"dapr-caller-namespace", b""),
    (b"dapr-callee-app-id", b"app"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-host", b"127.0.0.1:3500"),
    (b"forwarded", b"for=127.0.0.1;by=127.0.0.1;host=127.0.0.1:3500"),
]
APP_ANSWER = ClientResponse(
    200, b"OK", [(b"content-type", b"text/plain"), (b"content-length", b"2")], b"ok"
)


class _Address:
    host = "127.0.0.1"
    port = 50002


class _Resolver:
    async def resolve(self, app_id: str, namespace: str = "") -> _Address:
        return _Address()

    def invalidate(self, app_id: str, namespace: str = "") -> None:
        return None


class _Link:
    async def forward(
        self, addr: object, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        return InvokeResponse(200, b"OK", [(b"content-type", b"text/plain")], b"ok")


class _AppClient:
    async def request(
        self, host: str, port: int, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> ClientResponse:
        return APP_ANSWER


class _Encoder:
    """Encodes each batch as the OTLP/HTTP exporter does, and sends it nowhere."""

    async def export(self, spans: Sequence[Span], service_name: str) -> None:
        encode_export_request(spans, service_name)

    async def close(self) -> None:
        return None


def _telemetry(
    app_id: str, tracing: bool, metrics: bool
) -> tuple[Tracer | None, DaprMetrics | None]:
    tracer = Tracer(app_id, 1.0, [_Encoder()]) if tracing else None
    return tracer, DaprMetrics(app_id, "") if metrics else None


def caller(tracing: bool, metrics: bool) -> tuple[Call, Tracer | None]:
    tracer, recorder = _telemetry("caller", tracing, metrics)
    block = InvokeBlock("caller", "", _Resolver(), _Link(), None)
    block.tracer, block.metrics = tracer, recorder
    api = HttpApi(
        app_id="caller",
        health=None,  # type: ignore[arg-type]  # not on the invoke route
        state=StateBlock("caller", "", {}),
        invoke=block,
        metadata=None,  # type: ignore[arg-type]
        request_shutdown=lambda: None,
        tracer=tracer,
        metrics=recorder,
    )
    path = "/v1.0/invoke/app/method/ping"

    def call() -> Awaitable[object]:
        headers = [(b"host", b"127.0.0.1:3500")]
        return api(Request("GET", path, b"", headers, b"", peer="127.0.0.1"))

    return call, tracer


def callee(tracing: bool, metrics: bool) -> tuple[Call, Tracer | None]:
    tracer, recorder = _telemetry("app", tracing, metrics)
    channel = HttpAppChannel("127.0.0.1", 50003)
    channel.client = _AppClient()  # type: ignore[assignment]
    channel.metrics = recorder
    block = InvokeBlock("app", "", None, None, channel)
    block.tracer, block.metrics = tracer, recorder
    # The caller sends a traceparent only when it traces.
    headers = LINK_HEADERS if tracing else [h for h in LINK_HEADERS if h[0] != b"traceparent"]

    def call() -> Awaitable[object]:
        return block.on_remote_call("GET", b"/ping", list(headers), b"")

    return call, tracer


async def round_us(call: Call, tracer: Tracer | None, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await call()
        if tracer is not None and tracer.queued >= 512:  # what Tracer.run does in the sidecar
            await tracer.flush()
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=3000, help="calls per round and variant")
    args = ap.parse_args()
    variants = {"off": (False, False), "tracing": (True, False), "metrics": (False, True)}
    variants["both"] = (True, True)
    print(f"µs per request, best of {args.rounds} alternated rounds of {args.calls} calls")
    print(f"{'side':8} {'off':>7} {'tracing':>14} {'metrics':>14} {'both':>14}")
    for side, make in (("caller", caller), ("callee", callee)):
        built = {name: make(*flags) for name, flags in variants.items()}
        best = dict.fromkeys(built, float("inf"))
        for _ in range(args.rounds):
            for name, (call, tracer) in built.items():
                best[name] = min(best[name], await round_us(call, tracer, args.calls))
        off = best["off"]
        cells = " ".join(f"{best[v]:6.2f} (+{best[v] - off:4.2f})" for v in variants if v != "off")
        print(f"{side:8} {off:7.2f} {cells}")


if __name__ == "__main__":
    uvloop.run(main())
