"""Tests of the gRPC app channel against the official SDK's App and an in-process servicer."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import uvloop
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import appcallback_pb2, appcallback_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2

from pillion.blocks.invoke import (
    ANY_TYPE_HEADER,
    GRPC_DETAILS_HEADER,
    GRPC_MESSAGE_HEADER,
    GRPC_STATUS_HEADER,
    NO_VERB_HEADER,
    InvokeResponse,
    Unreachable,
)
from pillion.errors import PillionError
from pillion.runtime.grpc_app import GrpcAppChannel, build_request, to_metadata

HOST = "127.0.0.1"
T = TypeVar("T")
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(asyncio.wait_for(coro, 10))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def header(resp: InvokeResponse, name: bytes) -> bytes | None:
    for k, v in resp.headers:
        if k == name:
            return v
    return None


# --- the official SDK's App in a subprocess ---------------------------------------------------

SDK_APP = textwrap.dedent(
    """
    import json, sys
    from dapr.ext.grpc import App, InvokeMethodRequest, InvokeMethodResponse

    app = App()

    @app.method("echo")
    def echo(request: InvokeMethodRequest) -> InvokeMethodResponse:
        return InvokeMethodResponse(
            data=request.data,
            content_type=request.content_type,
            headers=(("x-echo", "yes"),),
        )

    @app.method("meta")
    def meta(request: InvokeMethodRequest) -> bytes:
        md = {k: [v if isinstance(v, str) else repr(v) for v in vs]
              for k, vs in request.metadata.items()}
        return json.dumps(md).encode()

    @app.method("fail")
    def fail(request: InvokeMethodRequest) -> bytes:
        raise ValueError("the app failed")

    if sys.argv[2] == "health":
        app.register_health_check(lambda: None)
    print("starting", flush=True)
    app.run(int(sys.argv[1]), "127.0.0.1")
    """
)


@pytest.fixture(scope="module")
def sdk_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Two SDK apps: one with a health check registered, one without."""
    script = tmp_path_factory.mktemp("sdkapp") / "app.py"
    script.write_text(SDK_APP)
    ports = {"health": free_port(), "plain": free_port()}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(port), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, port in ports.items()
    }
    try:
        deadline = time.monotonic() + 10
        for name, port in ports.items():
            while True:
                with socket.socket() as s:
                    if s.connect_ex((HOST, port)) == 0:
                        break
                if procs[name].poll() is not None or time.monotonic() > deadline:
                    out, err = procs[name].communicate(timeout=5)
                    pytest.fail(f"SDK app did not start:\n{out.decode()}\n{err.decode()}")
                time.sleep(0.05)
        yield ports
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_sdk_echo_round_trip(sdk_apps: dict[str, int], loop: str) -> None:
    async def main() -> InvokeResponse:
        ch = GrpcAppChannel(HOST, sdk_apps["plain"])
        try:
            await ch.wait_ready()
            return await ch.invoke(
                "POST",
                b"/echo?x=1",
                [(b"content-type", b"text/plain"), (b"content-length", b"5")],
                b"hello",
            )
        finally:
            await ch.close()

    resp = run(main(), loop)
    assert (resp.status, resp.reason, resp.body) == (200, b"OK", b"hello")
    # Marked as a gRPC app's answer, for gRPC callers (no dapr-http-status, as daprd).
    assert resp.headers[:2] == [
        (b"pillion-app-protocol", b"grpc"),
        (b"content-type", b"text/plain"),
    ]
    assert header(resp, b"x-echo") == b"yes"
    assert header(resp, ANY_TYPE_HEADER) is None


def test_sdk_sees_renamed_metadata_and_token(sdk_apps: dict[str, int]) -> None:
    async def main() -> InvokeResponse:
        ch = GrpcAppChannel(HOST, sdk_apps["plain"], app_token="s3cret")
        try:
            return await ch.invoke(
                "GET",
                b"/meta",
                [
                    (b"Accept", b"application/json"),
                    (b"user-agent", b"curl/8"),
                    (b"grpc-foo", b"bar"),
                    (b"connection", b"keep-alive"),
                    (b"host", b"example"),
                    (b"dapr-api-token", b"caller-token"),
                    (b"dapr-caller-app-id", b"caller"),
                    (b"dapr-callee-app-id", b"callee"),
                    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                    (b"X-Custom", b"v"),
                ],
                b"",
            )
        finally:
            await ch.close()

    resp = run(main())
    assert resp.status == 200
    md = json.loads(resp.body)
    assert md["dapr-accept"] == ["application/json"]
    assert md["dapr-user-agent"] == ["curl/8"]
    assert md["dapr-grpc-foo"] == ["bar"]
    assert md["dapr-api-token"] == ["s3cret"]
    assert md["dapr-caller-app-id"] == ["caller"]
    assert md["dapr-callee-app-id"] == ["callee"]
    assert md["traceparent"][0].startswith("00-0af7")
    assert md["x-custom"] == ["v"]
    for gone in ("accept", "connection", "host", "grpc-foo", "dapr-host"):
        assert gone not in md


