"""Subscription routes: rule order, defaults, CEL over the CloudEvent, and Dapr's error rules."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from pillion.blocks.cloudevents import new_envelope
from pillion.blocks.routing import RouteError, RouteEvalError, Routes


def event(data: Any = None, **fields: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"id": "1", "type": "com.dapr.event.sent", "source": "app", **fields}
    if data is not None:
        ev["data"] = data
    return ev


def route(match: str, ev: dict[str, Any]) -> bool:
    """Whether a single rule with this expression matches the event."""
    return Routes([(match, "/yes")], default="/no").select(ev) == "/yes"


# --- without CEL ---------------------------------------------------------------------------------


def test_no_rules_and_no_default_is_no_route() -> None:
    assert Routes().select(event()) is None
    assert Routes([]).select(event()) is None


def test_default_only() -> None:
    assert Routes(default="/orders").select(event()) == "/orders"


def test_paths_get_a_leading_slash() -> None:
    routes = Routes([("", "a"), ("event.type == 'x'", "/b")], default="c")
    assert routes.rules == (("", "/a"), ("event.type == 'x'", "/b"))
    assert routes.default == "/c"
    assert Routes(default="").default == "/"


def test_grpc_paths_stay_verbatim() -> None:
    routes = Routes([("", "on_order")], default="", leading_slash=False)
    assert routes.rules == (("", "on_order"),)
    assert routes.default == ""
    assert Routes(default="", leading_slash=False).select(event()) == ""


def test_blank_match_always_matches() -> None:
    assert Routes([("", "/a"), ("true", "/b")], default="/c").select(event()) == "/a"
    assert Routes([("   ", "/a")]).select(event()) == "/a"


def test_empty_rules_do_not_import_celpy() -> None:
    # Start-up time matters: a sidecar whose subscriptions have no CEL never loads celpy.
    code = (
        "import sys\n"
        "from pillion.blocks.routing import Routes\n"
        "r = Routes([('', 'a'), (' ', 'b')], default='/d')\n"
        "assert r.select({'type': 'x'}) == '/a'\n"
        "assert Routes().select({}) is None\n"
        "assert 'celpy' not in sys.modules, 'celpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# --- rule order and defaults ---------------------------------------------------------------------


def test_first_true_rule_wins() -> None:
    routes = Routes(
        [
            ('event.type == "widget"', "/widgets"),
            ('event.type.startsWith("wid")', "/wid"),
            ('event.type == "gadget"', "/gadgets"),
        ],
        default="/products",
    )
    assert routes.select(event(type="widget")) == "/widgets"
    assert routes.select(event(type="widgetish")) == "/wid"
    assert routes.select(event(type="gadget")) == "/gadgets"
    assert routes.select(event(type="other")) == "/products"


def test_no_match_without_default_is_no_route() -> None:
    assert Routes([('event.type == "x"', "/x")]).select(event(type="y")) is None


def test_rules_see_a_real_envelope() -> None:
    envelope = new_envelope(
        data=b'{"n": 6, "kind": "big"}',
        content_type="application/json",
        topic="orders",
        pubsub="pubsub",
        source="checkout",
    )
    routes = Routes(
        [
            ('event.type == "x" && event.data.n > 5', "/x"),
            ('event.topic == "orders" && event.data.n > 5 && event.source == "checkout"', "/big"),
        ],
        default="/other",
    )
    assert routes.select(envelope) == "/big"


# --- CEL expressions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ev", "expected"),
    [
        (event({"n": 6}, type="x"), True),
        (event({"n": 6.5}, type="x"), True),
        (event({"n": 5}, type="x"), False),
        (event({"n": 6}, type="y"), False),
        # The && short-circuits on false, so a text body (no `.n`) is simply no match.
        (event("plain text", type="y"), False),
    ],
)
def test_type_and_data_field(ev: dict[str, Any], expected: bool) -> None:
    assert route('event.type == "x" && event.data.n > 5', ev) is expected


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ('event.type.startsWith("order")', True),
        ('event.type.startsWith("Order")', False),
        ('event.type.endsWith(".created")', True),
        ('event.type.contains("der.cre")', True),
        ('event.type.matches("^order\\\\.[a-z]+$")', True),
        ("size(event.type) == 13", True),
        ('event["type"] == "order.created"', True),
        ('event.type in ["order.created", "order.deleted"]', True),
        ('event.source != "app"', False),
    ],
)
def test_string_functions(match: str, expected: bool) -> None:
    assert route(match, event(type="order.created")) is expected


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        # JSON numbers are doubles (as in Dapr) and compare with int and double literals alike.
        ("event.data.n == 6", True),
        ("event.data.n == 6.0", True),
        ("event.data.n != 6", False),
        ("event.data.n > 5.5", True),
        ("event.data.n >= 6", True),
        ("event.data.n <= 6", True),
        ("event.data.n < 6", False),
        ("5 < event.data.n", True),
        ("6 == event.data.n", True),
        ("event.data.n > 5u", True),
        ("6 in event.data.list", True),
        ("7 in event.data.list", False),
        ("event.data.list.exists(x, x == 8)", True),
        ("event.data.list.all(x, x > 1)", True),
        ("size(event.data.list) == 3", True),
        ("int(event.data.n) % 2 == 0", True),
        ("event.data.big > 1000000000000", True),
        ("event.data.ok", True),
        ("event.data.ok == true && !event.data.no", True),
        ("event.data.nothing == null", True),
        ('event.data.nested.deep.name == "x"', True),
        ("has(event.data.n)", True),
        ("has(event.data.missing)", False),
        ("has(event.data.missing) && event.data.missing > 1", False),
        ('has(event.subject) ? event.subject == "s" : true', True),
    ],
)
def test_json_data_values(match: str, expected: bool) -> None:
    data = {
        "n": 6,
        "list": [2.0, 6, 8],
        "big": 12345678901234567890,
        "ok": True,
        "no": False,
        "nothing": None,
        "nested": {"deep": {"name": "x"}},
    }
    assert route(match, event(data)) is expected


def test_non_json_values_in_the_event() -> None:
    ev = event(b"\x00\x01", blob=b"ab", when=object())
    assert route("event.data == b'\\x00\\x01'", ev)
    assert route("event.blob == b'ab'", ev)
    assert route("event.when.startsWith('<object')", ev)


def test_huge_numbers_do_not_break_conversion() -> None:
    assert route("event.data.n > 1.0", event({"n": 10**400}))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "match", ["event.type ==", 'event.type == "x" &&& 1', '"unterminated', "("]
)
def test_bad_expression_is_reported_at_load(match: str) -> None:
    with pytest.raises(RouteError) as info:
        Routes([('event.type == "ok"', "/ok"), (match, "/bad")])
    assert not isinstance(info.value, RouteEvalError)
    assert repr(match) in str(info.value)
    assert "^" in str(info.value)  # the parser's pointer at the offending character


def test_bad_expression_is_trimmed_in_the_message() -> None:
    with pytest.raises(RouteError, match=re.escape("'event.type =='")):
        Routes([("  event.type ==  ", "/x")])


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("event.data.n > 5", "no such member"),  # missing field
        ("event.nope == 1", "no such member"),
        ("undeclared == 1", "undeclared reference to 'undeclared'"),
        ('event.type + 1 == "x"', "no matching overload"),
        ("event.data.n / 0 > 1", "evaluating"),
    ],
)
def test_evaluation_errors_fail_the_delivery_like_dapr(match: str, message: str) -> None:
    # Dapr does not treat an erroring rule as false: it stops and fails the delivery (DLQ or
    # retry), so neither later rules nor the default are tried.
    routes = Routes([(match, "/a"), ("true", "/b")], default="/c")
    with pytest.raises(RouteEvalError, match=message) as info:
        routes.select(event({}, type="x"))
    assert repr(match) in str(info.value)
    assert len(str(info.value)) < 500  # celpy's activation dump is cut off
    assert isinstance(info.value, RouteError)


@pytest.mark.parametrize("match", ["1", '"yes"', "event.type", "null", "[true]"])
def test_non_boolean_result_fails_like_dapr(match: str) -> None:
    with pytest.raises(RouteEvalError, match="was not a boolean"):
        Routes([(match, "/a")], default="/b").select(event(type="x"))


def test_error_in_an_untaken_branch_is_ignored() -> None:
    # CEL's && and || absorb errors when the other side decides the result.
    assert route('event.type == "y" && event.data.n > 5', event({}, type="x")) is False
    assert route("event.data.missing > 1 || true", event({})) is True


def test_repr() -> None:
    assert repr(Routes([("", "a")], default="b")) == "Routes([('', '/a')], default='/b')"
