"""CloudEvent envelopes, bulk entries, gRPC fields, topic scoping and app-response rules."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from pillion.blocks.cloudevents import (
    CloudEventError,
    Result,
    TopicEvent,
    TopicScopes,
    apply_message_trace,
    bulk_entry_bytes,
    bulk_results,
    complete_envelope,
    decode,
    delivery_result,
    encode,
    grpc_result,
    is_binary_content_type,
    is_cloudevent_content_type,
    is_expired,
    is_json_content_type,
    is_string_content_type,
    new_envelope,
    raw_envelope,
    topic_event_fields,
)

NOW = datetime(2026, 11, 29, 15, 4, 5, 700000, tzinfo=UTC).timestamp()
STAMP = "2026-11-29T15:04:05Z"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP2 = "00-11111111111111111111111111111111-2222222222222222-01"


def env(data: bytes = b"hi", content_type: str | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "data": data,
        "content_type": content_type,
        "topic": "orders",
        "pubsub": "pubsub",
        "source": "app1",
        "traceparent": TP,
        "tracestate": "k=v",
        "now": NOW,
    }
    args.update(kw)
    return new_envelope(**args)


def is_uuid4(value: str) -> bool:
    return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value


# --- content types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("APPLICATION/JSON", True),
        ("application/json;charset=utf-8", True),
        ("application/json; charset=utf-8", True),
        ("application/json ;x", False),  # Dapr does not trim before ';'
        ("application/problem+json", False),
        ("application/jsonx", False),
        ("text/json", False),
        ("", False),
    ],
)
def test_json_content_type_is_an_exact_match(content_type: str, expected: bool) -> None:
    assert is_json_content_type(content_type) is expected


def test_other_content_type_predicates() -> None:
    assert is_binary_content_type("application/octet-stream")
    assert is_binary_content_type("Application/Octet-Stream; x=y")
    assert not is_binary_content_type("application/octet-streamx")
    assert is_cloudevent_content_type("application/cloudevents+json; charset=utf-8")
    assert not is_cloudevent_content_type("application/cloudevents-batch+json")
    for text in ("text/plain", "TEXT/html", "text/xml", "application/xml", "application/xml;x=1"):
        assert is_string_content_type(text)
    for other in ("application/json", "application/atom+xml", "", "application/octet-stream"):
        assert not is_string_content_type(other)


# --- new_envelope --------------------------------------------------------------------------------


def test_default_envelope_fields() -> None:
    e = env()
    assert is_uuid4(e.pop("id"))
    assert e == {
        "specversion": "1.0",
        "source": "app1",
        "type": "com.dapr.event.sent",
        "datacontenttype": "text/plain",
        "data": "hi",
        "topic": "orders",
        "pubsubname": "pubsub",
        "traceid": TP,
        "traceparent": TP,
        "tracestate": "k=v",
        "time": STAMP,
    }


def test_ids_are_fresh_and_time_is_rfc3339_utc_seconds() -> None:
    a = new_envelope(data=b"", content_type=None, topic="t", pubsub="p", source="s")
    b = new_envelope(data=b"", content_type=None, topic="t", pubsub="p", source="s")
    assert a["id"] != b["id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["time"])
    # Trace fields are always present, empty when there is no trace.
    assert a["traceid"] == a["traceparent"] == a["tracestate"] == ""


def test_time_cache_follows_the_clock() -> None:
    assert env(now=NOW)["time"] == STAMP
    assert env(now=NOW + 1)["time"] == "2026-11-29T15:04:06Z"
    assert env(now=NOW)["time"] == STAMP
    assert env(now=0.0)["time"] == "1970-01-01T00:00:00Z"


def test_empty_content_type_means_text_plain_and_a_string() -> None:
    # The Python SDK publishes JSON bytes without a content type over gRPC: they arrive as text.
    e = env(b'{"a": 1}', "")
    assert e["datacontenttype"] == "text/plain"
    assert e["data"] == '{"a": 1}'


@pytest.mark.parametrize(
    ("body", "content_type", "data"),
    [
        (b'{"n": 6, "s": "\xc3\xa9"}', "application/json", {"n": 6, "s": "é"}),
        (b'{"n": 6}', "application/json; charset=utf-8", {"n": 6}),
        (b'{"n": 6}', "Application/JSON", {"n": 6}),
        (b"[1, 2]", "application/json", [1, 2]),
        (b'"text"', "application/json", "text"),
        (b"42", "application/json", 42),
        (b"12345678901234567890123", "application/json", 12345678901234567890123),
        (b"null", "application/json", None),
        (b'  {"a": 1} trailing', "application/json", {"a": 1}),  # first value, like Go
        (b"{not json", "application/json", "{not json"),
        (b"", "application/json", ""),
        (b'{"a": NaN}', "application/json", '{"a": NaN}'),
        (b"1e999", "application/json", "1e999"),
        (b'{"n": 6}', "application/problem+json", '{"n": 6}'),
        (b'{"n": 6}', "application/json ;x", '{"n": 6}'),
    ],
)
def test_json_data(body: bytes, content_type: str, data: Any) -> None:
    e = env(body, content_type)
    assert e["datacontenttype"] == content_type
    assert e["data"] == data
    assert "data_base64" not in e


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/octet-stream;x"])
def test_binary_data_goes_to_data_base64(content_type: str) -> None:
    e = env(b"\x00\xff\x10", content_type)
    assert e["data_base64"] == base64.b64encode(b"\x00\xff\x10").decode()
    assert "data" not in e


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/html", "text/xml", "application/xml", "application/x-y"]
)
def test_other_content_types_embed_the_body_as_a_string(content_type: str) -> None:
    assert env(b"<a>\xc3\xa9</a>", content_type)["data"] == "<a>é</a>"


def test_invalid_utf8_is_replaced() -> None:
    assert env(b"a\xffb", "text/plain")["data"] == "a\ufffdb"
    assert env(b'"a\xffb"', "application/json")["data"] == "a\ufffdb"


def test_empty_source_is_dapr() -> None:
    assert env(source="")["source"] == "Dapr"


def test_ttl_sets_expiration() -> None:
    e = env(ttl_seconds=60)
    assert e["expiration"] == "2026-11-29T15:05:05Z"
    assert "expiration" not in env()
    assert not is_expired(e, now=NOW + 59)
    assert is_expired(e, now=NOW + 61)


def test_overrides_replace_envelope_fields() -> None:
    e = env(
        overrides={
            "id": "my-id",
            "source": "my-source",
            "type": "my.type",
            "subject": "my-subject",
            "tracestate": "a=b",
        }
    )
    assert (e["id"], e["source"], e["type"], e["subject"], e["tracestate"]) == (
        "my-id",
        "my-source",
        "my.type",
        "my-subject",
        "a=b",
    )
    assert e["traceid"] == e["traceparent"] == TP


def test_override_keys_are_case_insensitive() -> None:
    e = env(overrides={"ID": "x", "Source": "S", "TYPE": "T", "SubJect": "j", "TraceParent": TP2})
    assert (e["id"], e["source"], e["type"], e["subject"]) == ("x", "S", "T", "j")
    assert e["traceid"] == e["traceparent"] == TP2


@pytest.mark.parametrize(
    "key", ["data", "topic", "pubsubname", "datacontenttype", "specversion", "time", "data_base64"]
)
def test_forbidden_overrides_are_ignored(key: str) -> None:
    e = env(b'{"a": 1}', "application/json", overrides={key: "evil"})
    assert e["data"] == {"a": 1}
    assert (e["topic"], e["pubsubname"]) == ("orders", "pubsub")
    assert (e["datacontenttype"], e["specversion"], e["time"]) == ("application/json", "1.0", STAMP)
    assert "data_base64" not in e


def test_traceparent_override_moves_traceid_too() -> None:
    e = env(overrides={"traceparent": TP2})
    assert e["traceid"] == e["traceparent"] == TP2


def test_traceid_override_moves_both_trace_fields_like_dapr() -> None:
    e = env(overrides={"traceid": TP2})
    assert e["traceid"] == e["traceparent"] == TP2


@pytest.mark.parametrize(
    "overrides",
    [
        {"traceparent": TP2, "traceid": "other"},
        {"traceid": "other", "traceparent": TP2},
        {"TRACEID": "other", "traceParent": TP2},
    ],
)
def test_traceparent_override_wins_over_traceid(overrides: dict[str, str]) -> None:
    e = env(overrides=overrides)
    assert e["traceid"] == e["traceparent"] == TP2


def test_empty_overrides_fall_back_like_dapr() -> None:
    e = env(overrides={"id": "", "source": "", "type": "", "subject": "", "traceparent": ""})
    assert is_uuid4(e["id"])
    assert e["source"] == "Dapr"
    assert e["type"] == "com.dapr.event.sent"
    assert "subject" not in e
    assert e["traceparent"] == TP  # an empty traceparent override changes nothing
    assert env(overrides={"traceid": ""})["traceparent"] == ""


# --- complete_envelope ---------------------------------------------------------------------------


def complete(body: Any, **kw: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    args: dict[str, Any] = {
        "topic": "orders",
        "pubsub": "pubsub",
        "traceparent": TP,
        "tracestate": "k=v",
        "now": NOW,
    }
    args.update(kw)
    return complete_envelope(raw, **args)


def test_complete_envelope_keeps_the_publishers_fields() -> None:
    ce = {
        "id": "e1",
        "source": "mine",
        "type": "my.type",
        "specversion": "1.0",
        "time": "2020-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {"n": 1},
        "subject": "s",
        "myext": 5,
    }
    out = complete(ce)
    assert out == {
        **ce,
        "topic": "orders",
        "pubsubname": "pubsub",
        "traceid": TP,
        "traceparent": TP,
        "tracestate": "k=v",
    }


def test_complete_envelope_fills_missing_fields() -> None:
    out = complete({"data": "x"})
    assert is_uuid4(out["id"])
    assert out["source"] == "Dapr"
    assert out["type"] == "com.dapr.event.sent"
    assert out["specversion"] == "1.0"
    assert out["time"] == STAMP
    assert out["data"] == "x"
    # datacontenttype is left alone, as Dapr does.
    assert "datacontenttype" not in out


def test_complete_envelope_treats_null_as_missing() -> None:
    out = complete({"id": None, "source": None, "type": None, "specversion": None, "time": None})
    assert is_uuid4(out["id"])
    assert (out["source"], out["type"], out["specversion"], out["time"]) == (
        "Dapr",
        "com.dapr.event.sent",
        "1.0",
        STAMP,
    )


def test_complete_envelope_source_fallback_is_a_parameter() -> None:
    assert complete({}, source="app1")["source"] == "app1"
    assert complete({"source": "kept"}, source="app1")["source"] == "kept"


def test_complete_envelope_always_overwrites_routing_and_trace_fields() -> None:
    out = complete(
        {
            "topic": "evil",
            "pubsubname": "evil",
            "traceid": "x",
            "traceparent": "x",
            "tracestate": "x",
        },
        traceparent="",
        tracestate="",
    )
    assert (out["topic"], out["pubsubname"]) == ("orders", "pubsub")
    assert out["traceid"] == out["traceparent"] == out["tracestate"] == ""


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null", b"", b"{oops", b"  "])
def test_complete_envelope_rejects_non_objects(body: bytes) -> None:
    with pytest.raises(CloudEventError, match="not a JSON cloud event"):
        complete(body)


# --- encode / decode -----------------------------------------------------------------------------


def test_encode_is_compact_utf8() -> None:
    assert encode({"a": "é", "b": [1, {"c": None}]}) == '{"a":"é","b":[1,{"c":null}]}'.encode()


def test_encode_round_trips_an_envelope() -> None:
    e = env(b'{"n": 6}', "application/json")
    assert decode(encode(e)) == e


def test_encode_survives_lone_surrogates() -> None:
    out = encode({"a": "x\ud800"})
    assert json.loads(out) == {"a": "x\ud800"}


def test_encode_errors_are_cloud_event_errors() -> None:
    with pytest.raises(CloudEventError):
        encode({"a": object()})
    with pytest.raises(CloudEventError):
        encode({"a": float("nan")})


def test_decode_accepts_objects_only() -> None:
    assert decode(b' {"id": "1"} ') == {"id": "1"}
    assert decode(bytearray(b'{"id": "1"}')) == {"id": "1"}
    assert decode(b'{"a": "\xff"}') == {"a": "\ufffd"}
    for bad in (b"[1]", b'"s"', b"null", b"", b"{", b'{"a": 1} x', b'{"a": NaN}'):
        with pytest.raises(CloudEventError, match="not a JSON cloud event"):
            decode(bad)


# --- raw payloads --------------------------------------------------------------------------------


def test_raw_envelope_without_trace_metadata() -> None:
    e = raw_envelope(b"\x01raw", topic="orders", pubsub="pubsub", metadata={"other": "x"})
    assert is_uuid4(e.pop("id"))
    assert e == {
        "specversion": "1.0",
        "source": "Dapr",
        "type": "com.dapr.event.sent",
        "datacontenttype": "application/octet-stream",
        "data_base64": base64.b64encode(b"\x01raw").decode(),
        "topic": "orders",
        "pubsubname": "pubsub",
    }


def test_raw_envelope_takes_trace_fields_from_metadata() -> None:
    e = raw_envelope(
        b"",
        topic="t",
        pubsub="p",
        metadata={"traceid": "old", "traceparent": TP, "tracestate": "k=v", "baggage": "b=1"},
    )
    assert e["traceid"] == e["traceparent"] == TP
    assert (e["tracestate"], e["baggage"]) == ("k=v", "b=1")
    only_id = raw_envelope(b"", topic="t", pubsub="p", metadata={"traceid": TP2})
    assert only_id["traceid"] == TP2
    assert "traceparent" not in only_id


def test_apply_message_trace_fills_only_missing_fields() -> None:
    ce: dict[str, Any] = {"id": "1", "tracestate": "kept"}
    apply_message_trace(ce, {"traceparent": TP, "tracestate": "x", "baggage": "b=1"})
    assert ce == {
        "id": "1",
        "tracestate": "kept",
        "traceparent": TP,
        "traceid": TP,
        "baggage": "b=1",
    }
    present = {"traceparent": TP2, "traceid": TP2}
    apply_message_trace(present, {"traceparent": TP, "traceid": TP})
    assert present == {"traceparent": TP2, "traceid": TP2}


# --- expiration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expiration", "expired"),
    [
        ("2026-11-29T15:04:05Z", True),
        ("2026-11-29T15:04:06Z", False),
        ("2026-11-29T15:04:05.5Z", True),
        ("2026-11-29T16:04:06+01:00", False),
        ("2026-11-29T14:04:06-02:00", False),
        ("2026-11-29T13:04:04-02:00", True),
        ("2026-11-29t15:04:05Z", False),  # Go wants an upper-case T and Z
        ("2026-11-29T15:04:05z", False),
        ("2026-11-29T15:04:05", False),  # no zone: not RFC 3339, ignored
        ("2026-11-29", False),
        ("2026-11-29 15:04:05Z", False),
        ("yesterday", False),
        ("", False),
    ],
)
def test_is_expired(expiration: str, expired: bool) -> None:
    assert is_expired({"expiration": expiration}, now=NOW) is expired


def test_is_expired_without_or_with_odd_expiration() -> None:
    assert not is_expired({}, now=NOW)
    assert not is_expired({"expiration": None}, now=NOW)
    assert not is_expired({"expiration": 12}, now=NOW)
    assert is_expired({"expiration": "2000-01-01T00:00:00Z"})  # default clock


# --- bulk publish entries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "content_type", "expected"),
    [
        (base64.b64encode(b"\x00\x01").decode(), "application/octet-stream", b"\x00\x01"),
        ("AAE=\n", "application/octet-stream", b"\x00\x01"),  # Go skips line breaks
        ("hello", "text/plain", b"hello"),
        ("é", "text/plain; charset=utf-8", "é".encode()),
        ("<a/>", "application/xml", b"<a/>"),
        ({"a": [1, "é"]}, "application/json", '{"a":[1,"é"]}'.encode()),
        ("s", "application/json", b'"s"'),
        (None, "application/json", b"null"),
        ({"id": "1"}, "application/cloudevents+json", b'{"id":"1"}'),
    ],
)
def test_bulk_entry_bytes(event: Any, content_type: str, expected: bytes) -> None:
    assert bulk_entry_bytes(event, content_type) == expected


@pytest.mark.parametrize(
    ("event", "content_type", "message"),
    [
        ({"a": 1}, "application/octet-stream", "mismatch"),
        ("not base64!", "application/octet-stream", "base64"),
        ("AAE", "application/octet-stream", "base64"),  # padding is required
        ({"a": 1}, "text/plain", "mismatch"),
        (5, "application/xml", "mismatch"),
        ("x", "application/x-custom", "mismatch"),
        ("x", "", "mismatch"),
        ("x", "application/problem+json", "mismatch"),
    ],
)
def test_bulk_entry_bytes_errors(event: Any, content_type: str, message: str) -> None:
    with pytest.raises(CloudEventError, match=message):
        bulk_entry_bytes(event, content_type)


# --- gRPC TopicEventRequest fields ---------------------------------------------------------------


def test_topic_event_fields_for_json_data() -> None:
    e = env(
        '{"n": 6, "s": "é"}'.encode(), "application/json", ttl_seconds=5, overrides={"subject": "s"}
    )
    te = topic_event_fields(e)
    assert isinstance(te, TopicEvent)
    assert (te.id, te.source, te.type, te.spec_version) == (e["id"], "app1", e["type"], "1.0")
    assert te.data_content_type == "application/json"
    assert json.loads(te.data) == {"n": 6, "s": "é"}
    assert te.data == '{"n":6,"s":"é"}'.encode()
    assert (te.topic, te.pubsub_name) == ("orders", "pubsub")
    assert te.extensions == {
        "topic": "orders",
        "pubsubname": "pubsub",
        "traceid": TP,
        "traceparent": TP,
        "tracestate": "k=v",
        "time": STAMP,
        "expiration": "2026-11-29T15:04:10Z",
        "subject": "s",
    }


def test_topic_event_fields_for_text_and_binary() -> None:
    assert topic_event_fields(env(b"h\xc3\xa9", "text/plain")).data == "hé".encode()
    assert topic_event_fields(env(b"<a/>", "application/xml")).data == b"<a/>"
    binary = topic_event_fields(env(b"\x00\xff", "application/octet-stream"))
    assert binary.data == b"\x00\xff"
    assert binary.data_content_type == "application/octet-stream"
    assert "data_base64" not in binary.extensions


def test_topic_event_fields_json_scalar_and_cloudevent_content_type() -> None:
    assert topic_event_fields(env(b"not json", "application/json")).data == b'"not json"'
    ce = {"datacontenttype": "application/cloudevents+json", "data": {"a": 1}}
    assert topic_event_fields(ce).data == b'{"a":1}'


def test_topic_event_fields_sends_no_data_for_other_content_types() -> None:
    # Like Dapr: data with no content type, or one that is neither string nor JSON, is dropped.
    assert topic_event_fields({"data": {"a": 1}}).data == b""
    assert topic_event_fields({"datacontenttype": "application/x-y", "data": "s"}).data == b""
    assert topic_event_fields({"datacontenttype": "text/plain", "data": None}).data == b""


def test_topic_event_fields_errors() -> None:
    with pytest.raises(CloudEventError, match="unexpected data type"):
        topic_event_fields({"datacontenttype": "text/plain", "data": {"a": 1}})
    with pytest.raises(CloudEventError, match="unexpected data type"):
        topic_event_fields({"data_base64": 5})
    with pytest.raises(CloudEventError, match="data_base64"):
        topic_event_fields({"data_base64": "not base64!"})


def test_topic_event_fields_odd_envelopes() -> None:
    te = topic_event_fields(
        {"id": 5, "data_base64": None, "data": "x", "datacontenttype": "text/a"}
    )
    assert te.id == ""
    assert te.data == b"x"
    assert te.spec_version == te.source == te.type == te.topic == te.pubsub_name == ""
    assert te.extensions == {}


def test_topic_event_fields_topic_and_pubsub_overrides() -> None:
    te = topic_event_fields(env(), topic="dlq", pubsub="other")
    assert (te.topic, te.pubsub_name) == ("dlq", "other")
    assert te.extensions["topic"] == "orders"


# --- topic scoping -------------------------------------------------------------------------------


def test_no_scoping_allows_everything() -> None:
    s = TopicScopes({})
    assert s.can_publish("app1", "t") and s.can_subscribe("app1", "t")
    assert s.allowed_topics == s.protected_topics == frozenset()


def test_allowed_topics_deny_every_other_topic() -> None:
    s = TopicScopes({"allowedTopics": "t1, t2", "publishingScopes": "app1=t3"})
    assert s.can_publish("app2", "t1") and s.can_subscribe("app2", "t2")
    assert not s.can_publish("app2", "t3") and not s.can_subscribe("app2", "t3")
    # Even an app whose own scope lists it cannot use a topic outside allowedTopics.
    assert not s.can_publish("app1", "t3")
    # An app with a scope list is still limited to it within allowedTopics.
    assert not s.can_publish("app1", "t1")


def test_publishing_scopes_limit_listed_apps_only() -> None:
    s = TopicScopes({"publishingScopes": "app1=t1,t2;app2=t3"})
    assert s.can_publish("app1", "t1") and s.can_publish("app1", "t2")
    assert not s.can_publish("app1", "t3")
    assert s.can_publish("app2", "t3") and not s.can_publish("app2", "t1")
    assert s.can_publish("app3", "anything")
    # Publishing scopes do not limit subscriptions.
    assert s.can_subscribe("app1", "t3")
    assert s.publishing_scope("app1") == {"t1", "t2"}
    assert s.subscription_scope("app1") == frozenset()


def test_subscription_scopes_limit_subscriptions_only() -> None:
    s = TopicScopes({"subscriptionScopes": "app1=t1"})
    assert s.can_subscribe("app1", "t1") and not s.can_subscribe("app1", "t2")
    assert s.can_subscribe("app2", "t2")
    assert s.can_publish("app1", "t2")


def test_protected_topics_need_an_explicit_scope() -> None:
    s = TopicScopes(
        {"protectedTopics": "secret", "publishingScopes": "app1=secret", "subscriptionScopes": ""}
    )
    assert s.can_publish("app1", "secret")
    assert not s.can_publish("app2", "secret")
    assert not s.can_subscribe("app1", "secret")
    assert s.can_publish("app2", "public") and s.can_subscribe("app2", "public")
    assert s.protected_topics == {"secret"}


def test_scope_parsing_strips_spaces_and_matches_apps_exactly() -> None:
    s = TopicScopes({"publishingScopes": " app1 = t1 , t2 ; app10=t9"})
    assert s.can_publish("app1", "t1") and s.can_publish("app1", "t2")
    assert not s.can_publish("app1", "t9")
    assert s.can_publish("App1", "t9")  # app ids are case-sensitive: no scope for "App1"
    assert s.can_publish("app", "t9")


def test_scope_entries_accumulate_and_odd_entries_are_skipped() -> None:
    s = TopicScopes({"publishingScopes": "app1=t1;junk;;app1=t2;app2=a=b"})
    assert s.publishing_scope("app1") == {"t1", "t2"}
    assert s.publishing_scope("app2") == {"a"}


def test_empty_scope_denies_every_topic() -> None:
    # "app1=" gives app1 a scope holding only the empty name, as in Dapr.
    s = TopicScopes({"publishingScopes": "app1="})
    assert not s.can_publish("app1", "t1")
    assert s.can_publish("app2", "t1")


def test_scoping_property_names_are_case_insensitive() -> None:
    s = TopicScopes({"ALLOWEDTOPICS": "t1", "PublishingScopes": "app1=t1", "protectedtopics": "t1"})
    assert s.can_publish("app1", "t1")
    assert not s.can_publish("app2", "t1")
    assert not s.can_publish("app1", "t2")


def test_allowed_topics_of_only_spaces_deny_everything_like_dapr() -> None:
    s = TopicScopes({"allowedTopics": "  "})
    assert s.allowed_topics == {""}
    assert not s.can_publish("app1", "t1")


# --- app response: one event ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "result"),
    [
        (200, b"", Result.SUCCESS),
        (204, b"", Result.SUCCESS),
        (200, b"   \n", Result.SUCCESS),
        (200, b"ok", Result.SUCCESS),
        (200, b"{broken", Result.SUCCESS),
        (200, b"{}", Result.SUCCESS),
        (200, b'{"other": 1}', Result.SUCCESS),
        (200, b'{"status": "SUCCESS"}', Result.SUCCESS),
        (200, b'{"status": ""}', Result.SUCCESS),
        (200, b'{"status": null}', Result.SUCCESS),
        (200, b'{"status": 1}', Result.SUCCESS),  # Go fails to decode: status check skipped
        (200, b"null", Result.SUCCESS),
        (200, b'["RETRY"]', Result.SUCCESS),
        (200, b'"RETRY"', Result.SUCCESS),
        (200, b'{"status": "RETRY"}', Result.RETRY),
        (202, b'{"status": "DROP"}', Result.DROP),
        (299, b'{"status": "DROP"}', Result.DROP),
        (200, b'{"status": "success"}', Result.RETRY),  # case-sensitive
        (200, b'{"status": "Drop"}', Result.RETRY),
        (200, b'{"status": "IGNORE"}', Result.RETRY),
        (200, b'{"Status": "DROP"}', Result.DROP),  # Go matches field names case-insensitively
        (200, b'{"status": "DROP", "STATUS": "RETRY"}', Result.RETRY),  # last key wins
        (200, b'{"status": "RETRY"} trailing', Result.RETRY),
        (200, b'{"status": "RETRY", "x": NaN}', Result.SUCCESS),
        (404, b"", Result.DROP),
        (404, b'{"status": "SUCCESS"}', Result.DROP),
        (500, b"", Result.RETRY),
        (500, b'{"status": "SUCCESS"}', Result.RETRY),
        (400, b"", Result.RETRY),
        (503, b"", Result.RETRY),
        (300, b"", Result.RETRY),
        (199, b"", Result.RETRY),
    ],
)
def test_delivery_result(status: int, body: bytes, result: Result) -> None:
    assert delivery_result(status, body) is result


def test_result_values_are_dapr_strings() -> None:
    assert [str(r) for r in Result] == ["SUCCESS", "RETRY", "DROP"]


@pytest.mark.parametrize(
    ("code", "result"),
    [(0, Result.SUCCESS), (1, Result.RETRY), (2, Result.DROP), (7, Result.RETRY)],
)
def test_grpc_result(code: int, result: Result) -> None:
    assert grpc_result(code) is result


# --- app response: bulk --------------------------------------------------------------------------

IDS = ["a", "b", "c"]


def bulk(statuses: Any, http_status: int = 200) -> dict[str, Result]:
    body = statuses if isinstance(statuses, bytes) else json.dumps(statuses).encode()
    return bulk_results(http_status, body, IDS)


def test_bulk_all_success() -> None:
    answer = {"statuses": [{"entryId": i, "status": "SUCCESS"} for i in IDS]}
    assert bulk(answer) == dict.fromkeys(IDS, Result.SUCCESS)


def test_bulk_mixed_and_missing_entries() -> None:
    answer = {
        "statuses": [
            {"entryId": "a", "status": "DROP"},
            {"entryId": "b", "status": "RETRY"},
            {"entryId": "zzz", "status": "SUCCESS"},  # unknown ids are ignored
        ]
    }
    assert bulk(answer) == {"a": Result.DROP, "b": Result.RETRY, "c": Result.RETRY}


@pytest.mark.parametrize("status", ["", None, "success", "OTHER"])
def test_bulk_empty_or_unknown_status_retries(status: str | None) -> None:
    answer = {
        "statuses": [{"entryId": "a", "status": status}, {"entryId": "b", "status": "SUCCESS"}]
    }
    assert bulk(answer) == {"a": Result.RETRY, "b": Result.SUCCESS, "c": Result.RETRY}


def test_bulk_field_names_match_case_insensitively() -> None:
    answer = {"Statuses": [{"EntryID": "a", "STATUS": "SUCCESS"}]}
    assert bulk(answer)["a"] is Result.SUCCESS


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"x"',
        b"null",
        b"{}",
        b'{"statuses": null}',
        b'{"statuses": {"entryId": "a"}}',
        b'{"statuses": [1]}',
        b'{"statuses": [{"entryId": 1, "status": "SUCCESS"}]}',
        b'{"statuses": [{"entryId": "a", "status": 0}]}',
        b'{"statuses": [null]}',
    ],
)
def test_bulk_unusable_body_retries_everything(body: bytes) -> None:
    assert bulk(body) == dict.fromkeys(IDS, Result.RETRY)


def test_bulk_type_error_anywhere_fails_the_whole_answer() -> None:
    # Go's decoder reports the bad entry after filling the good one; Dapr then retries all.
    body = b'{"statuses": [{"entryId": "a", "status": "SUCCESS"}, {"entryId": "b", "status": 1}]}'
    assert bulk(body) == dict.fromkeys(IDS, Result.RETRY)


@pytest.mark.parametrize(("status", "result"), [(404, Result.DROP), (500, Result.RETRY)])
def test_bulk_non_2xx(status: int, result: Result) -> None:
    answer = {"statuses": [{"entryId": i, "status": "SUCCESS"} for i in IDS]}
    assert bulk(answer, status) == dict.fromkeys(IDS, result)


def test_bulk_without_entries() -> None:
    assert bulk_results(200, b"", []) == {}


def test_from_properties_accepts_any_mapping() -> None:
    class Props(dict[str, str]):
        pass

    s = TopicScopes.from_properties(Props(publishingScopes="app1=t1"))
    assert s.can_publish("app1", "t1") and not s.can_publish("app1", "t2")
