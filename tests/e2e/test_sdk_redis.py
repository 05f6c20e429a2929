"""The official SDK over gRPC against a sidecar whose building blocks all sit on Redis.

State with etags, bulk and transactions, the outbox, secrets with scoping, configuration
subscribe receiving a change, and TryLock/Unlock: one sidecar, one real Redis.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._request import TransactionalStateOperation

from pillion.testing.procs import Sidecar, start_sidecar, wait_until
from tests.conformance.conftest import require_server

RUN = uuid.uuid4().hex[:8]
DB = 9  # this test's own Redis database, flushed before and after


def _component(name: str, kind: str, md: dict[str, str], auth: str = "") -> str:
    items = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in md.items())
    extra = f"auth:\n  secretStore: {auth}\n" if auth else ""
    return (
        f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\n"
        f"spec:\n  type: {kind}\n  version: v1\n  metadata:\n{items}{extra}"
    )


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Sidecar]:
    require_server("redis", "127.0.0.1", 6379)
    r = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    r.flushdb()
    d = tmp_path_factory.mktemp("sdk-redis")
    (d / "secrets.json").write_text(json.dumps({"db-password": "s3cret", "forbidden": "no"}))
    host = {"redisHost": "127.0.0.1:6379", "redisDB": str(DB)}
    docs = [
        _component("secrets", "secretstores.local.file", {"secretsFile": str(d / "secrets.json")}),
        _component(
            "statestore",
            "state.redis",
            {**host, "outboxPublishPubsub": "pubsub", "outboxPublishTopic": f"out-{RUN}"},
        ),
        _component(
            "pubsub", "pubsub.redis", {**host, "processingTimeout": "3s", "redeliverInterval": "1s"}
        ),
        _component("config", "configuration.redis", host),
        _component("lock", "lock.redis", host),
    ]
    res = d / "res"
    res.mkdir()
    (res / "components.yaml").write_text("---\n".join(docs))
    (d / "config.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n"
        "  secrets:\n    scopes:\n    - storeName: secrets\n      defaultAccess: deny\n"
        "      allowedSecrets: [db-password]\n"
    )
    sc = start_sidecar(
        f"sdkredis-{RUN}",
        home=home,
        resources=[res],
        timeout=30,
        extra=["--config", str(d / "config.yaml")],
    )
    yield sc
    sc.proc.stop()
    r.flushdb()
    r.close()


@pytest.fixture
def client(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(sidecar.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(sidecar.grpc_port))
    with DaprClient() as d:
        yield d


def test_state_etags_bulk_transactions(client: DaprClient) -> None:
    client.save_state("statestore", "a", "1")
    item = client.get_state("statestore", "a")
    assert item.data == b"1" and item.etag.isdigit()  # Dapr redis etags are versions
    client.save_state("statestore", "a", "2", etag=item.etag)
    with pytest.raises(DaprGrpcError) as ei:
        client.save_state("statestore", "a", "3", etag=item.etag)
    assert ei.value.code() == grpc.StatusCode.ABORTED
    client.save_state("statestore", "b", "x")
    bulk = client.get_bulk_state("statestore", ["a", "b", "zz"]).items
    assert [(i.key, i.data) for i in bulk] == [("a", b"2"), ("b", b"x"), ("zz", b"")]


def test_outbox_publishes_on_commit(client: DaprClient) -> None:
    sub = client.subscribe("pubsub", f"out-{RUN}")
    try:
        client.execute_state_transaction(
            "statestore", [TransactionalStateOperation(key="order-1", data='{"n":1}')]
        )
        got = None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:
            msg = sub.next_message()
            if msg is not None:
                got = msg
                sub.respond_success(msg)
        assert got is not None, "the outbox event never arrived"
        assert got.data() == {"n": 1}
    finally:
        sub.close()


def test_secrets_with_scoping(client: DaprClient) -> None:
    assert client.get_secret("secrets", "db-password").secret == {"db-password": "s3cret"}
    with pytest.raises(grpc.RpcError) as ei:
        client.get_secret("secrets", "forbidden")
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_configuration_subscribe_receives_a_change(client: DaprClient) -> None:
    r = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    r.set(f"color-{RUN}", "blue||1")
    got = client.get_configuration("config", [f"color-{RUN}"])
    assert got.items[f"color-{RUN}"].value == "blue"
    changes: list[str] = []
    lock = threading.Lock()

    def handler(sub_id: str, resp: object) -> None:
        with lock:
            for k, v in resp.items.items():  # type: ignore[attr-defined]
                changes.append(f"{k}={v.value}")

    sub_id = client.subscribe_configuration("config", [f"color-{RUN}"], handler)
    assert sub_id
    r.set(f"color-{RUN}", "green||2")
    wait_until(lambda: f"color-{RUN}=green" in changes, 10, "the configuration change")
    assert client.unsubscribe_configuration("config", sub_id)
    r.close()


def test_lock_and_unlock(client: DaprClient) -> None:
    first = client.try_lock("lock", f"res-{RUN}", "owner-a", 30)
    assert first.success
    assert not client.try_lock("lock", f"res-{RUN}", "owner-b", 30).success
    assert client.unlock("lock", f"res-{RUN}", "owner-b").status.value == 2  # belongs to others
    assert client.unlock("lock", f"res-{RUN}", "owner-a").status.value == 0
    assert client.try_lock("lock", f"res-{RUN}", "owner-b", 30).success
