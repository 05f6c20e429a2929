"""CloudEvent envelopes, topic scoping and app-response rules for pub/sub, as Dapr applies them."""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

SPEC_VERSION = "1.0"
DEFAULT_TYPE = "com.dapr.event.sent"
DEFAULT_SOURCE = "Dapr"
DEFAULT_CONTENT_TYPE = "text/plain"
CLOUDEVENT_CONTENT_TYPE = "application/cloudevents+json"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# CloudEvent attributes that TopicEventRequest carries in its own fields; the rest go to extensions.
_DEDICATED_FIELDS = frozenset(
    ("id", "source", "datacontenttype", "type", "specversion", "data", "data_base64")
)
_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})


class CloudEventError(ValueError):
    """A body or envelope that cannot become (or be read as) a CloudEvent."""


class Result(StrEnum):
    """What the app's answer means for one delivered message."""

    SUCCESS = "SUCCESS"
    RETRY = "RETRY"
    DROP = "DROP"


@dataclass(frozen=True, slots=True)
class TopicEvent:
    """The fields of a gRPC `TopicEventRequest` (without `path`), as plain data."""

    id: str
    source: str
    type: str
    spec_version: str
    data_content_type: str
    data: bytes
    topic: str
    pubsub_name: str
    extensions: dict[str, Any]


# --- content types -------------------------------------------------------------------------------


def _is_content_type(content_type: str, expected: str) -> bool:
    # Dapr compares the lower-cased media type up to the first ';' without trimming spaces, so
    # "application/json; charset=utf-8" is JSON but "application/json ;x" is not.
    lowered = content_type.lower()
    return lowered == expected or lowered.partition(";")[0] == expected


def is_json_content_type(content_type: str) -> bool:
    """Whether the content type is exactly `application/json` (parameters allowed)."""
    return _is_content_type(content_type, JSON_CONTENT_TYPE)


def is_cloudevent_content_type(content_type: str) -> bool:
    """Whether the body is a complete structured CloudEvent (`application/cloudevents+json`)."""
    return _is_content_type(content_type, CLOUDEVENT_CONTENT_TYPE)


def is_binary_content_type(content_type: str) -> bool:
    """Whether the content type is `application/octet-stream` (parameters allowed)."""
    return _is_content_type(content_type, BINARY_CONTENT_TYPE)


def is_string_content_type(content_type: str) -> bool:
    """Whether data of this type travels as a string: `text/*` or `application/xml`."""
    return content_type.lower().startswith("text/") or _is_content_type(
        content_type, "application/xml"
    )


# --- JSON ----------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # Go's encoding/json has no NaN/Infinity; accepting them would produce envelopes no
    # subscriber can parse.
    raise ValueError(f"invalid JSON number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"JSON number out of range: {text}")
    return value


class _Pairs(list[tuple[str, Any]]):
    """A JSON object kept as its ordered key/value pairs (duplicates included)."""


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_PAIRS_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_Pairs
)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_SPACE = " \t\r\n"


def _first_json(text: str, decoder: json.JSONDecoder = _DECODER) -> Any:
    """The first JSON value of `text`, ignoring what follows, as Go's `json.Decoder` reads it."""
    return decoder.raw_decode(text.lstrip(_JSON_SPACE))[0]


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from "\\ud800" escapes) are not UTF-8; Go substitutes U+FFFD.
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text).encode()


def _b64decode(text: str) -> bytes:
    # Go's StdEncoding skips line breaks but is otherwise strict (padding included).
    return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)


def _json_bytes(value: Any) -> bytes:
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a "\ud800" escape) cannot be UTF-8; escaping keeps the text valid
        # JSON that decodes back to the same string.
        return _ASCII_ENCODER.encode(value).encode("ascii")


def encode(envelope: Mapping[str, Any]) -> bytes:
    """The envelope as compact UTF-8 JSON."""
    try:
        return _json_bytes(envelope)
    except (TypeError, ValueError) as exc:
        raise CloudEventError(f"cannot serialise the cloud event: {exc}") from exc


