"""PillionError and raw gRPC codes encoded as google.rpc.Status, the way Dapr sends them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pillion.errors import DOMAIN, PillionError

# The 17 gRPC codes by number; `grpc.StatusCode.X.value` is `(number, "name")`.
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a wire number; numbers gRPC does not define become UNKNOWN."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def make_status(code: grpc.StatusCode, message: str, details: Iterable[Any] = ()) -> grpc.Status:
    """A grpc.Status with `details` (messages, or Anys already packed) in grpc-status-details-bin.

    The Status proto's code and message must equal the call's, or the client's
    `rpc_status.from_call` (used by the SDK's DaprGrpcError) raises.
    """
    proto = status_pb2.Status(code=code.value[0], message=message)
    for d in details:
        if isinstance(d, any_pb2.Any):
            proto.details.append(d)
        else:
            proto.details.add().Pack(d)
    return rpc_status.to_status(proto)


def to_status(err: PillionError) -> grpc.Status:
    """Dapr's gRPC error: code and message, plus ErrorInfo/ResourceInfo/BadRequest when rich."""
    code = grpc.StatusCode[err.grpc_code.value]
    details: list[Any] = []
    if err.reason is not None:
        details.append(
            error_details_pb2.ErrorInfo(
                reason=err.reason, domain=DOMAIN, metadata=dict(err.metadata)
            )
        )
        if err.resource_type is not None:
            details.append(
                error_details_pb2.ResourceInfo(
                    resource_type=err.resource_type, resource_name=err.resource_name or ""
                )
            )
        if err.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in err.violations
                    ]
                )
            )
    return make_status(code, err.message, details)


async def abort(context: grpc.aio.ServicerContext, err: PillionError) -> NoReturn:
    """End the RPC with `err`; raises (grpc.aio's AbortError) like context.abort does."""
    await context.abort_with_status(to_status(err))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover
