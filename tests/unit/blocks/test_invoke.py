"""InvokeBlock rules: target parsing, header rules, local vs remote delivery and retry policy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pillion.blocks.invoke import (
    CallFailed,
    InvokeBlock,
    InvokeRequest,
    InvokeResponse,
    Unreachable,
    clean_method,
    response_headers,
    split_app_id,
)
from pillion.errors import GrpcCode, PillionError, bad_request
from tests.unit.blocks.fakes import Addr, FakeApp, FakeLink, FakeResolver, ok

NO_APP_ID = "failed getting app id either from the URL path or the header dapr-app-id"


def make(
    *,
    app: FakeApp | None = None,
    resolver: FakeResolver | None = None,
    link: FakeLink | None = None,
    namespace: str = "",
    own_address: str = "",
) -> InvokeBlock:
    return InvokeBlock(
        "me",
        namespace,
        FakeResolver() if resolver is None else resolver,
        FakeLink() if link is None else link,
        app,
        own_address=own_address,
    )


def req(
    app_id: str = "other",
    method: str = "orders/1",
    *,
    verb: str = "POST",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"payload",
    peer: str = "10.0.0.5",
) -> InvokeRequest:
    return InvokeRequest(app_id, method, verb, query, headers or [], body, peer)


def invoke(b: InvokeBlock, r: InvokeRequest) -> InvokeResponse:
    return asyncio.run(b.invoke(r))


def invoke_error(b: InvokeBlock, r: InvokeRequest) -> PillionError:
    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await b.invoke(r)
        return info.value

    return asyncio.run(go())


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k for k, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


# --- target parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("app", ("app", "")), ("app.ns", ("app", "ns")), ("my-app.prod-1", ("my-app", "prod-1"))],
)
def test_split_app_id(raw: str, expected: tuple[str, str]) -> None:
    assert split_app_id(raw) == expected


def test_split_app_id_more_than_one_dot() -> None:
    with pytest.raises(PillionError) as info:
        split_app_id("a.b.c")
    assert info.value.code == "ERR_DIRECT_INVOKE"
    assert "invalid app id a.b.c" in info.value.message


def test_split_app_id_more_than_one_dot_matches_dapr() -> None:
    with pytest.raises(PillionError) as info:
        split_app_id("a.b.c")
    err = info.value
    assert (err.http_status, err.grpc_code) == (500, GrpcCode.INTERNAL)
    assert err.message == "failed to invoke, id: a.b.c, err: invalid app id a.b.c"


@pytest.mark.parametrize("raw", ["", ".ns"])
def test_split_app_id_empty(raw: str) -> None:
    with pytest.raises(PillionError) as info:
        split_app_id(raw)
    assert (info.value.code, info.value.http_status, info.value.grpc_code) == (
        "ERR_DIRECT_INVOKE",
        404,
        GrpcCode.NOT_FOUND,
    )
    assert info.value.message == NO_APP_ID


@pytest.mark.parametrize(
    ("method", "cleaned"),
    [
        ("", ""),
        ("orders", "orders"),
        ("a/b", "a/b"),
        ("a//b", "a/b"),
        ("a/./b", "a/b"),
        ("a/b/../c", "a/c"),
        ("../../x", "x"),
        ("a/b/", "a/b"),
        ("/a", "a"),
        ("//a", "a"),
        ("a%2F..%2Fb", "a%2F..%2Fb"),  # percent-encoding is not decoded, so not cleaned
        ("..", ""),
    ],
)
def test_clean_method_is_go_path_clean(method: str, cleaned: str) -> None:
    assert clean_method(method) == cleaned


# --- local delivery ---------------------------------------------------------------------------


def test_self_invocation_goes_to_the_app_channel() -> None:
    app, resolver, link = FakeApp(), FakeResolver(), FakeLink()
    b = make(app=app, resolver=resolver, link=link)
    resp = invoke(b, req("me", "a//b/../c", verb="PUT", query=b"x=1&y=2", body=b"B"))
    assert resp.body == b"local"
    (call,) = app.calls
    assert (call.verb, call.target, call.body) == ("PUT", b"/a/c?x=1&y=2", b"B")
    assert resolver.resolved == [] and link.calls == []


def test_self_invocation_with_own_namespace_is_local() -> None:
    app, link = FakeApp(), FakeLink()
    invoke(make(app=app, link=link, namespace="prod"), req("me.prod"))
    assert len(app.calls) == 1 and link.calls == []


def test_same_app_id_in_another_namespace_is_remote() -> None:
    app, resolver, link = FakeApp(), FakeResolver(known={"me"}), FakeLink()
    invoke(make(app=app, resolver=resolver, link=link, namespace="prod"), req("me.test"))
    assert app.calls == []
    assert resolver.resolved == [("me", "test")]
    assert len(link.calls) == 1


def test_no_query_means_no_question_mark() -> None:
    app = FakeApp()
    invoke(make(app=app), req("me", "m"))
    assert app.calls[0].target == b"/m"


def test_self_invocation_without_app_channel_is_500() -> None:
    err = invoke_error(make(app=None), req("me"))
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert err.message.startswith("failed to invoke, id: me, err: app channel is not initialized")


def test_app_channel_connect_failure_is_500() -> None:
    err = invoke_error(make(app=FakeApp([Unreachable("refused")])), req("me"))
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert err.message == "failed to invoke, id: me, err: refused"


def test_app_channel_pillion_error_passes_through() -> None:
    own = bad_request("app is not in a healthy state")
    err = invoke_error(make(app=FakeApp([own])), req("me"))
    assert err is own


def test_app_response_is_returned_verbatim() -> None:
    answer = InvokeResponse(418, b"I'm a teapot", [(b"x-a", b"1")], b"short and stout")
    assert invoke(make(app=FakeApp([answer])), req("me")) is answer


# --- remote delivery --------------------------------------------------------------------------


def test_remote_goes_resolver_then_link() -> None:
    resolver, link, app = FakeResolver(), FakeLink(), FakeApp()
    resp = invoke(
        make(resolver=resolver, link=link, app=app),
        req("other", "v1/x", verb="DELETE", query=b"q=1", body=b"data"),
    )
    assert resp.body == b"remote"
    assert resolver.resolved == [("other", "")]
    (call,) = link.calls
    assert call.addr == Addr("127.0.0.1", 9001)
    assert (call.verb, call.target, call.body) == ("DELETE", b"/v1/x?q=1", b"data")
    assert app.calls == []


def test_remote_uses_the_callers_namespace_by_default() -> None:
    resolver = FakeResolver()
    invoke(make(resolver=resolver, namespace="prod"), req("other"))
    assert resolver.resolved == [("other", "prod")]


def test_unreachable_invalidates_and_retries_exactly_once() -> None:
    resolver = FakeResolver()
    link = FakeLink([Unreachable("connect refused")])
    resp = invoke(make(resolver=resolver, link=link), req("other.ns"))
    assert resp.body == b"remote"
    assert resolver.invalidated == [("other", "ns")]
    assert resolver.resolved == [("other", "ns"), ("other", "ns")]
    # The retry goes to the freshly resolved address.
    assert [c.addr.port for c in link.calls] == [9001, 9002]


def test_unreachable_twice_fails_after_two_tries() -> None:
    resolver = FakeResolver()
    link = FakeLink([Unreachable("first"), Unreachable("second"), ok()])
    err = invoke_error(make(resolver=resolver, link=link), req("other"))
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert err.message == "failed to invoke, id: other, err: second"
    assert len(link.calls) == 2
    assert resolver.invalidated == [("other", "")]


def test_unreachable_then_call_failed_is_not_retried_again() -> None:
    link = FakeLink([Unreachable("first"), CallFailed("reset"), ok()])
    err = invoke_error(make(link=link), req("other"))
    assert err.message == "failed to invoke, id: other, err: reset"
    assert len(link.calls) == 2


def test_call_failed_is_never_retried() -> None:
    resolver = FakeResolver()
    link = FakeLink([CallFailed("peer reset the connection"), ok()])
    err = invoke_error(make(resolver=resolver, link=link), req("other"))
    assert (err.code, err.http_status, err.grpc_code) == (
        "ERR_DIRECT_INVOKE",
        500,
        GrpcCode.INTERNAL,
    )
    assert err.message == "failed to invoke, id: other, err: peer reset the connection"
    assert len(link.calls) == 1
    assert resolver.invalidated == []
    assert resolver.resolved == [("other", "")]


def test_unknown_app_is_500_naming_the_app() -> None:
    link = FakeLink()
    err = invoke_error(make(resolver=FakeResolver(known=set()), link=link), req("ghost.ns"))
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert err.message == "failed to invoke, id: ghost.ns, err: couldn't find service: ghost.ns"
    assert link.calls == []


def test_app_vanishing_between_retries_is_500() -> None:
    class Vanishing(FakeResolver):
        async def resolve(self, app_id: str, namespace: str = "") -> Addr:
            if self.invalidated:
                raise LookupError(app_id)
            return await super().resolve(app_id, namespace)

    link = FakeLink([Unreachable("gone")])
    err = invoke_error(make(resolver=Vanishing(), link=link), req("other"))
    assert err.message == "failed to invoke, id: other, err: couldn't find service: other"
    assert len(link.calls) == 1


def test_no_resolver_is_500() -> None:
    b = InvokeBlock("me", "", None, None, FakeApp())
    err = invoke_error(b, req("other"))
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert err.message.startswith("failed to invoke, id: other, err: ")


def test_invalid_target_raises_before_any_call() -> None:
    resolver, link = FakeResolver(), FakeLink()
    err = invoke_error(make(resolver=resolver, link=link), req("a.b.c"))
    assert err.code == "ERR_DIRECT_INVOKE"
    assert resolver.resolved == [] and link.calls == []


# --- outbound headers -------------------------------------------------------------------------

CALLER_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"localhost:3500"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-connection", b"x"),
    (b"transfer-encoding", b"chunked"),
    (b"upgrade", b"h2c"),
    (b"http2-settings", b"x"),
    (b"te", b"trailers"),
    (b"trailer", b"x-t"),
    (b"proxy-authorization", b"Basic x"),
    (b"proxy-authenticate", b"Basic"),
    (b"content-length", b"7"),
    (b"dapr-app-id", b"other"),
    (b"dapr-api-token", b"secret"),
    (b"dapr-caller-app-id", b"forged"),
    (b"dapr-caller-namespace", b"forged-ns"),
    (b"dapr-callee-app-id", b"forged-callee"),
    (b"grpc-trace-bin", b"\x00\x01"),
    (b"custom-bin", b"\x02"),
    (b"content-type", b"application/json"),
    (b"x-custom", b"1"),
    (b"x-custom", b"2"),
    (b"traceparent", b"00-abc-def-01"),
    (b"authorization", b"Bearer t"),
    (b"binary", b"kept: does not end with -bin"),
]


def forwarded_headers(**kw: Any) -> list[tuple[bytes, bytes]]:
    link = FakeLink()
    invoke(make(link=link, own_address=kw.pop("own_address", "")), req(**kw))
    return link.calls[0].headers


def test_outbound_headers_drop_list_and_passthrough() -> None:
    out = forwarded_headers(headers=CALLER_HEADERS)
    kept = [(k, v) for k, v in out if not k.startswith((b"dapr-c", b"x-forwarded", b"forwarded"))]
    assert kept == [
        (b"content-type", b"application/json"),
        (b"x-custom", b"1"),
        (b"x-custom", b"2"),
        (b"traceparent", b"00-abc-def-01"),
        (b"authorization", b"Bearer t"),
        (b"binary", b"kept: does not end with -bin"),
    ]


def test_caller_and_callee_headers_are_overwritten() -> None:
    out = forwarded_headers(app_id="other.ns", headers=CALLER_HEADERS)
    assert values(out, b"dapr-caller-app-id") == [b"me"]
    assert values(out, b"dapr-caller-namespace") == [b""]
    assert values(out, b"dapr-callee-app-id") == [b"other"]
    assert values(out, b"dapr-api-token") == []
    assert values(out, b"dapr-app-id") == []


def test_forwarding_headers() -> None:
    out = forwarded_headers(
        headers=[(b"host", b"api.local:3500")], peer="10.1.2.3", own_address="127.0.0.1:50002"
    )
    assert values(out, b"x-forwarded-for") == [b"10.1.2.3"]
    assert values(out, b"x-forwarded-host") == [b"api.local:3500"]
    assert values(out, b"forwarded") == [b"for=10.1.2.3;by=127.0.0.1:50002;host=api.local:3500"]
    assert values(out, b"host") == []


def test_forwarding_headers_without_host_or_own_address() -> None:
    out = forwarded_headers(headers=[], peer="10.1.2.3")
    assert values(out, b"x-forwarded-host") == []
    assert values(out, b"forwarded") == [b"for=10.1.2.3"]


def test_self_invocation_gets_the_same_header_rules() -> None:
    app = FakeApp()
    invoke(make(app=app), req("me", headers=CALLER_HEADERS))
    hdrs = app.calls[0].headers
    assert values(hdrs, b"dapr-caller-app-id") == [b"me"]
    assert values(hdrs, b"dapr-callee-app-id") == [b"me"]
    assert values(hdrs, b"dapr-api-token") == []
    assert b"grpc-trace-bin" not in names(hdrs)


def test_headers_named_in_connection_are_dropped() -> None:
    out = forwarded_headers(
        headers=[(b"connection", b"close, X-Secret-Hop"), (b"x-secret-hop", b"1"), (b"x-ok", b"2")]
    )
    assert b"x-secret-hop" not in names(out)
    assert b"x-ok" in names(out)


def test_response_headers_drop_framing() -> None:
    hdrs = [
        (b"content-length", b"3"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close"),
        (b"keep-alive", b"x"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
    ]
    assert response_headers(hdrs) == [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1")]


# --- callee side ------------------------------------------------------------------------------


def test_on_remote_call_delivers_to_the_app() -> None:
    app = FakeApp()
    b = make(app=app)
    hdrs = [(b"dapr-callee-app-id", b"me"), (b"dapr-caller-app-id", b"other"), (b"x", b"1")]
    resp = asyncio.run(b.on_remote_call("GET", b"/m?x=1", hdrs, b"body"))
    assert resp.body == b"local"
    (call,) = app.calls
    assert (call.verb, call.target, call.headers, call.body) == ("GET", b"/m?x=1", hdrs, b"body")


@pytest.mark.parametrize(
    "hdrs", [[(b"dapr-callee-app-id", b"someone-else")], []], ids=["wrong", "missing"]
)
def test_on_remote_call_rejects_another_callee(hdrs: list[tuple[bytes, bytes]]) -> None:
    app = FakeApp()

    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await make(app=app).on_remote_call("GET", b"/m", hdrs, b"")
        return info.value

    err = asyncio.run(go())
    assert (err.code, err.http_status, err.grpc_code) == (
        "ERR_DIRECT_INVOKE",
        404,
        GrpcCode.NOT_FOUND,
    )
    assert "'me'" in err.message
    if hdrs:
        assert err.message.startswith("failed to invoke, id: someone-else, err: ")
    assert app.calls == []


def test_on_remote_call_without_app_channel() -> None:
    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await make(app=None).on_remote_call("GET", b"/m", [(b"dapr-callee-app-id", b"me")], b"")
        return info.value

    err = asyncio.run(go())
    assert (err.code, err.http_status) == ("ERR_DIRECT_INVOKE", 500)
    assert "app channel is not initialized" in err.message
