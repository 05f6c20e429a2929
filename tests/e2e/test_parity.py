"""One scenario table over HTTP and gRPC: the same request gives the same outcome on both.

Both adapters sit on the same blocks, so an error must carry the same message, the HTTP
status and gRPC code Dapr pairs with it, and a success the same data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import dapr_pb2_grpc, invoke_pb2, metadata_pb2, state_pb2
from google.protobuf import any_pb2

from tests.e2e.conftest import Pair, call


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""  # error message
    code: str = ""  # HTTP errorCode / gRPC status name
    data: Any = None


@dataclass(frozen=True)
class Scenario:
    name: str
    http: Callable[[int], Outcome]
    grpc: Callable[[dapr_pb2_grpc.DaprStub], Outcome]
    http_code: str = ""  # expected errorCode when failing
    grpc_code: grpc.StatusCode | None = None


def _http(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> Outcome:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    r = call(port, method, path, body=data, headers=headers)
    if r.status >= 400 and r.headers.get("content-type") == "application/json":
        err = r.json()
        if "errorCode" in err:
            return Outcome(False, err["message"], err["errorCode"])
    return Outcome(True, data=(r.status, r.body))


def _rpc(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(True, data=fn())
    except grpc.RpcError as exc:
        return Outcome(False, exc.details(), exc.code().name)


def _item(
    key: str, value: bytes, etag: str | None = None, concurrency: int = 0
) -> common_pb2.StateItem:
    return common_pb2.StateItem(
        key=key,
        value=value,
        etag=common_pb2.Etag(value=etag) if etag else None,
        options=common_pb2.StateOptions(concurrency=concurrency),
    )


def _http_etag(port: int, key: str) -> str:
    return call(port, "GET", f"/v1.0/state/statestore/{key}").headers["etag"]


def _grpc_etag(stub: dapr_pb2_grpc.DaprStub, key: str) -> str:
    return str(stub.GetState(state_pb2.GetStateRequest(store_name="statestore", key=key)).etag)


def _etag_conflict_http(port: int) -> Outcome:
    _http(port, "POST", "/v1.0/state/statestore", [{"key": "pc", "value": "1"}])
    stale = _http_etag(port, "pc")
    _http(port, "POST", "/v1.0/state/statestore", [{"key": "pc", "value": "2"}])
    return _http(
        port, "POST", "/v1.0/state/statestore", [{"key": "pc", "value": "3", "etag": stale}]
    )


def _etag_conflict_grpc(stub: dapr_pb2_grpc.DaprStub) -> Outcome:
    save = stub.SaveState
    save(state_pb2.SaveStateRequest(store_name="statestore", states=[_item("pc", b'"1"')]))
    stale = _grpc_etag(stub, "pc")
    save(state_pb2.SaveStateRequest(store_name="statestore", states=[_item("pc", b'"2"')]))
    return _rpc(
        lambda: save(
            state_pb2.SaveStateRequest(store_name="statestore", states=[_item("pc", b'"3"', stale)])
        )
    )


def _roundtrip_http(port: int) -> Outcome:
    _http(port, "POST", "/v1.0/state/statestore", [{"key": "rt", "value": {"a": 1}}])
    r = call(port, "GET", "/v1.0/state/statestore/rt")
    return Outcome(True, data=r.body)


def _roundtrip_grpc(stub: dapr_pb2_grpc.DaprStub) -> Outcome:
    stub.SaveState(
        state_pb2.SaveStateRequest(store_name="statestore", states=[_item("rt", b'{"a":1}')])
    )
    return Outcome(
        True, data=stub.GetState(state_pb2.GetStateRequest(store_name="statestore", key="rt")).data
    )


def _tx_ops(etag: str) -> list[state_pb2.TransactionalStateOperation]:
    return [
        state_pb2.TransactionalStateOperation(operationType="upsert", request=_item("tx1", b"1")),
        state_pb2.TransactionalStateOperation(
            operationType="upsert", request=_item("rt", b"2", etag)
        ),
    ]


def _tx_fail_http(port: int) -> Outcome:
    return _http(
        port,
        "POST",
        "/v1.0/state/statestore/transaction",
        {
            "operations": [
                {"operation": "upsert", "request": {"key": "tx1", "value": 1}},
                {"operation": "upsert", "request": {"key": "rt", "value": 2, "etag": "bogus"}},
            ]
        },
    )


def _tx_fail_grpc(stub: dapr_pb2_grpc.DaprStub) -> Outcome:
    return _rpc(
        lambda: stub.ExecuteStateTransaction(
            state_pb2.ExecuteStateTransactionRequest(
                storeName="statestore", operations=_tx_ops("bogus")
            )
        )
    )


def _bulk_http(port: int) -> Outcome:
    _http(port, "POST", "/v1.0/state/statestore", [{"key": "b1", "value": 1}])
    r = call(port, "POST", "/v1.0/state/statestore/bulk", body=json.dumps({"keys": ["b1", "zz"]}))
    return Outcome(True, data=[(i["key"], json.dumps(i.get("data"))) for i in r.json()])


def _bulk_grpc(stub: dapr_pb2_grpc.DaprStub) -> Outcome:
    stub.SaveState(state_pb2.SaveStateRequest(store_name="statestore", states=[_item("b1", b"1")]))
    r = stub.GetBulkState(state_pb2.GetBulkStateRequest(store_name="statestore", keys=["b1", "zz"]))
    return Outcome(
        True, data=[(i.key, json.dumps(json.loads(i.data) if i.data else None)) for i in r.items]
    )


def _invoke_grpc(app: str, method: str, verb: int, query: str = "") -> Callable[..., Outcome]:
    def run(stub: dapr_pb2_grpc.DaprStub) -> Outcome:
        req = invoke_pb2.InvokeServiceRequest(
            id=app,
            message=common_pb2.InvokeRequest(
                method=method,
                data=any_pb2.Any(value=b"body"),
                content_type="text/plain",
                http_extension=common_pb2.HTTPExtension(verb=verb, querystring=query),
            ),
        )
        out = _rpc(lambda: stub.InvokeService(req))
        if not out.ok:
            return out
        echo = json.loads(out.data.data.value)
        return Outcome(True, data=(echo["method"], echo["path"], echo["query"], echo["body"]))

    return run


def _invoke_http(app: str, method: str, verb: str, query: str = "") -> Callable[[int], Outcome]:
    def run(port: int) -> Outcome:
        path = f"/v1.0/invoke/{app}/method/{method}" + (f"?{query}" if query else "")
        r = call(port, verb, path, body="body", headers={"content-type": "text/plain"})
        if r.status >= 400:
            return Outcome(False, r.json()["message"], r.json()["errorCode"])
        echo = r.json()
        return Outcome(True, data=(echo["method"], echo["path"], echo["query"], echo["body"]))

    return run


POST = common_pb2.HTTPExtension.Verb.Value("POST")
DELETE = common_pb2.HTTPExtension.Verb.Value("DELETE")

SCENARIOS = [
    Scenario("state round trip", _roundtrip_http, _roundtrip_grpc),
    Scenario(
        "etag conflict",
        _etag_conflict_http,
        _etag_conflict_grpc,
        "ERR_STATE_SAVE",
        grpc.StatusCode.ABORTED,
    ),
    Scenario(
        "transaction fails whole",
        _tx_fail_http,
        _tx_fail_grpc,
        "ERR_STATE_TRANSACTION",
        grpc.StatusCode.INTERNAL,
    ),
    Scenario("bulk get", _bulk_http, _bulk_grpc),
    Scenario(
        "unknown store",
        lambda p: _http(p, "GET", "/v1.0/state/nostore/k"),
        lambda s: _rpc(
            lambda: s.GetState(state_pb2.GetStateRequest(store_name="nostore", key="k"))
        ),
        "ERR_STATE_STORE_NOT_FOUND",
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    Scenario(
        "illegal key",
        lambda p: _http(p, "POST", "/v1.0/state/statestore", [{"key": "a||b", "value": 1}]),
        lambda s: _rpc(
            lambda: s.SaveState(
                state_pb2.SaveStateRequest(store_name="statestore", states=[_item("a||b", b"1")])
            )
        ),
        "ERR_MALFORMED_REQUEST",
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    Scenario(
        "delete with wrong etag",
        lambda p: _http(p, "DELETE", "/v1.0/state/statestore/rt", headers={"If-Match": "x"}),
        lambda s: _rpc(
            lambda: s.DeleteState(
                state_pb2.DeleteStateRequest(
                    store_name="statestore", key="rt", etag=common_pb2.Etag(value="x")
                )
            )
        ),
        "ERR_STATE_DELETE",
        grpc.StatusCode.ABORTED,
    ),
    Scenario(
        "invoke POST with query",
        _invoke_http("beta", "orders/1", "POST", "a=b"),
        _invoke_grpc("beta", "orders/1", POST, "a=b"),
    ),
    Scenario(
        "invoke DELETE", _invoke_http("beta", "x", "DELETE"), _invoke_grpc("beta", "x", DELETE)
    ),
    Scenario(
        "invoke unknown app",
        _invoke_http("ghost", "x", "POST"),
        _invoke_grpc("ghost", "x", POST),
        "ERR_DIRECT_INVOKE",
        grpc.StatusCode.INTERNAL,
    ),
    Scenario(
        "invoke bad app id",
        _invoke_http("a.b.c", "x", "POST"),
        _invoke_grpc("a.b.c", "x", POST),
        "ERR_DIRECT_INVOKE",
        grpc.StatusCode.INTERNAL,
    ),
    Scenario(
        "metadata id",
        lambda p: Outcome(True, data=call(p, "GET", "/v1.0/metadata").json()["id"]),
        lambda s: Outcome(True, data=s.GetMetadata(metadata_pb2.GetMetadataRequest()).id),
    ),
]


@pytest.fixture(scope="module")
def stub(pair: Pair) -> Iterator[dapr_pb2_grpc.DaprStub]:
    with grpc.insecure_channel(f"127.0.0.1:{pair.alpha.grpc_port}") as ch:
        yield dapr_pb2_grpc.DaprStub(ch)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_parity(pair: Pair, stub: dapr_pb2_grpc.DaprStub, sc: Scenario) -> None:
    over_http = sc.http(pair.alpha.http_port)
    over_grpc = sc.grpc(stub)
    assert over_http.ok == over_grpc.ok, (over_http, over_grpc)
    if over_http.ok:
        assert over_http.data == over_grpc.data
        return
    assert over_http.message == over_grpc.message
    assert over_http.code == sc.http_code
    assert sc.grpc_code is not None and over_grpc.code == sc.grpc_code.name
