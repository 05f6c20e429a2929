"""InvokeService: protobuf -> InvokeRequest for the block, InvokeResponse -> protobuf and status."""

from __future__ import annotations

import base64

import grpc
import pytest
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import dapr_pb2_grpc, invoke_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from pillion.blocks.invoke import (
    ANY_TYPE_HEADER,
    APP_PROTOCOL_HEADER,
    GRPC_DETAILS_HEADER,
    GRPC_MESSAGE_HEADER,
    GRPC_STATUS_HEADER,
    NO_VERB_HEADER,
    InvokeResponse,
)
from tests.unit.grpc.conftest import GrpcSidecar
from tests.unit.grpc.rich import details_of

Stub = dapr_pb2_grpc.DaprStub
Verb = common_pb2.HTTPExtension.Verb


def request(
    method: str = "do",
    data: bytes = b"payload",
    type_url: str = "",
    content_type: str = "",
    verb: int = Verb.POST,
    query: str = "",
    app: str = "other",
) -> invoke_pb2.InvokeServiceRequest:
    return invoke_pb2.InvokeServiceRequest(
        id=app,
        message=common_pb2.InvokeRequest(
            method=method,
            data=any_pb2.Any(type_url=type_url, value=data),
            content_type=content_type,
            http_extension=common_pb2.HTTPExtension(verb=verb, querystring=query),
        ),
    )


