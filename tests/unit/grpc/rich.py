"""Decoding the google.rpc.Status a gRPC error carries, for assertions."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2


def status_of(err: grpc.RpcError) -> status_pb2.Status:
    """The rich status in `grpc-status-details-bin`, or an empty Status when there is none."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


def details_of(err: grpc.RpcError) -> dict[str, Any]:
    """The unpacked details by short type name: "ErrorInfo", "ResourceInfo", "BadRequest"."""
    out: dict[str, Any] = {}
    for d in status_of(err).details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.ResourceInfo,
            error_details_pb2.BadRequest,
        ):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out
