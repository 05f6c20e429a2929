"""JSON bodies of Dapr's HTTP API, decoded into block requests and encoded back."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dapr.proto.runtime.v1 import lock_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from pillion.blocks.pubsub import BulkPublishEntry
from pillion.blocks.state import SaveItem, TxOperation, parse_concurrency, parse_consistency
from pillion.components.state.api import BulkGetItem, Concurrency, Consistency, QueryResponse
from pillion.errors import Code, GrpcCode, PillionError, malformed
from pillion.transport.http import Response

JSON = (b"content-type", b"application/json")


def no_content() -> Response:
    """A fresh 204 (responses are mutable: a shared one would collect headers)."""
    return Response(204)


def error(err: PillionError) -> Response:
    return Response(err.http_status, [JSON], err.to_json())


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, [JSON], json.dumps(value, separators=(",", ":")).encode())


def query_metadata(q: Mapping[str, str]) -> dict[str, str]:
    """`metadata.<key>=<value>` query parameters, prefix removed."""
    return {k[9:]: v for k, v in q.items() if k.startswith("metadata.")}


def consistency(value: str | None) -> Consistency:
    return parse_consistency(value)


def concurrency(value: str | None) -> Concurrency:
    return parse_concurrency(value)


def _load(body: bytes, what: str) -> Any:
    if not body.strip():
        raise malformed(f"failed to parse request body: {what} is empty")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise malformed(f"failed to parse JSON request body: {exc}") from exc


def _str_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise malformed(f'"{field}" must be an object of strings')
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _opt_str(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise malformed(f'"{field}" must be a string')


def encode_value(value: Any) -> bytes:
    """A state value as Dapr stores JSON: its compact JSON text (strings keep quotes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _save_item(obj: Any, extra_md: Mapping[str, str], where: str) -> SaveItem:
    if not isinstance(obj, dict):
        raise malformed(f"{where}: each state item must be an object")
    key = obj.get("key")
    if not key:
        raise PillionError(
            Code.MALFORMED_REQUEST, '"key" is a required field', 400, GrpcCode.INVALID_ARGUMENT
        )
    if not isinstance(key, str):
        raise malformed(f'{where}: "key" must be a string')
    options = obj.get("options") or {}
    if not isinstance(options, dict):
        raise malformed(f'{where}: "options" must be an object')
    md = {**_str_map(obj.get("metadata"), "metadata"), **extra_md}
    value = encode_value(obj["value"]) if "value" in obj else b""
    return SaveItem(
        key=key,
        value=value,
        etag=_opt_str(obj.get("etag"), "etag"),
        metadata=md,
        concurrency=parse_concurrency(_opt_str(options.get("concurrency"), "concurrency")),
        consistency=parse_consistency(_opt_str(options.get("consistency"), "consistency")),
    )


def decode_save(body: bytes, query_md: Mapping[str, str]) -> list[SaveItem]:
    data = _load(body, "the state array")
    if not isinstance(data, list):
        raise malformed("failed to parse request body: expected a JSON array of state items")
    return [_save_item(o, query_md, f"item {i}") for i, o in enumerate(data)]


def decode_bulk_get(body: bytes) -> tuple[list[str], dict[str, str]]:
    data = _load(body, "the bulk request")
    if not isinstance(data, dict):
        raise malformed('failed to parse request body: expected {"keys": [...]}')
    keys = data.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise malformed('"keys" must be an array of strings')
    return keys, _str_map(data.get("metadata"), "metadata")


def decode_transaction(body: bytes) -> tuple[list[TxOperation], dict[str, str]]:
    data = _load(body, "the transaction")
    if not isinstance(data, dict):
        raise malformed('failed to parse request body: expected {"operations": [...]}')
    ops_raw = data.get("operations")
    if ops_raw is None:
        ops_raw = []
    if not isinstance(ops_raw, list):
        raise malformed('"operations" must be an array')
    ops: list[TxOperation] = []
    for i, o in enumerate(ops_raw):
        if not isinstance(o, dict):
            raise malformed(f"operation {i} must be an object")
        op = o.get("operation")
        if not isinstance(op, str):
            raise malformed(f'operation {i}: "operation" is a required field')
        if op not in ("upsert", "delete"):
            raise PillionError(
                Code.NOT_SUPPORTED_STATE_OPERATION,
                f"operation type {op} not supported",
                400,
                GrpcCode.INVALID_ARGUMENT,
            )
        ops.append(TxOperation(op, _save_item(o.get("request"), {}, f"operation {i}")))
    return ops, _str_map(data.get("metadata"), "metadata")


def _raw_json(data: bytes) -> bytes:
    """Stored bytes embedded as JSON: verbatim when they are JSON, else as a JSON string."""
    try:
        json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        if not data.startswith(b"\xef\xbb\xbf"):
            return data
    except (ValueError, UnicodeDecodeError):
        pass
    return json.dumps(data.decode("utf-8", "replace")).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def bulk_get_response(items: Sequence[BulkGetItem]) -> Response:
    parts: list[bytes] = []
    for it in items:
        fields = [b'"key":' + json.dumps(it.key).encode()]
        if it.data is not None:
            fields.append(b'"data":' + _raw_json(it.data))
        if it.etag is not None:
            fields.append(b'"etag":' + json.dumps(it.etag).encode())
        if it.metadata:
            fields.append(b'"metadata":' + json.dumps(dict(it.metadata)).encode())
        if it.error:
            fields.append(b'"error":' + json.dumps(it.error).encode())
        parts.append(b"{" + b",".join(fields) + b"}")
    return Response(200, [JSON], b"[" + b",".join(parts) + b"]")


def decode_bulk_publish(body: bytes) -> list[BulkPublishEntry]:
    """`[{"entryId", "event", "contentType", "metadata"}]` of the bulk publish API."""
    data = _load(body, "the bulk publish request")
    if not isinstance(data, list):
        raise PillionError(
            "ERR_PUBSUB_EVENTS_SER",
            "error when unmarshaling the request for topic: expected a JSON array of entries",
            400,
            GrpcCode.INVALID_ARGUMENT,
            reason="DAPR_PUBSUB_UNMARSHAL_EVENTS",
        )
    out: list[BulkPublishEntry] = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise malformed(f"entry {i} must be an object")
        ctype = e.get("contentType") or ""
        if not isinstance(ctype, str):
            raise malformed(f'entry {i}: "contentType" must be a string')
        out.append(
            BulkPublishEntry(
                str(e.get("entryId") or ""),
                e.get("event"),
                ctype,
                _str_map(e.get("metadata"), "metadata"),
            )
        )
    return out


def bulk_publish_response(failed: Sequence[tuple[str, str]]) -> Response:
    if not failed:
        return no_content()
    body = {
        "failedEntries": [{"entryId": i, "error": err} for i, err in failed],
        "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE",
    }
    return json_response(body, 500)


def query_response(resp: QueryResponse) -> Response:
    """`{"results": [{"key", "data", "etag"}], "token"}`; 204 when nothing matched."""
    if not resp.results:
        return no_content()
    parts: list[bytes] = []
    for it in resp.results:
        fields = [b'"key":' + json.dumps(it.key).encode()]
        if it.error:
            fields.append(b'"error":' + json.dumps(it.error).encode())
        else:
            fields.append(b'"data":' + _raw_json(it.data))
        if it.etag is not None:
            fields.append(b'"etag":' + json.dumps(it.etag).encode())
        parts.append(b"{" + b",".join(fields) + b"}")
    body = b'{"results":[' + b",".join(parts) + b"]"
    if resp.token:
        body += b',"token":' + json.dumps(resp.token).encode()
    if resp.metadata:
        body += b',"metadata":' + json.dumps(dict(resp.metadata)).encode()
    return Response(200, [JSON], body + b"}")


# --- distributed lock (alpha) --------------------------------------------------------------------


def _proto_body(body: bytes, msg: Message) -> None:
    """Fill `msg` from a JSON body as Dapr's protojson does: unknown fields are ignored, both
    the JSON and the proto field names are accepted, and an empty body leaves every field unset.
    """
    if not body:
        return
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        json_format.ParseDict(data, msg, ignore_unknown_fields=True)
    except (ValueError, UnicodeDecodeError, json_format.ParseError) as exc:
        raise malformed(f"failed deserializing HTTP body: {exc}") from exc


def decode_try_lock(body: bytes) -> tuple[str, str, int]:
    """`{"resourceId", "lockOwner", "expiryInSeconds"}` -> (resource id, owner, expiry)."""
    req = lock_pb2.TryLockRequest()
    _proto_body(body, req)
    return req.resource_id, req.lock_owner, req.expiry_in_seconds


def decode_unlock(body: bytes) -> tuple[str, str]:
    """`{"resourceId", "lockOwner"}` -> (resource id, owner)."""
    req = lock_pb2.UnlockRequest()
    _proto_body(body, req)
    return req.resource_id, req.lock_owner


def decode_binding(body: bytes) -> tuple[bytes, dict[str, str], str]:
    """`{"data", "metadata", "operation"}` -> (data as compact JSON, metadata, operation).

    As in Dapr, `data` is JSON-marshalled for the component: a JSON string keeps its quotes.
    """
    obj = _load(body, "binding request")
    if not isinstance(obj, dict):
        raise malformed("failed to parse JSON request body: expected an object")
    data = obj.get("data")
    raw = b"" if data is None else encode_value(data)
    op = obj.get("operation")
    if op is not None and not isinstance(op, str):
        raise malformed('"operation" must be a string')
    return raw, _str_map(obj.get("metadata"), "metadata"), op or ""
