"""The one catalogue of API errors: Dapr's code, HTTP status, gRPC code and rich details."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

DOMAIN = "dapr.io"


class GrpcCode(StrEnum):
    """gRPC status names (the gRPC adapter maps them to grpc.StatusCode)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


# Wire numbers of the codes: GrpcCode lists them in grpc's numeric order (0..16).
GRPC_NUMBERS: dict[GrpcCode, int] = {code: i for i, code in enumerate(GrpcCode)}


class Code(StrEnum):
    """Dapr's error codes (dapr-api.md §18.3) used by the blocks built so far."""

    BAD_REQUEST = "ERR_BAD_REQUEST"
    API_UNIMPLEMENTED = "ERR_API_UNIMPLEMENTED"
    BODY_READ = "ERR_BODY_READ"
    BODY_TOO_LARGE = "ERR_BODY_TOO_LARGE"
    MALFORMED_REQUEST = "ERR_MALFORMED_REQUEST"
    INTERNAL = "ERR_INTERNAL"
    ERROR = "ERROR"
    DIRECT_INVOKE = "ERR_DIRECT_INVOKE"
    HEALTH_NOT_READY = "ERR_HEALTH_NOT_READY"
    OUTBOUND_HEALTH_NOT_READY = "ERR_OUTBOUND_HEALTH_NOT_READY"
    HEALTH_APPID_NOT_MATCH = "ERR_HEALTH_APPID_NOT_MATCH"
    STATE_STORE_NOT_CONFIGURED = "ERR_STATE_STORE_NOT_CONFIGURED"
    STATE_STORE_NOT_FOUND = "ERR_STATE_STORE_NOT_FOUND"
    STATE_GET = "ERR_STATE_GET"
    STATE_SAVE = "ERR_STATE_SAVE"
    STATE_DELETE = "ERR_STATE_DELETE"
    STATE_BULK_GET = "ERR_STATE_BULK_GET"
    STATE_BULK_DELETE = "ERR_STATE_BULK_DELETE"
    NOT_SUPPORTED_STATE_OPERATION = "ERR_NOT_SUPPORTED_STATE_OPERATION"
    STATE_TRANSACTION = "ERR_STATE_TRANSACTION"
    STATE_STORE_NOT_SUPPORTED = "ERR_STATE_STORE_NOT_SUPPORTED"
    STATE_STORE_TOO_MANY_TRANSACTIONS = "ERR_STATE_STORE_TOO_MANY_TRANSACTIONS"
    STATE_QUERY = "ERR_STATE_QUERY"
    PUBLISH_OUTBOX = "ERR_PUBLISH_OUTBOX"
    SECRET_STORES_NOT_CONFIGURED = "ERR_SECRET_STORES_NOT_CONFIGURED"
    SECRET_STORE_NOT_FOUND = "ERR_SECRET_STORE_NOT_FOUND"
    PERMISSION_DENIED = "ERR_PERMISSION_DENIED"
    SECRET_GET = "ERR_SECRET_GET"
    LOCK_STORE_NOT_CONFIGURED = "ERR_LOCK_STORE_NOT_CONFIGURED"
    LOCK_STORE_NOT_FOUND = "ERR_LOCK_STORE_NOT_FOUND"
    TRY_LOCK = "ERR_TRY_LOCK"
    UNLOCK = "ERR_UNLOCK"
    CONFIGURATION_STORE_NOT_CONFIGURED = "ERR_CONFIGURATION_STORE_NOT_CONFIGURED"
    CONFIGURATION_STORE_NOT_FOUND = "ERR_CONFIGURATION_STORE_NOT_FOUND"
    CONFIGURATION_GET = "ERR_CONFIGURATION_GET"
    CONFIGURATION_SUBSCRIBE = "ERR_CONFIGURATION_SUBSCRIBE"
    CONFIGURATION_UNSUBSCRIBE = "ERR_CONFIGURATION_UNSUBSCRIBE"
    APP_CHANNEL_NIL = "ERR_APP_CHANNEL_NIL"
    INVOKE_OUTPUT_BINDING = "ERR_INVOKE_OUTPUT_BINDING"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


@dataclass(eq=False)
class PillionError(Exception):
    """An error the API returns to a caller; adapters encode it, nothing else does.

    `reason` makes it a rich error (google.rpc.ErrorInfo with domain dapr.io); without it
    the error is Dapr's legacy `{"errorCode", "message"}`.
    """

    code: str
    message: str
    http_status: int = 500
    grpc_code: GrpcCode = GrpcCode.INTERNAL
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    resource_type: str | None = None
    resource_name: str | None = None
    violations: tuple[FieldViolation, ...] = ()
    # Dapr sends some errors rich over gRPC but legacy over HTTP (state save/delete).
    http_legacy: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def details(self) -> list[dict[str, Any]]:
        """The `details[]` list of Dapr's rich HTTP error body (snake_case keys)."""
        out: list[dict[str, Any]] = []
        if self.reason is None:
            return out
        out.append(
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": self.reason,
                "domain": DOMAIN,
                "metadata": dict(self.metadata),
            }
        )
        if self.resource_type is not None:
            out.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ResourceInfo",
                    "resource_type": self.resource_type,
                    "resource_name": self.resource_name or "",
                    "owner": "",
                    "description": "",
                }
            )
        if self.violations:
            out.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "field_violations": [
                        {"field": v.field, "description": v.description} for v in self.violations
                    ],
                }
            )
        return out

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"errorCode": self.code, "message": self.message}
        details = [] if self.http_legacy else self.details()
        if details:
            body["details"] = details
        return json.dumps(body).encode()


# --- constructors for errors raised in more than one place -------------------------------------


def bad_request(message: str) -> PillionError:
    return PillionError(Code.BAD_REQUEST, message, 400, GrpcCode.INVALID_ARGUMENT)


def malformed(message: str) -> PillionError:
    return PillionError(Code.MALFORMED_REQUEST, message, 400, GrpcCode.INVALID_ARGUMENT)


def unimplemented(block: str) -> PillionError:
    return PillionError(
        Code.API_UNIMPLEMENTED,
        f"the {block} API is not implemented in this version of pillion",
        501,
        GrpcCode.UNIMPLEMENTED,
    )


def direct_invoke(message: str, http_status: int = 500) -> PillionError:
    grpc = {404: GrpcCode.NOT_FOUND, 403: GrpcCode.PERMISSION_DENIED}.get(
        http_status, GrpcCode.INTERNAL
    )
    return PillionError(Code.DIRECT_INVOKE, message, http_status, grpc)


def body_too_large(limit: int) -> PillionError:
    return PillionError(
        Code.BODY_TOO_LARGE,
        f"request body too large: the limit is {limit} bytes (--max-body-size)",
        413,
        GrpcCode.RESOURCE_EXHAUSTED,
    )
