"""PillionError -> google.rpc.Status, as Dapr encodes legacy and rich errors."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from pillion.api.grpc.errors import make_status, status_code, to_status
from pillion.errors import FieldViolation, GrpcCode, PillionError, bad_request


def _proto(st: grpc.Status) -> status_pb2.Status:
    md = dict(st.trailing_metadata)
    return status_pb2.Status.FromString(md["grpc-status-details-bin"])


def test_legacy_error_has_code_message_and_no_details() -> None:
    st = to_status(bad_request("nope"))
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT
    assert st.details == "nope"
    proto = _proto(st)
    assert (proto.code, proto.message, len(proto.details)) == (3, "nope", 0)


def test_rich_error_packs_error_info_resource_info_and_bad_request() -> None:
    err = PillionError(
        "ERR_MALFORMED_REQUEST",
        "bad key",
        400,
        GrpcCode.INVALID_ARGUMENT,
        reason="DAPR_STATE_ILLEGAL_KEY",
        metadata={"appID": "app"},
        resource_type="state",
        resource_name="statestore",
        violations=(FieldViolation("a||b", "can't contain '||'"),),
    )
    proto = _proto(to_status(err))
    assert proto.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, res, bad = (
        error_details_pb2.ErrorInfo(),
        error_details_pb2.ResourceInfo(),
        error_details_pb2.BadRequest(),
    )
    assert [d.type_url.rsplit(".", 1)[-1] for d in proto.details] == [
        "ErrorInfo",
        "ResourceInfo",
        "BadRequest",
    ]
    proto.details[0].Unpack(info)
    proto.details[1].Unpack(res)
    proto.details[2].Unpack(bad)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "DAPR_STATE_ILLEGAL_KEY",
        "dapr.io",
        {"appID": "app"},
    )
    assert (res.resource_type, res.resource_name) == ("state", "statestore")
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("a||b", "can't contain '||'")
    ]


def test_every_grpc_code_name_maps() -> None:
    for code in GrpcCode:
        assert grpc.StatusCode[code.value].name == code.value


def test_unknown_wire_numbers_become_unknown() -> None:
    assert status_code(5) == grpc.StatusCode.NOT_FOUND
    assert status_code(99) == grpc.StatusCode.UNKNOWN
    st = make_status(grpc.StatusCode.ABORTED, "m", [error_details_pb2.ErrorInfo(reason="R")])
    assert _proto(st).code == 10