def test_sdk_errors_map_to_http_status(sdk_apps: dict[str, int]) -> None:
    async def main() -> tuple[InvokeResponse, InvokeResponse]:
        ch = GrpcAppChannel(HOST, sdk_apps["plain"])
        try:
            failed = await ch.invoke("POST", b"/fail", [], b"")
            missing = await ch.invoke("POST", b"/nope", [], b"")
            return failed, missing
        finally:
            await ch.close()

    failed, missing = run(main())
    assert failed.status == 500  # UNKNOWN: the handler raised
    assert header(failed, GRPC_STATUS_HEADER) == b"2"
    assert header(failed, b"content-type") == b"application/json"
    body = json.loads(failed.body)
    assert body["code"] == 2 and "the app failed" in body["message"]
    assert missing.status == 501  # UNIMPLEMENTED: the SDK's answer for unknown methods
    assert header(missing, GRPC_STATUS_HEADER) == b"12"
    assert json.loads(missing.body)["code"] == 12


def test_sdk_health_probe(sdk_apps: dict[str, int]) -> None:
    async def main() -> tuple[bool, bool]:
        with_check = GrpcAppChannel(HOST, sdk_apps["health"])
        without = GrpcAppChannel(HOST, sdk_apps["plain"])
        try:
            return await with_check.probe("/healthz", 2), await without.probe("/healthz", 2)
        finally:
            await with_check.close()
            await without.close()

    # Without register_health_check the SDK answers UNIMPLEMENTED: not healthy (§13.3).
    assert run(main()) == (True, False)


# --- an in-process AppCallback servicer ---------------------------------------------------------


class Servicer(appcallback_pb2_grpc.AppCallbackServicer):
    def __init__(self) -> None:
        self.requests: list[tuple[common_pb2.InvokeRequest, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def OnInvoke(
        self, request: common_pb2.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.InvokeResponse:
        self.requests.append((request, dict(context.invocation_metadata())))
        if request.method == "rich":
            st = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="no such thing")
            info = error_details_pb2.ErrorInfo(reason="THING_MISSING", domain="example.com")
            st.details.add().Pack(info)
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "no such thing",
                trailing_metadata=(("grpc-status-details-bin", st.SerializeToString()),),
            )
        if request.method == "plain":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caf\u00e9 100% closed")
        if request.method == "busy":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        if request.method == "slow":
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(0.05)
            self.in_flight -= 1
        await context.send_initial_metadata((("x-reply", "1"), ("blob-bin", b"\x00\x01")))
        return common_pb2.InvokeResponse(
            data=any_pb2.Any(type_url=request.data.type_url, value=request.data.value),
            content_type="application/x-protobuf",
        )


class Health(appcallback_pb2_grpc.AppCallbackHealthCheckServicer):
    def __init__(self) -> None:
        self.ok = True

    async def HealthCheck(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> appcallback_pb2.HealthCheckResponse:
        if not self.ok:
            await context.abort(grpc.StatusCode.INTERNAL, "sick")
        return appcallback_pb2.HealthCheckResponse()


class Harness:
    def __init__(self, creds: grpc.ServerCredentials | None = None) -> None:
        self.servicer = Servicer()
        self.health = Health()
        self.creds = creds
        self.server: grpc.aio.Server | None = None

    async def __aenter__(self) -> Harness:
        self.server = grpc.aio.server()
        appcallback_pb2_grpc.add_AppCallbackServicer_to_server(self.servicer, self.server)
        appcallback_pb2_grpc.add_AppCallbackHealthCheckServicer_to_server(self.health, self.server)
        if self.creds is None:
            self.port = self.server.add_insecure_port(f"{HOST}:0")
        else:
            self.port = self.server.add_secure_port(f"{HOST}:0", self.creds)
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.stop(0)


def test_request_mapping_and_any_round_trip() -> None:
    async def main() -> tuple[InvokeResponse, list[Any]]:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port)
            try:
                resp = await ch.invoke(
                    "patch",
                    b"/orders/say%20hi?a=1&b=%20",
                    [
                        (b"Content-Type", b"application/x-protobuf"),
                        (ANY_TYPE_HEADER, b"type.googleapis.com/my.Msg"),
                    ],
                    b"\x08\x01",
                )
                await ch.invoke("BREW", b"/coffee", [], b"")
                await ch.invoke("POST", b"/noverb", [(NO_VERB_HEADER, b"1")], b"")
            finally:
                await ch.close()
            return resp, h.servicer.requests

    resp, requests = run(main())
    req, md = requests[0]
    assert req.method == "orders/say hi"
    assert req.http_extension.verb == common_pb2.HTTPExtension.PATCH
    assert req.http_extension.querystring == "a=1&b=%20"
    assert req.content_type == "application/x-protobuf"
    assert (req.data.type_url, req.data.value) == ("type.googleapis.com/my.Msg", b"\x08\x01")
    assert not any(k.startswith("pillion-") or k == "content-type" for k in md)
    assert requests[1][0].http_extension.verb == common_pb2.HTTPExtension.NONE  # unknown verb
    assert requests[1][0].method == "coffee"
    assert requests[2][0].http_extension.verb == common_pb2.HTTPExtension.NONE
    assert resp.status == 200 and resp.body == b"\x08\x01"
    assert resp.headers == [
        (b"pillion-app-protocol", b"grpc"),
        (b"content-type", b"application/x-protobuf"),
        (b"x-reply", b"1"),  # initial metadata; the -bin entry is not an HTTP header
        (ANY_TYPE_HEADER, b"type.googleapis.com/my.Msg"),
    ]


def test_rich_error_keeps_status_details() -> None:
    async def main() -> InvokeResponse:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port)
            try:
                return await ch.invoke("GET", b"/rich", [], b"")
            finally:
                await ch.close()

    resp = run(main())
    assert (resp.status, resp.reason) == (404, b"Not Found")
    assert header(resp, b"content-type") == b"application/json"
    assert header(resp, GRPC_STATUS_HEADER) == b"5"
    assert header(resp, GRPC_MESSAGE_HEADER) == b"no such thing"
    raw = header(resp, GRPC_DETAILS_HEADER)
    assert raw is not None
    st = status_pb2.Status.FromString(base64.b64decode(raw))
    assert st.code == 5 and st.details[0].type_url.endswith("google.rpc.ErrorInfo")
    assert json.loads(resp.body) == {
        "code": 5,
        "message": "no such thing",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "THING_MISSING",
                "domain": "example.com",
            }
        ],
    }


