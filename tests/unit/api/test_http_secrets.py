"""The secrets routes of HttpApi: paths, query metadata, status codes and JSON bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from pillion.blocks.secrets import SecretsBlock, SecretScope
from tests.unit.api.test_http_router import Rig, assert_error, rig
from tests.unit.blocks.test_secrets import FakeStore


def secrets_rig(**scopes: SecretScope) -> tuple[Rig, FakeStore]:
    r = rig()
    store = FakeStore({"a": "1", "b": "2", "a/b": "3", "": "x"})
    r.api.secrets = SecretsBlock("me", {"vault": store}, scopes)
    return r, store


def test_get_secret() -> None:
    r, store = secrets_rig()
    resp = r("GET", "/v1.0/secrets/vault/a?metadata.version_id=2&other=1")
    assert resp.status == 200
    assert (b"content-type", b"application/json") in resp.headers
    assert json.loads(resp.body) == {"a": "1"}
    assert store.calls == [("a", {"version_id": "2"})]


def test_get_secret_with_escaped_and_nested_names() -> None:
    r, _ = secrets_rig()
    assert json.loads(r("GET", "/v1.0/secrets/vault/a%2Fb").body) == {"a/b": "3"}
    assert json.loads(r("GET", "/v1.0/secrets/vault/a/b").body) == {"a/b": "3"}


def test_bulk() -> None:
    r, store = secrets_rig(vault=SecretScope("vault", "allow", denied=frozenset({"b"})))
    resp = r("GET", "/v1.0/secrets/vault/bulk?metadata.k=v")
    assert resp.status == 200
    assert json.loads(resp.body) == {"a": {"a": "1"}, "a/b": {"a/b": "3"}, "": {"": "x"}}
    assert store.calls == [("*", {"k": "v"})]


def test_empty_answer_is_204() -> None:
    r = rig()
    r.api.secrets = SecretsBlock("me", {"vault": EmptyStore()})
    assert r("GET", "/v1.0/secrets/vault/a").status == 204
    assert json.loads(r("GET", "/v1.0/secrets/vault/bulk").body) == {}


class EmptyStore(FakeStore):
    async def get(self, key: str, metadata: Mapping[str, str]) -> dict[str, str]:
        return {}

    async def bulk_get(self, metadata: Mapping[str, str]) -> dict[str, dict[str, str]]:
        return {}


@pytest.mark.parametrize(
    ("target", "status", "code", "message"),
    [
        ("/v1.0/secrets/nope/a", 401, "ERR_SECRET_STORE_NOT_FOUND", None),
        ("/v1.0/secrets/nope/bulk", 401, "ERR_SECRET_STORE_NOT_FOUND", None),
        ("/v1.0/secrets/vault/zz", 500, "ERR_SECRET_GET", None),
        (
            "/v1.0/secrets/vault/b",
            403,
            "ERR_PERMISSION_DENIED",
            'access denied by policy to get "b" from "vault"',
        ),
        ("/v1.0/secrets/vault", 404, "ERR_BAD_REQUEST", None),
        ("/v1.0/secrets", 404, "ERR_BAD_REQUEST", None),
    ],
)
def test_errors(target: str, status: int, code: str, message: str | None) -> None:
    r, _ = secrets_rig(vault=SecretScope("vault", "allow", denied=frozenset({"b"})))
    assert_error(r("GET", target), status, code, message)


def test_only_get_is_allowed() -> None:
    r, store = secrets_rig()
    assert_error(r("POST", "/v1.0/secrets/vault/a"), 405, "ERR_BAD_REQUEST")
    assert store.calls == []


def test_without_secret_stores() -> None:
    # The default HttpApi (no block given) answers as a sidecar without secret stores.
    assert_error(
        rig()("GET", "/v1.0/secrets/vault/a"),
        500,
        "ERR_SECRET_STORES_NOT_CONFIGURED",
        "secret store is not configured",
    )
    r = rig()
    r.api.secrets = SecretsBlock("me", {})
    assert_error(r("GET", "/v1.0/secrets/vault/bulk"), 500, "ERR_SECRET_STORES_NOT_CONFIGURED")


def test_alpha_versions_are_not_secrets_routes() -> None:
    r, store = secrets_rig()
    resp = r("GET", "/v1.0-alpha1/secrets/vault/a")
    assert resp.status == 404 and store.calls == []
