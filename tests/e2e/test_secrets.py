"""Secrets end to end: local file and env stores, scopes, secretKeyRef, HTTP and the SDK's gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient

from pillion.testing.procs import Sidecar, start_sidecar
from tests.e2e.conftest import bad_start, call

ENV_PREFIX = "PILLION_E2E_SECRET_"

COMPONENTS = """
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: statestore
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    secretKeyRef:
      name: database
      key: conn
auth:
  secretStore: multistore
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: envbacked
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    secretKeyRef:
      name: DB
auth:
  secretStore: envstore
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: localsecretstore
spec:
  type: secretstores.local.file
  version: v1
  metadata:
  - name: secretsFile
    value: "{single}"
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: multistore
spec:
  type: secretstores.local.file
  version: v1
  metadata:
  - name: secretsFile
    value: "{multi}"
  - name: multiValued
    value: "true"
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: envstore
spec:
  type: secretstores.local.env
  version: v1
  metadata:
  - name: prefix
    value: {prefix}
"""

CONFIG = """
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: secretsconfig
spec:
  secrets:
    scopes:
    - storeName: localsecretstore
      defaultAccess: allow
      deniedSecrets: ["denied"]
    - storeName: envstore
      defaultAccess: deny
      allowedSecrets: ["TOKEN", "DB"]
