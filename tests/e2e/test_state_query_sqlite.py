"""The state query API on `state.sqlite` through a real sidecar, over HTTP and the SDK's gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from dapr.clients import DaprClient

from pillion.testing.procs import Sidecar, start_sidecar
from tests.e2e.conftest import call


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Sidecar]:
    res = tmp_path_factory.mktemp("sqlite-query")
    db = res / "state.db"
    (res / "store.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: sq\n"
        "spec:\n  type: state.sqlite\n  version: v1\n  metadata:\n"
        f'  - name: connectionString\n    value: "{db}"\n'
    )
    sc = start_sidecar("sqlite-query", home=home, resources=[res], timeout=30)
    yield sc
    sc.proc.stop()


def test_query_api_sqlite(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    p = sidecar.http_port
    docs = [
        {"key": f"o{i}", "value": {"city": "Oslo" if i % 2 else "Rome", "n": i, "t": [i]}}
        for i in range(6)
    ]
    assert call(p, "POST", "/v1.0/state/sq", body=json.dumps(docs)).status == 204
    q = {
        "filter": {"EQ": {"city": "Oslo"}},
        "sort": [{"key": "n", "order": "DESC"}],
        "page": {"limit": 2},
    }
    r = call(p, "POST", "/v1.0-alpha1/state/sq/query", body=json.dumps(q))
    assert r.status == 200, r.body
    body = r.json()
    assert [x["key"] for x in body["results"]] == ["o5", "o3"]
    assert body["results"][0]["data"] == {"city": "Oslo", "n": 5, "t": [5]}
    assert body["token"] == "2"
    q["page"] = {"limit": 2, "token": body["token"]}
    r = call(p, "POST", "/v1.0-alpha1/state/sq/query", body=json.dumps(q))
    assert [x["key"] for x in r.json()["results"]] == ["o1"]
    r = call(p, "POST", "/v1.0-alpha1/state/sq/query", body=json.dumps({"filter": {"X": {}}}))
    assert r.status == 500 and r.json()["errorCode"] == "ERR_STATE_QUERY"
    monkeypatch.setenv("DAPR_HTTP_PORT", str(sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(sidecar.grpc_port))
    with DaprClient() as d:
        resp = d.query_state("sq", json.dumps({"filter": {"IN": {"t.0": [0, 4]}}}))
        assert sorted(x.key for x in resp.results) == ["o0", "o4"]
        assert json.loads(resp.results[0].value) == docs[int(resp.results[0].key[1:])]["value"]