def invoke(
    sidecar: GrpcSidecar,
    req: invoke_pb2.InvokeServiceRequest,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> tuple[common_pb2.InvokeResponse, dict[str, str]]:
    async def main(stub: Stub) -> tuple[common_pb2.InvokeResponse, dict[str, str]]:
        call = stub.InvokeService(req, metadata=metadata)
        resp = await call
        return resp, dict(await call.initial_metadata())

    return sidecar.run(main)


def invoke_error(
    sidecar: GrpcSidecar, req: invoke_pb2.InvokeServiceRequest
) -> tuple[grpc.aio.AioRpcError, dict[str, str]]:
    async def main(stub: Stub) -> tuple[grpc.aio.AioRpcError, dict[str, str]]:
        call = stub.InvokeService(req)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value, dict(await call.initial_metadata())

    return sidecar.run(main)


def answer(
    sidecar: GrpcSidecar, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    sidecar.link.responses.append(InvokeResponse(status, b"", headers, body))


def test_request_mapping(sidecar: GrpcSidecar) -> None:
    sidecar.link.calls.clear()
    invoke(
        sidecar,
        request(
            method="orders/new",
            data=b"\x01\x02",
            type_url="type.googleapis.com/my.Order",
            content_type="application/x-protobuf",
            verb=Verb.PUT,
            query="a=1&b=two",
        ),
        metadata=(
            ("x-custom", "yes"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("trace-bin", b"\x00\x01"),
            ("dapr-api-token", "secret"),
            ("pillion-no-http-verb", "spoofed"),
        ),
    )
    (call,) = sidecar.link.calls
    assert call.verb == "PUT"
    assert call.target == b"/orders/new?a=1&b=two"
    assert call.body == b"\x01\x02"
    assert call.header(b"content-type") == b"application/x-protobuf"
    assert call.header(ANY_TYPE_HEADER) == b"type.googleapis.com/my.Order"
    assert call.header(b"x-custom") == b"yes"
    assert call.header(b"traceparent") is not None
    assert call.header(NO_VERB_HEADER) is None
    names = {k for k, _ in call.headers}
    assert not {b"trace-bin", b"dapr-api-token", b"user-agent", b":authority"} & names
    assert not any(k.startswith(b"grpc-") for k in names)
    assert call.header(b"dapr-callee-app-id") == b"other"
    assert call.header(b"x-forwarded-for") == b"127.0.0.1"


def test_no_verb_travels_as_post_with_the_no_verb_header(sidecar: GrpcSidecar) -> None:
    sidecar.link.calls.clear()
    invoke(sidecar, request(verb=Verb.NONE, content_type=""))
    (call,) = sidecar.link.calls
    assert call.verb == "POST"
    assert call.header(NO_VERB_HEADER) == b"1"
    assert call.header(b"content-type") is None
    assert call.header(ANY_TYPE_HEADER) is None


def test_method_is_percent_encoded_as_a_path(sidecar: GrpcSidecar) -> None:
    sidecar.link.calls.clear()
    invoke(sidecar, request(method="a b/ü?x", verb=Verb.GET))
    assert sidecar.link.calls[0].target == b"/a%20b/%C3%BC%3Fx"


def test_response_mapping(sidecar: GrpcSidecar) -> None:
    answer(
        sidecar,
        201,
        [
            (b"content-type", b"application/x-protobuf"),
            (ANY_TYPE_HEADER, b"type.googleapis.com/my.Reply"),
            (b"x-reply", b"r"),
            (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
            (b"connection", b"keep-alive"),
            (b"content-length", b"5"),
            (b"bad header", b"x"),
            (b"x-non-ascii", "é".encode("latin-1")),
        ],
        b"reply",
    )
    resp, md = invoke(sidecar, request())
    assert resp.data.value == b"reply"
    assert resp.data.type_url == "type.googleapis.com/my.Reply"
    assert resp.content_type == "application/x-protobuf"
    assert md["dapr-http-status"] == "201"
    assert md["x-reply"] == "r"
    # IANA permanent header names get Dapr's `dapr-` prefix in gRPC metadata.
    assert md["dapr-content-type"] == "application/x-protobuf"
    assert md["dapr-date"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    for absent in ("connection", "content-length", "bad header", "x-non-ascii", "content-type"):
        assert absent not in md
    assert not any(k.startswith("pillion-") for k in md)


def test_plain_response_has_an_empty_type_url(sidecar: GrpcSidecar) -> None:
    resp, md = invoke(sidecar, request())
    assert (resp.data.type_url, resp.data.value, resp.content_type) == ("", b"remote", "text/plain")
    assert md["dapr-http-status"] == "200"


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        (404, grpc.StatusCode.NOT_FOUND, "Not Found"),
        (400, grpc.StatusCode.INTERNAL, "Bad Request"),  # Dapr's CodeFromHTTPStatus, verbatim
        (409, grpc.StatusCode.ALREADY_EXISTS, "Conflict"),
        (500, grpc.StatusCode.UNKNOWN, "Internal Server Error"),
        (503, grpc.StatusCode.UNAVAILABLE, "Service Unavailable"),
        (302, grpc.StatusCode.UNKNOWN, "Found"),
        (418, grpc.StatusCode.UNKNOWN, "I'm a teapot"),
    ],
)
def test_http_error_status_is_mapped_with_error_info(
    sidecar: GrpcSidecar, status: int, code: grpc.StatusCode, text: str
) -> None:
    body = b"x" * 70
    answer(sidecar, status, [(b"x-err", b"1")], body)
    err, md = invoke_error(sidecar, request())
    assert err.code() == code
    assert err.details() == text
    info = details_of(err)["ErrorInfo"]
    assert (info.reason, info.domain) == (text, "dapr.io")
    assert dict(info.metadata) == {"http.code": str(status), "http.error_message": "x" * 63}
    assert md["dapr-http-status"] == str(status)
    assert md["x-err"] == "1"


def test_grpc_status_header_is_passed_through(sidecar: GrpcSidecar) -> None:
    detail = status_pb2.Status(code=5, message="ignored")
    detail.details.add().Pack(
        error_details_pb2.ResourceInfo(resource_type="sidecar", resource_name="invoke/service")
    )
    answer(
        sidecar,
        200,
        [
            (GRPC_STATUS_HEADER, b"5"),
            (GRPC_MESSAGE_HEADER, b"no such order: 100%25 gone %C3%A9"),
            (GRPC_DETAILS_HEADER, base64.b64encode(detail.SerializeToString())),
        ],
        b"",
    )
    err, md = invoke_error(sidecar, request())
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such order: 100% gone é"
    assert details_of(err)["ResourceInfo"].resource_name == "invoke/service"
    assert md["dapr-http-status"] == "200"


def test_grpc_status_header_without_details(sidecar: GrpcSidecar) -> None:
    answer(
        sidecar,
        200,
        [(GRPC_STATUS_HEADER, b"3"), (GRPC_MESSAGE_HEADER, b"missing HTTP extension field")],
        b"",
    )
    err, _ = invoke_error(sidecar, request())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "missing HTTP extension field"
    assert details_of(err) == {}


def test_grpc_status_ok_header_is_success(sidecar: GrpcSidecar) -> None:
    answer(sidecar, 200, [(GRPC_STATUS_HEADER, b"0")], b"fine")
    resp, _ = invoke(sidecar, request())
    assert resp.data.value == b"fine"


def test_block_error_is_encoded(sidecar: GrpcSidecar) -> None:
    err, _ = invoke_error(sidecar, request(app="ghost"))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "failed to invoke, id: ghost, err: couldn't find service: ghost"


def test_grpc_app_answer_has_its_headers_only(sidecar: GrpcSidecar) -> None:
    """daprd sets dapr-http-status only for HTTP apps; a gRPC app's headers go as they are
    and its content type travels in the message."""
    answer(
        sidecar,
        200,
        [
            (APP_PROTOCOL_HEADER, b"grpc"),
            (b"content-type", b"application/x-protobuf"),
            (b"x-reply", b"1"),
        ],
        b"\x08\x01",
    )
    resp, md = invoke(sidecar, request())
    assert resp.content_type == "application/x-protobuf"
    assert md.get("x-reply") == "1"
    assert "dapr-http-status" not in md and "content-type" not in md


def test_grpc_app_bare_answer_sends_no_metadata(sidecar: GrpcSidecar) -> None:
    answer(sidecar, 200, [(APP_PROTOCOL_HEADER, b"grpc")], b"ok")
    resp, md = invoke(sidecar, request())
    assert resp.data.value == b"ok"
    assert not [k for k in md if not k.startswith(("grpc-", ":"))], md