def decode(message: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a broker message as a structured CloudEvent (a JSON object)."""
    # Go decodes invalid UTF-8 with replacement characters rather than failing.
    text = str(message, "utf-8", "replace")
    try:
        value = _DECODER.decode(text)
    except ValueError as exc:
        raise CloudEventError(f"the message is not a JSON cloud event: {exc}") from exc
    if not isinstance(value, dict):
        raise CloudEventError(
            f"the message is not a JSON cloud event: expected an object, got {_json_kind(value)}"
        )
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# --- time ----------------------------------------------------------------------------------------

# (second, its text): one tuple so a reader never pairs one second with another's text.
_stamp_cache: tuple[int, str] = (-1, "")


def _rfc3339(ts: float) -> str:
    """UTC RFC 3339, seconds precision; cached per second since every publish asks for it."""
    global _stamp_cache
    second = math.floor(ts)
    cached = _stamp_cache
    if cached[0] == second:
        return cached[1]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    _stamp_cache = (second, stamp)
    return stamp


def _parse_rfc3339(text: str) -> float | None:
    # Go's time.RFC3339 layout needs the 'T' separator and an explicit zone.
    if len(text) < 20 or text[10] != "T" or text[-1] == "z":
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def is_expired(envelope: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether the envelope's `expiration` lies in the past; absent or unparsable means never."""
    expiration = envelope.get("expiration")
    if not expiration or not isinstance(expiration, str):
        return False
    deadline = _parse_rfc3339(expiration)
    if deadline is None:
        return False
    return deadline < (time.time() if now is None else now)


# --- building envelopes --------------------------------------------------------------------------


def _new_id() -> str:
    return str(uuid.uuid4())


def _data_fields(data: bytes, content_type: str) -> tuple[str, Any]:
    if is_json_content_type(content_type):
        text = data.decode("utf-8", "replace")
        try:
            return "data", _first_json(text)
        except ValueError:
            # Dapr embeds an unparsable JSON body as the plain string.
            return "data", text
    if is_binary_content_type(content_type):
        return "data_base64", base64.b64encode(data).decode("ascii")
    return "data", data.decode("utf-8", "replace")


def new_envelope(
    *,
    data: bytes,
    content_type: str | None,
    topic: str,
    pubsub: str,
    source: str,
    traceparent: str = "",
    tracestate: str = "",
    ttl_seconds: int | None = None,
    overrides: Mapping[str, str] = _NO_OVERRIDES,
    now: float | None = None,
) -> dict[str, Any]:
    """The CloudEvent the sidecar wraps a published body in (dapr-api §3.2).

    `overrides` are the `metadata.cloudevent.*` entries with the prefix removed; keys are
    case-insensitive and only id, source, type, subject, traceid, traceparent and tracestate count.
    """
    event_id = ""
    event_type = ""
    subject = ""
    trace = traceparent
    for key, value in overrides.items():
        name = key.lower()
        # An empty override behaves as in Dapr: the field falls back to its default below.
        if name == "id":
            event_id = value
        elif name == "source":
            source = value
        elif name == "type":
            event_type = value
        elif name == "subject":
            subject = value
        elif name == "traceid":
            trace = value
        elif name == "tracestate":
            tracestate = value
    for key, value in overrides.items():
        # traceparent wins over traceid whatever the order, and only when non-empty.
        if value and key.lower() == "traceparent":
            trace = value
    content_type = content_type or DEFAULT_CONTENT_TYPE
    if now is None:
        now = time.time()
    data_key, data_value = _data_fields(data, content_type)
    envelope: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": event_id or _new_id(),
        "source": source or DEFAULT_SOURCE,
        "type": event_type or DEFAULT_TYPE,
        "datacontenttype": content_type,
        data_key: data_value,
        "topic": topic,
        "pubsubname": pubsub,
        # Dapr keeps the legacy `traceid` identical to `traceparent`.
        "traceid": trace,
        "traceparent": trace,
        "tracestate": tracestate,
        "time": _rfc3339(now),
    }
    if ttl_seconds is not None:
        envelope["expiration"] = _rfc3339(now + ttl_seconds)
    if subject:
        envelope["subject"] = subject
    return envelope