"""


@dataclass
class Setup:
    sidecar: Sidecar
    dir: Path


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Setup]:
    d = tmp_path_factory.mktemp("secrets")
    single = {
        "plain": "v",
        "app": {"user": "u", "pass": "p:w", "ports": [80, 443]},
        "denied": "nope",
    }
    (d / "single.json").write_text(json.dumps(single))
    multi = {"database": {"conn": str(d / "state.db"), "user": "admin"}, "solo": "one"}
    (d / "multi.json").write_text(json.dumps(multi))
    res = d / "resources"
    res.mkdir()
    (res / "components.yaml").write_text(
        COMPONENTS.format(single=d / "single.json", multi=d / "multi.json", prefix=ENV_PREFIX)
    )
    (d / "config.yaml").write_text(CONFIG)
    env = {
        f"{ENV_PREFIX}TOKEN": "tok",
        f"{ENV_PREFIX}DB": str(d / "env-state.db"),
        f"{ENV_PREFIX}HIDDEN": "hidden",
    }
    sc = start_sidecar(
        "secretive",
        home=home,
        resources=[res],
        extra=["--config", str(d / "config.yaml")],
        env=env,
    )
    yield Setup(sc, d)
    sc.proc.stop()


def get(s: Setup, path: str) -> tuple[int, object]:
    r = call(s.sidecar.http_port, "GET", path)
    return r.status, (r.json() if r.body else None)


# --- HTTP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1.0/secrets/localsecretstore/plain", {"plain": "v"}),
        ("/v1.0/secrets/localsecretstore/app:pass", {"app:pass": "p:w"}),
        ("/v1.0/secrets/localsecretstore/app%3Aports%3A1", {"app:ports:1": "443"}),
        ("/v1.0/secrets/multistore/database?metadata.x=1", None),
        ("/v1.0/secrets/multistore/solo", {"solo": "one"}),
        ("/v1.0/secrets/envstore/TOKEN", {"TOKEN": "tok"}),
    ],
)
def test_http_get(secrets: Setup, path: str, body: object) -> None:
    status, got = get(secrets, path)
    assert status == 200
    if body is None:
        body = {"conn": str(secrets.dir / "state.db"), "user": "admin"}
    assert got == body


def test_http_bulk_leaves_out_denied_secrets(secrets: Setup) -> None:
    assert get(secrets, "/v1.0/secrets/localsecretstore/bulk") == (
        200,
        {
            "plain": {"plain": "v"},
            "app:user": {"app:user": "u"},
            "app:pass": {"app:pass": "p:w"},
            "app:ports:0": {"app:ports:0": "80"},
            "app:ports:1": {"app:ports:1": "443"},
        },
    )
    assert get(secrets, "/v1.0/secrets/envstore/bulk") == (
        200,
        {"TOKEN": {"TOKEN": "tok"}, "DB": {"DB": str(secrets.dir / "env-state.db")}},
    )


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        (
            "/v1.0/secrets/localsecretstore/denied",
            403,
            "ERR_PERMISSION_DENIED",
            'access denied by policy to get "denied" from "localsecretstore"',
        ),
        (
            "/v1.0/secrets/envstore/HIDDEN",
            403,
            "ERR_PERMISSION_DENIED",
            'access denied by policy to get "HIDDEN" from "envstore"',
        ),
        (
            "/v1.0/secrets/nostore/plain",
            401,
            "ERR_SECRET_STORE_NOT_FOUND",
            "failed finding secret store with key nostore",
        ),
        (
            "/v1.0/secrets/localsecretstore/missing",
            500,
            "ERR_SECRET_GET",
            "failed getting secret with key missing from secret store localsecretstore: "
            "secret missing not found",
        ),
    ],
)
def test_http_errors(secrets: Setup, path: str, status: int, code: str, message: str) -> None:
    r = call(secrets.sidecar.http_port, "GET", path)
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"errorCode": code, "message": message}


def test_state_stores_configured_from_secrets_work(secrets: Setup) -> None:
    port = secrets.sidecar.http_port
    for store, db in (("statestore", "state.db"), ("envbacked", "env-state.db")):
        r = call(port, "POST", f"/v1.0/state/{store}", json.dumps([{"key": "k", "value": store}]))
        assert r.status == 204, r.body
        r = call(port, "GET", f"/v1.0/state/{store}/k")
        assert (r.status, r.json()) == (200, store)
        # The connection string came from the secret: the database is where the secret says.
        assert (secrets.dir / db).exists()


def test_metadata_lists_secret_stores(secrets: Setup) -> None:
    comps = {
        c["name"]: c
        for c in call(secrets.sidecar.http_port, "GET", "/v1.0/metadata").json()["components"]
    }
    assert comps["localsecretstore"]["type"] == "secretstores.local.file"
    assert "capabilities" not in comps["localsecretstore"]
    assert comps["multistore"]["capabilities"] == ["MULTIPLE_KEY_VALUES_PER_SECRET"]
    assert comps["envstore"]["type"] == "secretstores.local.env"
    assert {"statestore", "envbacked"} <= set(comps)


# --- the official SDK over gRPC -------------------------------------------------------------------


@pytest.fixture
def client(secrets: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(secrets.sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(secrets.sidecar.grpc_port))
    with DaprClient() as d:
        yield d


def test_sdk_get_secret(client: DaprClient, secrets: Setup) -> None:
    assert client.get_secret("localsecretstore", "app:user").secret == {"app:user": "u"}
    assert client.get_secret("multistore", "database", {"m": "1"}).secret == {
        "conn": str(secrets.dir / "state.db"),
        "user": "admin",
    }
    assert client.get_secret("envstore", "TOKEN").secret == {"TOKEN": "tok"}


def test_sdk_get_bulk_secret(client: DaprClient) -> None:
    bulk = client.get_bulk_secret("localsecretstore").secrets
    assert "denied" not in bulk and bulk["plain"] == {"plain": "v"}
    assert client.get_bulk_secret("envstore").secrets["TOKEN"] == {"TOKEN": "tok"}


@pytest.mark.parametrize(
    ("store", "key", "code", "message"),
    [
        (
            "localsecretstore",
            "denied",
            grpc.StatusCode.PERMISSION_DENIED,
            'access denied by policy to get "denied" from "localsecretstore"',
        ),
        (
            "nostore",
            "plain",
            grpc.StatusCode.INVALID_ARGUMENT,
            "failed finding secret store with key nostore",
        ),
        (
            "localsecretstore",
            "missing",
            grpc.StatusCode.INTERNAL,
            "failed getting secret with key missing from secret store localsecretstore: "
            "secret missing not found",
        ),
    ],
)
def test_sdk_errors(
    client: DaprClient, store: str, key: str, code: grpc.StatusCode, message: str
) -> None:
    # SDK 1.19 wraps only some calls in DaprGrpcError; get_secret raises the grpc.RpcError.
    with pytest.raises(grpc.RpcError) as ei:
        client.get_secret(store, key)
    assert ei.value.code() == code
    assert ei.value.details() == message


# --- start-up failures ----------------------------------------------------------------------------


def test_bad_secret_key_ref_stops_startup(tmp_path: Path, home: Path) -> None:
    (tmp_path / "s.json").write_text('{"present": "x"}')
    (tmp_path / "c.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: files}\nspec:\n"
        "  type: secretstores.local.file\n  version: v1\n  metadata:\n"
        f"  - name: secretsFile\n    value: {tmp_path / 's.json'}\n"
        "---\n"
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: statestore}\nspec:\n"
        "  type: state.sqlite\n  version: v1\n  metadata:\n"
        "  - name: connectionString\n    secretKeyRef: {name: absent}\n"
        "auth: {secretStore: files}\n"
    )
    code, out = bad_start(tmp_path, home)
    assert code == 1, out
    assert (
        "component statestore (state.sqlite/v1) from " in out
        and "metadata 'connectionString': secretKeyRef 'absent': secret store 'files': "
        "secret absent not found"
        in out
    ), out
    assert "Traceback" not in out


def test_missing_auth_secret_store_stops_startup(tmp_path: Path, home: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: statestore}\nspec:\n"
        "  type: state.sqlite\n  version: v1\n  metadata:\n"
        "  - name: connectionString\n    secretKeyRef: {name: db, key: conn}\n"
    )
    code, out = bad_start(tmp_path, home)
    assert code == 1, out
    assert "component statestore" in out and "auth.secretStore is not set" in out, out
    assert "Traceback" not in out
