"""SecretsBlock rules: store lookup, Dapr's error codes, secret scopes and their parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

import pytest

from pillion.blocks.secrets import (
    ScopeConfigError,
    SecretsBlock,
    SecretScope,
    parse_scopes,
)
from pillion.components.metadata import ComponentInfo
from pillion.components.secretstores.api import (
    Feature,
    SecretNotFound,
    SecretStore,
    SecretStoreError,
)
from pillion.errors import Code, GrpcCode, PillionError


class FakeStore(SecretStore):
    """Single-valued secrets in a dict; records the metadata of each call."""

    def __init__(self, secrets: Mapping[str, str] | None = None, fail: bool = False) -> None:
        self.secrets = dict(secrets or {"a": "1", "b": "2", "c": "3"})
        self.fail = fail
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def init(self, info: ComponentInfo) -> None:
        return None

    def features(self) -> frozenset[Feature]:
        return frozenset()

    async def get(self, key: str, metadata: Mapping[str, str]) -> dict[str, str]:
        self.calls.append((key, dict(metadata)))
        if self.fail:
            raise SecretStoreError("backend unreachable")
        if key not in self.secrets:
            raise SecretNotFound(key)
        return {key: self.secrets[key]}

    async def bulk_get(self, metadata: Mapping[str, str]) -> dict[str, dict[str, str]]:
        self.calls.append(("*", dict(metadata)))
        if self.fail:
            raise SecretStoreError("backend unreachable")
        return {k: {k: v} for k, v in self.secrets.items()}


def run(aw: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await aw

    return asyncio.run(go())


def raises(aw: Awaitable[Any]) -> PillionError:
    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await aw
        return info.value

    return asyncio.run(go())


def block(store: SecretStore | None = None, **scopes: SecretScope) -> SecretsBlock:
    return SecretsBlock("app", {"vault": store or FakeStore()}, scopes)


# --- lookup and errors --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["get", "bulk"])
def test_no_secret_stores(op: str) -> None:
    b = SecretsBlock("app", {})
    err = raises(b.get("vault", "a") if op == "get" else b.bulk("vault"))
    assert (err.code, err.http_status, err.grpc_code) == (
        Code.SECRET_STORES_NOT_CONFIGURED,
        500,
        GrpcCode.FAILED_PRECONDITION,
    )
    assert err.message == "secret store is not configured"
    assert err.reason is None  # a legacy error, as in Dapr


@pytest.mark.parametrize("op", ["get", "bulk"])
def test_unknown_store_is_dapr_401(op: str) -> None:
    b = block()
    err = raises(b.get("nope", "a") if op == "get" else b.bulk("nope"))
    assert (err.code, err.http_status, err.grpc_code) == (
        Code.SECRET_STORE_NOT_FOUND,
        401,
        GrpcCode.INVALID_ARGUMENT,
    )
    assert err.message == "failed finding secret store with key nope"


def test_get_and_metadata_pass_through() -> None:
    store = FakeStore()
    assert run(block(store).get("vault", "a", {"version_id": "2"})) == {"a": "1"}
    assert store.calls == [("a", {"version_id": "2"})]


def test_missing_secret_is_secret_get() -> None:
    err = raises(block().get("vault", "zz"))
    assert (err.code, err.http_status, err.grpc_code) == (Code.SECRET_GET, 500, GrpcCode.INTERNAL)
    assert (
        err.message
        == "failed getting secret with key zz from secret store vault: secret zz not found"
    )


def test_store_failure_is_secret_get() -> None:
    err = raises(block(FakeStore(fail=True)).get("vault", "a"))
    assert err.code == Code.SECRET_GET and err.http_status == 500
    assert err.message.endswith(": backend unreachable")
    err = raises(block(FakeStore(fail=True)).bulk("vault"))
    assert err.code == Code.SECRET_GET and err.grpc_code == GrpcCode.INTERNAL
    assert err.message == "failed getting secrets from secret store vault: backend unreachable"


def test_denied_secret_is_403_and_never_reaches_the_store() -> None:
    store = FakeStore()
    b = block(store, vault=SecretScope("vault", "deny"))
    err = raises(b.get("vault", "a"))
    assert (err.code, err.http_status, err.grpc_code) == (
        Code.PERMISSION_DENIED,
        403,
        GrpcCode.PERMISSION_DENIED,
    )
    assert err.message == 'access denied by policy to get "a" from "vault"'
    assert store.calls == []


def test_unknown_store_is_checked_before_scopes() -> None:
    b = SecretsBlock("app", {"vault": FakeStore()}, {"other": SecretScope("other", "deny")})
    assert raises(b.get("other", "a")).code == Code.SECRET_STORE_NOT_FOUND


def test_bulk_leaves_out_denied_secrets() -> None:
    b = block(vault=SecretScope("vault", "allow", denied=frozenset({"b"})))
    assert run(b.bulk("vault")) == {"a": {"a": "1"}, "c": {"c": "3"}}
    b = block(vault=SecretScope("vault", "deny", allowed=frozenset({"c"})))
    assert run(b.bulk("vault")) == {"c": {"c": "3"}}
    assert run(block(vault=SecretScope("vault", "deny")).bulk("vault")) == {}


def test_scopes_of_another_store_do_not_apply() -> None:
    b = block(other=SecretScope("other", "deny"))
    assert run(b.get("vault", "a")) == {"a": "1"}


# --- the scoping rules (Dapr's IsSecretAllowed) -------------------------------------------------

S1, S2 = frozenset({"s1"}), frozenset({"s2"})
BOTH = frozenset({"s1", "s2"})

# (defaultAccess, allowedSecrets, deniedSecrets, secret, allowed?)
RULES = [
    # Dapr's documented scenarios (operations/configuration/secret-scope).
    ("allow", frozenset(), frozenset(), "s1", True),
    ("deny", frozenset(), frozenset(), "s1", False),
    ("deny", S1, frozenset(), "s1", True),
    ("deny", S1, frozenset(), "s2", False),
    ("allow", frozenset(), S1, "s1", False),
    ("allow", frozenset(), S1, "s2", True),
    ("allow", S1, frozenset(), "s1", True),
    ("allow", S1, frozenset(), "s2", False),  # a non-empty allow list beats defaultAccess
    ("deny", frozenset(), S1, "s1", False),
    ("deny", frozenset(), S1, "s2", False),
    ("deny", S1, S2, "s1", True),
    ("allow", S1, S2, "s1", True),
    ("allow", S1, S2, "s2", False),
    ("allow", S1, S2, "s3", False),
    # A secret in both lists: Dapr consults only the allow list once it is non-empty.
    ("allow", BOTH, S1, "s1", True),
    ("deny", BOTH, S1, "s2", True),
]


@pytest.mark.parametrize(("access", "allowed", "denied", "secret", "ok"), RULES)
def test_scope_rules(
    access: str, allowed: frozenset[str], denied: frozenset[str], secret: str, ok: bool
) -> None:
    scope = SecretScope("vault", access, allowed, denied)
    assert scope.allows(secret) is ok
    b = SecretsBlock("app", {"vault": FakeStore({secret: "v"})}, {"vault": scope})
    if ok:
        assert run(b.get("vault", secret)) == {secret: "v"}
    else:
        assert raises(b.get("vault", secret)).code == Code.PERMISSION_DENIED


def test_names_are_case_sensitive() -> None:
    assert not SecretScope("vault", "deny", allowed=S1).allows("S1")


# --- parsing Configuration.spec.secrets ---------------------------------------------------------


def test_parse_scopes() -> None:
    spec = {
        "secrets": {
            "scopes": [
                {"storeName": "vault", "defaultAccess": "DENY", "allowedSecrets": ["s1"]},
                {"storeName": "local", "deniedSecrets": ["s2"]},
            ]
        },
        "tracing": {"samplingRate": "1"},
    }
    assert parse_scopes(spec) == {
        "vault": SecretScope("vault", "deny", S1, frozenset()),
        "local": SecretScope("local", "allow", frozenset(), S2),
    }


@pytest.mark.parametrize(
    "spec", [{}, {"secrets": None}, {"secrets": {}}, {"secrets": {"scopes": []}}]
)
def test_parse_no_scopes(spec: dict[str, Any]) -> None:
    assert parse_scopes(spec) == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"secrets": []}, "spec.secrets: must be a mapping with a `scopes` list"),
        ({"secrets": {"scopes": {}}}, "spec.secrets.scopes: must be a list"),
        ({"secrets": {"scopes": ["x"]}}, "spec.secrets.scopes[0]: must be a mapping"),
        ({"secrets": {"scopes": [{}]}}, "spec.secrets.scopes[0].storeName: is required"),
        (
            {"secrets": {"scopes": [{"storeName": "a"}, {"storeName": "a"}]}},
            "spec.secrets.scopes[1].storeName: 'a' is repeated in secrets configuration",
        ),
        (
            {"secrets": {"scopes": [{"storeName": "a", "defaultAccess": "maybe"}]}},
            "spec.secrets.scopes[0].defaultAccess: must be allow or deny, got 'maybe'",
        ),
        (
            {"secrets": {"scopes": [{"storeName": "a", "allowedSecrets": "s1"}]}},
            "spec.secrets.scopes[0].allowedSecrets: must be a list of secret names",
        ),
        (
            {"secrets": {"scopes": [{"storeName": "a", "deniedSecrets": [1]}]}},
            "spec.secrets.scopes[0].deniedSecrets: must be a list of secret names",
        ),
    ],
)
def test_parse_scope_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ScopeConfigError) as ei:
        parse_scopes(spec)
    assert str(ei.value) == message
