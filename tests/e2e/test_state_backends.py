"""State on real servers through a sidecar: Redis, PostgreSQL and MariaDB over HTTP and gRPC."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError

from pillion.testing.procs import Sidecar, start_sidecar
from tests.conformance.conftest import require_server
from tests.e2e.conftest import call

RUN = uuid.uuid4().hex[:8]
STORES = {
    "redis": ("state.redis", 6379, {"redisHost": "127.0.0.1:6379", "redisDB": "12"}),
    "pg": (
        "state.postgresql",
        5432,
        {
            "connectionString": "host=127.0.0.1 port=5432 user=postgres dbname=test",
            "tableName": f"e2e_state_{RUN}",
            "metadataTableName": f"e2e_state_md_{RUN}",
        },
    ),
    "maria": (
        "state.mysql",
        3306,
        {
            "connectionString": "root:@tcp(127.0.0.1:3306)/?allowNativePasswords=true",
            "schemaName": "test",
            "tableName": f"e2e_state_{RUN}",
        },
    ),
}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Sidecar]:
    for kind, port, _ in STORES.values():
        require_server(kind, "127.0.0.1", port)
    res = tmp_path_factory.mktemp("backends")
    docs = []
    for name, (kind, _, md) in STORES.items():
        items = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in md.items())
        docs.append(
            f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\n"
            f"spec:\n  type: {kind}\n  version: v1\n  metadata:\n{items}"
        )
    (res / "stores.yaml").write_text("---\n".join(docs))
    sc = start_sidecar(f"backends-{RUN}", home=home, resources=[res], timeout=30)
    yield sc
    sc.proc.stop()
    import psycopg
    import pymysql

    with psycopg.connect(STORES["pg"][2]["connectionString"], autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS e2e_state_{RUN}")
        c.execute(f"DROP TABLE IF EXISTS e2e_state_md_{RUN}")
    m = pymysql.connect(host="127.0.0.1", user="root", password="", database="test")
    with m.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS e2e_state_{RUN}")
    m.commit()
    m.close()


@pytest.mark.parametrize("store", sorted(STORES))
def test_http_crud_and_etags(sidecar: Sidecar, store: str) -> None:
    p = sidecar.http_port
    r = call(p, "POST", f"/v1.0/state/{store}", body=json.dumps([{"key": "k", "value": {"a": 1}}]))
    assert r.status == 204, r.body
    got = call(p, "GET", f"/v1.0/state/{store}/k")
    assert json.loads(got.body) == {"a": 1}
    stale = got.headers["etag"]
    assert (
        call(
            p,
            "POST",
            f"/v1.0/state/{store}",
            body=json.dumps([{"key": "k", "value": 2, "etag": stale}]),
        ).status
        == 204
    )
    r = call(
        p,
        "POST",
        f"/v1.0/state/{store}",
        body=json.dumps([{"key": "k", "value": 3, "etag": stale}]),
    )
    assert r.status == 409 and r.json()["errorCode"] == "ERR_STATE_SAVE"
    tx = {
        "operations": [
            {"operation": "upsert", "request": {"key": "t", "value": "x"}},
            {"operation": "delete", "request": {"key": "k"}},
        ]
    }
    assert call(p, "POST", f"/v1.0/state/{store}/transaction", body=json.dumps(tx)).status == 204
    assert call(p, "GET", f"/v1.0/state/{store}/k").status == 204
    assert call(p, "GET", f"/v1.0/state/{store}/t").body == b'"x"'
    md = {c["name"]: c for c in call(p, "GET", "/v1.0/metadata").json()["components"]}
    assert {"ETAG", "TRANSACTIONAL", "TTL"} <= set(md[store]["capabilities"])


@pytest.mark.parametrize("store", sorted(STORES))
def test_sdk_over_grpc(sidecar: Sidecar, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(sidecar.grpc_port))
    with DaprClient() as d:
        d.save_state(store, "g", b"\x00binary\xff")
        item = d.get_state(store, "g")
        assert item.data == b"\x00binary\xff"
        with pytest.raises(DaprGrpcError) as ei:
            d.save_state(store, "g", b"v", etag="1" if store != "maria" else "nope")
        assert ei.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT)
        d.save_state(store, "g", b"v2", etag=item.etag)
        assert d.get_state(store, "g").data == b"v2"


def test_query_api_postgresql(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    p = sidecar.http_port
    docs = [
        {"key": f"o{i}", "value": {"city": "Oslo" if i % 2 else "Rome", "n": i}} for i in range(6)
    ]
    assert call(p, "POST", "/v1.0/state/pg", body=json.dumps(docs)).status == 204
    q = {
        "filter": {"EQ": {"city": "Oslo"}},
        "sort": [{"key": "n", "order": "DESC"}],
        "page": {"limit": 2},
    }
    r = call(p, "POST", "/v1.0-alpha1/state/pg/query", body=json.dumps(q))
    assert r.status == 200, r.body
    body = r.json()
    assert [x["key"] for x in body["results"]] == ["o5", "o3"]
    assert body["results"][0]["data"] == {"city": "Oslo", "n": 5}
    assert body["token"]
    r = call(p, "POST", "/v1.0-alpha1/state/redis/query", body=json.dumps(q))
    assert r.status == 500 and r.json()["errorCode"] == "ERR_STATE_STORE_NOT_SUPPORTED"
    monkeypatch.setenv("DAPR_HTTP_PORT", str(sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(sidecar.grpc_port))
    with DaprClient() as d:
        resp = d.query_state("pg", json.dumps({"filter": {"EQ": {"city": "Rome"}}}))
        assert sorted(x.key for x in resp.results) == ["o0", "o2", "o4"]
