"""PillionError JSON bodies: Dapr's legacy and rich shapes, and the shared constructors."""

from __future__ import annotations

import json

import pytest

from pillion.errors import (
    Code,
    FieldViolation,
    GrpcCode,
    PillionError,
    bad_request,
    body_too_large,
    direct_invoke,
    malformed,
    unimplemented,
)


def body(err: PillionError) -> dict[str, object]:
    out = json.loads(err.to_json())
    assert isinstance(out, dict)
    return out


def test_legacy_body_has_exactly_code_and_message() -> None:
    err = PillionError(Code.STATE_GET, "fail to get k from state store s: x")
    assert body(err) == {
        "errorCode": "ERR_STATE_GET",
        "message": "fail to get k from state store s: x",
    }
    assert err.details() == []


def test_defaults_are_500_internal() -> None:
    err = PillionError("ERR_X", "m")
    assert (err.http_status, err.grpc_code, err.reason) == (500, GrpcCode.INTERNAL, None)


def test_resource_without_reason_stays_legacy() -> None:
    err = PillionError("ERR_X", "m", resource_type="state", resource_name="s")
    assert "details" not in body(err)


def test_rich_body_with_error_info_only() -> None:
    err = PillionError("ERR_X", "m", reason="DAPR_X", metadata={"appID": "app"})
    assert body(err) == {
        "errorCode": "ERR_X",
        "message": "m",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "DAPR_X",
                "domain": "dapr.io",
                "metadata": {"appID": "app"},
            }
        ],
    }


def test_rich_body_full_order_and_snake_case() -> None:
    err = PillionError(
        Code.MALFORMED_REQUEST,
        "bad key",
        400,
        GrpcCode.INVALID_ARGUMENT,
        reason="DAPR_STATE_ILLEGAL_KEY",
        resource_type="state",
        resource_name="statestore",
        violations=(FieldViolation("a||b", "can't contain '||'"),),
    )
    details = body(err)["details"]
    assert details == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "DAPR_STATE_ILLEGAL_KEY",
            "domain": "dapr.io",
            "metadata": {},
        },
        {
            "@type": "type.googleapis.com/google.rpc.ResourceInfo",
            "resource_type": "state",
            "resource_name": "statestore",
            "owner": "",
            "description": "",
        },
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [{"field": "a||b", "description": "can't contain '||'"}],
        },
    ]


def test_resource_name_defaults_to_empty_string() -> None:
    err = PillionError("ERR_X", "m", reason="R", resource_type="state")
    assert err.details()[1]["resource_name"] == ""


def test_details_metadata_is_a_copy() -> None:
    err = PillionError("ERR_X", "m", reason="R", metadata={"a": "1"})
    err.details()[0]["metadata"]["a"] = "changed"
    assert err.metadata == {"a": "1"}


def test_str_and_exception_args() -> None:
    err = PillionError("ERR_X", "something broke")
    assert str(err) == "ERR_X: something broke"
    assert err.args == ("something broke",)


def test_non_ascii_message_round_trips() -> None:
    err = PillionError("ERR_X", "clé « absente »")
    assert body(err)["message"] == "clé « absente »"


@pytest.mark.parametrize(
    ("err", "code", "status", "grpc"),
    [
        (bad_request("x"), "ERR_BAD_REQUEST", 400, GrpcCode.INVALID_ARGUMENT),
        (malformed("x"), "ERR_MALFORMED_REQUEST", 400, GrpcCode.INVALID_ARGUMENT),
        (unimplemented("pub/sub"), "ERR_API_UNIMPLEMENTED", 501, GrpcCode.UNIMPLEMENTED),
        (direct_invoke("x"), "ERR_DIRECT_INVOKE", 500, GrpcCode.INTERNAL),
        (direct_invoke("x", 404), "ERR_DIRECT_INVOKE", 404, GrpcCode.NOT_FOUND),
        (direct_invoke("x", 403), "ERR_DIRECT_INVOKE", 403, GrpcCode.PERMISSION_DENIED),
        (body_too_large(4), "ERR_BODY_TOO_LARGE", 413, GrpcCode.RESOURCE_EXHAUSTED),
    ],
)
def test_constructors(err: PillionError, code: str, status: int, grpc: GrpcCode) -> None:
    assert (err.code, err.http_status, err.grpc_code, err.reason) == (code, status, grpc, None)
    assert set(body(err)) == {"errorCode", "message"}


def test_constructor_messages() -> None:
    assert unimplemented("pub/sub").message == (
        "the pub/sub API is not implemented in this version of pillion"
    )
    assert "4 bytes" in body_too_large(4).message


def test_code_catalogue_spelling() -> None:
    assert all(c.value.startswith("ERR_") or c.value == "ERROR" for c in Code)
    assert Code.STATE_STORE_TOO_MANY_TRANSACTIONS.value == "ERR_STATE_STORE_TOO_MANY_TRANSACTIONS"
    assert Code.NOT_SUPPORTED_STATE_OPERATION.value == "ERR_NOT_SUPPORTED_STATE_OPERATION"
    assert all(g.value == g.name for g in GrpcCode)