def complete_envelope(
    body: bytes,
    *,
    topic: str,
    pubsub: str,
    source: str = DEFAULT_SOURCE,
    traceparent: str = "",
    tracestate: str = "",
    now: float | None = None,
) -> dict[str, Any]:
    """Adopt an `application/cloudevents+json` body as the envelope (dapr-api §3.1).

    Fields the publisher set are kept; a missing (or null) `id`, `source`, `type`, `specversion`
    or `time` is filled in; `topic`, `pubsubname` and the trace fields are always overwritten.
    `datacontenttype` is left as sent, like Dapr. `source` is the fill-in value: Dapr uses
    `Dapr`, not the app id.
    """
    text = body.decode("utf-8", "replace")
    try:
        event = _first_json(text)
    except ValueError as exc:
        raise CloudEventError(f"the body is not a JSON cloud event: {exc}") from exc
    if not isinstance(event, dict):
        raise CloudEventError(
            f"the body is not a JSON cloud event: expected an object, got {_json_kind(event)}"
        )
    if event.get("id") is None:
        event["id"] = _new_id()
    if event.get("source") is None:
        event["source"] = source
    if event.get("type") is None:
        event["type"] = DEFAULT_TYPE
    if event.get("specversion") is None:
        event["specversion"] = SPEC_VERSION
    if event.get("time") is None:
        event["time"] = _rfc3339(time.time() if now is None else now)
    event["topic"] = topic
    event["pubsubname"] = pubsub
    event["traceid"] = traceparent
    event["traceparent"] = traceparent
    event["tracestate"] = tracestate
    return event


def raw_envelope(
    raw: bytes, *, topic: str, pubsub: str, metadata: Mapping[str, str]
) -> dict[str, Any]:
    """The CloudEvent synthesised for a raw-payload subscription (dapr-api §3.6)."""
    envelope: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": _new_id(),
        "source": DEFAULT_SOURCE,
        "type": DEFAULT_TYPE,
        "datacontenttype": BINARY_CONTENT_TYPE,
        "data_base64": base64.b64encode(raw).decode("ascii"),
        "topic": topic,
        "pubsubname": pubsub,
    }
    traceid = metadata.get("traceid")
    if traceid is not None:
        envelope["traceid"] = traceid
    traceparent = metadata.get("traceparent")
    if traceparent is not None:
        envelope["traceparent"] = traceparent
        envelope["traceid"] = traceparent
    tracestate = metadata.get("tracestate")
    if tracestate is not None:
        envelope["tracestate"] = tracestate
    baggage = metadata.get("baggage")
    if baggage is not None:
        envelope["baggage"] = baggage
    return envelope


def apply_message_trace(envelope: dict[str, Any], metadata: Mapping[str, str]) -> None:
    """Fill trace fields a decoded CloudEvent lacks from the broker message metadata, like Dapr."""
    if "traceid" not in envelope and "traceid" in metadata:
        envelope["traceid"] = metadata["traceid"]
    if "traceparent" not in envelope and "traceparent" in metadata:
        envelope["traceparent"] = metadata["traceparent"]
        envelope["traceid"] = metadata["traceparent"]
    if "tracestate" not in envelope and "tracestate" in metadata:
        envelope["tracestate"] = metadata["tracestate"]
    if "baggage" not in envelope and "baggage" in metadata:
        envelope["baggage"] = metadata["baggage"]


# --- bulk publish --------------------------------------------------------------------------------

_MISMATCH = "mismatch between contentType and event"


def bulk_entry_bytes(event: Any, content_type: str) -> bytes:
    """The message bytes for one bulk-publish entry's JSON `event` (dapr-api §3.3)."""
    if is_binary_content_type(content_type):
        if not isinstance(event, str):
            raise CloudEventError(_MISMATCH)
        try:
            return _b64decode(event)
        except (binascii.Error, ValueError) as exc:
            raise CloudEventError(
                f"unable to decode base64 application/octet-stream data: {exc}"
            ) from exc
    if is_string_content_type(content_type):
        if not isinstance(event, str):
            raise CloudEventError(_MISMATCH)
        return _utf8(event)
    if is_json_content_type(content_type) or is_cloudevent_content_type(content_type):
        try:
            return _json_bytes(event)
        except (TypeError, ValueError) as exc:
            raise CloudEventError(f"{_MISMATCH}: {exc}") from exc
    raise CloudEventError(_MISMATCH)


# --- gRPC delivery -------------------------------------------------------------------------------


def _str_field(envelope: Mapping[str, Any], key: str) -> str:
    value = envelope.get(key)
    return value if isinstance(value, str) else ""