def test_plain_error_and_app_unavailable_are_responses() -> None:
    async def main() -> tuple[InvokeResponse, InvokeResponse]:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port)
            try:
                return (
                    await ch.invoke("GET", b"/plain", [], b""),
                    await ch.invoke("GET", b"/busy", [], b""),
                )
            finally:
                await ch.close()

    plain, busy = run(main())
    assert plain.status == 403
    assert header(plain, GRPC_STATUS_HEADER) == b"7"
    # grpc-message encoding: percent-escaped UTF-8, so any text survives an HTTP header.
    assert header(plain, GRPC_MESSAGE_HEADER) == b"caf%C3%A9 100%25 closed"
    assert header(plain, GRPC_DETAILS_HEADER) is None
    assert json.loads(plain.body) == {"code": 7, "message": "caf\u00e9 100% closed"}
    # UNAVAILABLE chosen by the app is its answer, not an unreachable app.
    assert busy.status == 503 and header(busy, GRPC_STATUS_HEADER) == b"14"


def test_app_token_replaces_caller_token_and_headers_filtered() -> None:
    async def main() -> dict[str, Any]:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port, app_token="tok")
            try:
                await ch.invoke(
                    "GET",
                    b"/x",
                    [
                        (b"dapr-api-token", b"caller"),
                        (b"if-match", b"1"),
                        (b"x-bad", b"caf\xc3\xa9"),
                    ],
                    b"",
                )
            finally:
                await ch.close()
            return h.servicer.requests[0][1]

    md = run(main())
    assert md["dapr-api-token"] == "tok"
    assert md["dapr-if-match"] == "1"
    assert "x-bad" not in md