def topic_event_fields(
    envelope: Mapping[str, Any], *, topic: str | None = None, pubsub: str | None = None
) -> TopicEvent:
    """The `TopicEventRequest` fields for a CloudEvent (dapr-api §3.6, gRPC app).

    `topic` and `pubsub` default to the envelope's; Dapr sends the subscription's own, which
    differ for events forwarded from another topic. Raises CloudEventError where Dapr returns a
    retriable error: a non-string or undecodable `data_base64`, or non-string data under a
    string content type. Data under any other content type (or none) is sent empty, like Dapr.
    """
    content_type = _str_field(envelope, "datacontenttype")
    data = b""
    encoded = envelope.get("data_base64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise CloudEventError("unexpected data type encountered in envelope")
        try:
            data = _b64decode(encoded)
        except (binascii.Error, ValueError) as exc:
            raise CloudEventError(
                f"unable to base64 decode cloudEvent field data_base64: {exc}"
            ) from exc
    else:
        value = envelope.get("data")
        if value is not None:
            if is_string_content_type(content_type):
                if isinstance(value, str):
                    data = _utf8(value)
                elif isinstance(value, bytes | bytearray):
                    data = bytes(value)
                else:
                    raise CloudEventError("unexpected data type encountered in envelope")
            elif is_json_content_type(content_type) or is_cloudevent_content_type(content_type):
                try:
                    data = _json_bytes(value)
                except (TypeError, ValueError):
                    # Dapr ignores the marshalling error and sends no data.
                    data = b""
    return TopicEvent(
        id=_str_field(envelope, "id"),
        source=_str_field(envelope, "source"),
        type=_str_field(envelope, "type"),
        spec_version=_str_field(envelope, "specversion"),
        data_content_type=content_type,
        data=data,
        topic=_str_field(envelope, "topic") if topic is None else topic,
        pubsub_name=_str_field(envelope, "pubsubname") if pubsub is None else pubsub,
        extensions={k: v for k, v in envelope.items() if k not in _DEDICATED_FIELDS},
    )


# --- topic scoping -------------------------------------------------------------------------------


def _split_topics(value: str) -> frozenset[str]:
    # Empty names stay in on purpose: Dapr keeps them, so "app1=" scopes app1 to no real topic.
    return frozenset(value.split(","))


def _topic_list(value: str | None) -> frozenset[str]:
    # Dapr tests for emptiness before removing spaces, so a value of only spaces yields {""}.
    if not value:
        return frozenset()
    return _split_topics(value.replace(" ", ""))


def _app_scopes(value: str | None) -> dict[str, frozenset[str]]:
    scopes: dict[str, frozenset[str]] = {}
    if not value:
        return scopes
    for entry in value.replace(" ", "").split(";"):
        parts = entry.split("=")
        if len(parts) < 2:
            continue
        app = parts[0]
        scopes[app] = scopes.get(app, frozenset()) | _split_topics(parts[1])
    return scopes


class TopicScopes:
    """Which topics an app may publish or subscribe to under a pubsub component (dapr-api §3.9)."""

    __slots__ = ("_allowed", "_protected", "_publishing", "_subscription")

    def __init__(self, properties: Mapping[str, str]) -> None:
        # Component metadata names are case-insensitive.
        props = {k.lower(): v for k, v in properties.items()}
        self._publishing = _app_scopes(props.get("publishingscopes"))
        self._subscription = _app_scopes(props.get("subscriptionscopes"))
        self._allowed = _topic_list(props.get("allowedtopics"))
        self._protected = _topic_list(props.get("protectedtopics"))

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> TopicScopes:
        """The scopes of a pubsub component's metadata properties (same as the constructor)."""
        return cls(properties)

    @property
    def allowed_topics(self) -> frozenset[str]:
        return self._allowed

    @property
    def protected_topics(self) -> frozenset[str]:
        return self._protected

    def publishing_scope(self, app_id: str) -> frozenset[str]:
        return self._publishing.get(app_id, frozenset())

    def subscription_scope(self, app_id: str) -> frozenset[str]:
        return self._subscription.get(app_id, frozenset())

    def can_publish(self, app_id: str, topic: str) -> bool:
        return self._permits(topic, self._publishing.get(app_id))

    def can_subscribe(self, app_id: str, topic: str) -> bool:
        return self._permits(topic, self._subscription.get(app_id))

    def _permits(self, topic: str, scope: frozenset[str] | None) -> bool:
        if self._allowed and topic not in self._allowed:
            return False
        if not scope:
            # Without a scope list the app may use any topic that is not protected.
            return topic not in self._protected
        return topic in scope


# --- app responses -------------------------------------------------------------------------------


class _TypeMismatch(Exception):
    """A JSON value of the wrong type for the Go struct field Dapr decodes it into."""


def _go_string_field(pairs: _Pairs, name: str, current: str = "") -> str:
    """The value Go's json.Unmarshal leaves in a string field `name` (lower-case) of a struct.

    Keys match case-insensitively and the last one wins; null leaves the field unchanged;
    any other non-string value is a decoding error.
    """
    for key, value in pairs:
        if key == name or key.lower() == name:
            if value is None:
                continue
            if not isinstance(value, str):
                raise _TypeMismatch(name)
            current = value
    return current


def _parse_app_body(body: bytes) -> Any:
    """The first JSON value of an app's answer, objects as _Pairs; ValueError if there is none."""
    return _first_json(body.decode("utf-8", "replace"), _PAIRS_DECODER)


def delivery_result(http_status: int, body: bytes) -> Result:
    """Map an HTTP app's answer to one delivered event (dapr-api §3.6 table)."""
    if 200 <= http_status <= 299:
        if not body or body.isspace():
            # The common answer: nothing to check (and no exception to pay for).
            return Result.SUCCESS
        try:
            parsed = _parse_app_body(body)
            if not isinstance(parsed, _Pairs):
                # Go's decoder leaves the status empty for null and fails for other non-objects;
                # both count as success.
                return Result.SUCCESS
            status = _go_string_field(parsed, "status")
        except (ValueError, _TypeMismatch):
            # An empty or unparsable body skips the status check: success.
            return Result.SUCCESS
        if status in ("", "SUCCESS"):
            return Result.SUCCESS
        if status == "DROP":
            return Result.DROP
        # RETRY, and any unknown status (matching is case-sensitive).
        return Result.RETRY
    if http_status == 404:
        return Result.DROP
    return Result.RETRY


def _bulk_statuses(body: bytes) -> list[tuple[str, str]]:
    """The (entryId, status) answers of a bulk delivery; raises on anything Go fails to decode."""
    parsed = _parse_app_body(body)
    if parsed is None:
        return []
    if not isinstance(parsed, _Pairs):
        raise _TypeMismatch("body")
    statuses: Any = None
    for key, value in parsed:
        if key == "statuses" or key.lower() == "statuses":
            if value is None:
                continue
            if not isinstance(value, list) or isinstance(value, _Pairs):
                raise _TypeMismatch("statuses")
            statuses = value
    answers: list[tuple[str, str]] = []
    for item in statuses or ():
        if item is None:
            answers.append(("", ""))
            continue
        if not isinstance(item, _Pairs):
            raise _TypeMismatch("statuses[]")
        answers.append((_go_string_field(item, "entryid"), _go_string_field(item, "status")))
    return answers


def bulk_results(http_status: int, body: bytes, entry_ids: Iterable[str]) -> dict[str, Result]:
    """Map an HTTP app's answer to a bulk delivery to a result per entry id (dapr-api §3.7).

    2xx: each listed SUCCESS/DROP/RETRY applies; an empty or unknown status, an entry the app
    left out, or a body that does not decode means RETRY. 404 drops every entry; any other
    status retries every entry.
    """
    ids = list(entry_ids)
    if not 200 <= http_status <= 299:
        outcome = Result.DROP if http_status == 404 else Result.RETRY
        return dict.fromkeys(ids, outcome)
    results = dict.fromkeys(ids, Result.RETRY)
    try:
        answers = _bulk_statuses(body)
    except (ValueError, _TypeMismatch):
        return results
    for entry_id, status in answers:
        if entry_id not in results:
            # Dapr ignores answers for ids it did not send.
            continue
        if status == "SUCCESS":
            results[entry_id] = Result.SUCCESS
        elif status == "DROP":
            results[entry_id] = Result.DROP
        else:
            results[entry_id] = Result.RETRY
    return results


def grpc_result(status: int) -> Result:
    """Map a gRPC `TopicEventResponse.status` (SUCCESS=0, RETRY=1, DROP=2) to a Result."""
    if status == 0:
        return Result.SUCCESS
    if status == 2:
        return Result.DROP
    # RETRY and any status this version does not know.
    return Result.RETRY