def test_to_metadata_rules() -> None:
    md = to_metadata(
        [
            (b"Cache-Control", b"no-cache"),
            (b"cookie", b"a=b"),
            (b"authorization", b"Bearer x"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b":path", b"/x"),
            (b"pillion-grpc-status", b"3"),
            (b"grpc-trace-bin", b"\x00\x01"),
            (b"custom-bin", b"\xff\x00"),
            (b"bad key", b"v"),
            (b"x-tab", b"a\tb"),
            (b"baggage", b"k=v"),
        ]
    )
    assert md == [
        ("dapr-cache-control", "no-cache"),
        ("dapr-cookie", "a=b"),
        ("authorization", "Bearer x"),
        ("dapr-grpc-trace-bin", b"\x00\x01"),
        ("custom-bin", b"\xff\x00"),
        ("baggage", "k=v"),
    ]
    req = build_request("GET", b"/", [], b"")
    assert (req.method, req.http_extension.querystring) == ("", "")


def test_unreachable_app() -> None:
    async def main() -> None:
        ch = GrpcAppChannel(HOST, free_port())
        try:
            with pytest.raises(Unreachable, match="not reachable"):
                await ch.invoke("GET", b"/x", [], b"")
            assert await ch.probe("", 1) is False
        finally:
            await ch.close()

    run(main())


def test_unhealthy_short_circuits() -> None:
    async def main() -> int:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port)
            ch.healthy = False
            try:
                with pytest.raises(PillionError, match="app is not in a healthy state"):
                    await ch.invoke("GET", b"/x", [], b"")
            finally:
                await ch.close()
            return len(h.servicer.requests)

    assert run(main()) == 0


def test_health_probe_follows_app() -> None:
    async def main() -> list[bool]:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port)
            try:
                first = await ch.probe("/healthz", 1)
                h.health.ok = False
                second = await ch.probe("/healthz", 1)
                return [first, second]
            finally:
                await ch.close()

    assert run(main()) == [True, False]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_max_concurrency(loop: str) -> None:
    async def main() -> int:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port, max_concurrency=2)
            try:
                results = await asyncio.gather(
                    *(ch.invoke("POST", b"/slow", [], b"") for _ in range(6))
                )
            finally:
                await ch.close()
            assert all(r.status == 200 for r in results)
            return h.servicer.max_in_flight

    assert run(main(), loop) == 2


def test_message_size_limit() -> None:
    async def main() -> None:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port, max_message_size=1024)
            try:
                resp = await ch.invoke("POST", b"/x", [], b"a" * 4096)
            finally:
                await ch.close()
            # Too large to send: grpc refuses locally with RESOURCE_EXHAUSTED.
            assert resp.status == 429 and header(resp, GRPC_STATUS_HEADER) == b"8"
            assert h.servicer.requests == []

    run(main())


def test_app_restart_is_reachable_again() -> None:
    async def main() -> int:
        async with Harness() as h:
            port = h.port
            ch = GrpcAppChannel(HOST, port)
            assert (await ch.invoke("GET", b"/x", [], b"")).status == 200
        try:
            with pytest.raises(Unreachable):
                await ch.invoke("GET", b"/x", [], b"")
            server = grpc.aio.server()
            appcallback_pb2_grpc.add_AppCallbackServicer_to_server(Servicer(), server)
            assert server.add_insecure_port(f"{HOST}:{port}") == port
            await server.start()
            try:
                deadline = time.monotonic() + 5
                while True:
                    try:
                        return (await ch.invoke("GET", b"/x", [], b"")).status
                    except Unreachable:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await server.stop(0)
        finally:
            await ch.close()

    assert run(main()) == 200


# --- grpcs ----------------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[bytes, bytes]:
    """A certificate for a name that is not the address dialled, so only pinning can pass."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not available")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=myapp.internal",
            "-addext",
            "subjectAltName=DNS:myapp.internal",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert.read_bytes(), key.read_bytes()


def test_grpcs_without_certificate_verification(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)

    async def main() -> tuple[int, bool]:
        creds = grpc.ssl_server_credentials([(key, cert)])
        async with Harness(creds) as h:
            ch = GrpcAppChannel(HOST, h.port, tls=True)
            try:
                resp = await ch.invoke("GET", b"/x", [], b"over tls")
                return resp.status, await ch.probe("", 2)
            finally:
                await ch.close()

    assert run(main()) == (200, True)


def test_grpcs_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        ch = GrpcAppChannel(HOST, free_port(), tls=True)
        try:
            with pytest.raises(Unreachable, match="TLS"):
                await ch.invoke("GET", b"/x", [], b"")
        finally:
            await ch.close()

    run(main())


def test_cancelled_call_frees_its_slot() -> None:
    async def main() -> int:
        async with Harness() as h:
            ch = GrpcAppChannel(HOST, h.port, max_concurrency=1)
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ch.invoke("POST", b"/slow", [], b""), 0.01)
                return (await ch.invoke("GET", b"/x", [], b"")).status
            finally:
                await ch.close()

    assert run(main()) == 200
