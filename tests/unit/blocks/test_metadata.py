"""MetadataBlock snapshot shape (omitempty, extended map) and the Health readiness checks."""

from __future__ import annotations

import pytest

from pillion import DAPR_RUNTIME_VERSION
from pillion.blocks.health import Health
from pillion.blocks.metadata import AppConnection, ComponentView, MetadataBlock
from pillion.errors import GrpcCode, PillionError

ACTOR_RUNTIME = {"runtimeStatus": "DISABLED", "placement": "placement: disconnected"}


def test_minimal_snapshot_omits_empty_members() -> None:
    snap = MetadataBlock("app", lambda: []).snapshot()
    assert snap == {
        "id": "app",
        "runtimeVersion": DAPR_RUNTIME_VERSION,
        "extended": {"daprRuntimeVersion": DAPR_RUNTIME_VERSION},
        "actorRuntime": ACTOR_RUNTIME,
    }


def test_components_with_and_without_capabilities() -> None:
    views = [
        ComponentView("statestore", "state.in-memory", "v1", ("ETAG", "TRANSACTIONAL")),
        ComponentView("plain", "state.sqlite", "v1"),
    ]
    snap = MetadataBlock("app", lambda: views).snapshot()
    assert snap["components"] == [
        {
            "name": "statestore",
            "type": "state.in-memory",
            "version": "v1",
            "capabilities": ["ETAG", "TRANSACTIONAL"],
        },
        {"name": "plain", "type": "state.sqlite", "version": "v1"},
    ]


def test_components_are_read_live() -> None:
    views: list[ComponentView] = []
    block = MetadataBlock("app", lambda: list(views))
    assert "components" not in block.snapshot()
    views.append(ComponentView("s", "state.in-memory", "v1"))
    assert [c["name"] for c in block.snapshot()["components"]] == ["s"]


def test_enabled_features() -> None:
    snap = MetadataBlock("app", lambda: [], enabled_features=("HotReload",)).snapshot()
    assert snap["enabledFeatures"] == ["HotReload"]


def test_extended_map_set() -> None:
    block = MetadataBlock("app", lambda: [])
    block.set("owner", "team-a")
    block.set("owner", "team-b")
    block.set("empty", "")
    assert block.snapshot()["extended"] == {
        "daprRuntimeVersion": DAPR_RUNTIME_VERSION,
        "owner": "team-b",
        "empty": "",
    }


def test_user_cannot_override_dapr_runtime_version() -> None:
    block = MetadataBlock("app", lambda: [])
    block.set("daprRuntimeVersion", "forged")
    assert block.snapshot()["extended"]["daprRuntimeVersion"] == DAPR_RUNTIME_VERSION


def test_app_connection_minimal() -> None:
    snap = MetadataBlock("app", lambda: [], AppConnection(0, "http", "127.0.0.1")).snapshot()
    assert snap["appConnectionProperties"] == {"protocol": "http", "channelAddress": "127.0.0.1"}


def test_app_connection_full() -> None:
    app = AppConnection(8080, "https", "10.0.0.1", 4, "/healthz", 5.0, 0.5, 3)
    snap = MetadataBlock("app", lambda: [], app).snapshot()
    assert snap["appConnectionProperties"] == {
        "port": 8080,
        "protocol": "https",
        "channelAddress": "10.0.0.1",
        "maxConcurrency": 4,
        "health": {
            "healthCheckPath": "/healthz",
            "healthProbeInterval": "5s",
            "healthProbeTimeout": "500ms",
            "healthThreshold": 3,
        },
    }


def test_app_connection_fractional_seconds() -> None:
    app = AppConnection(8080, "http", "127.0.0.1", -1, "/h", 1.5, 0.25, 1)
    props = MetadataBlock("app", lambda: [], app).snapshot()["appConnectionProperties"]
    assert "maxConcurrency" not in props
    assert props["health"]["healthProbeInterval"] == "1.5s"
    assert props["health"]["healthProbeTimeout"] == "250ms"


@pytest.mark.parametrize(("seconds", "go"), [(90.0, "1m30s"), (0.0, "0s")])
def test_probe_durations_use_go_duration_format(seconds: float, go: str) -> None:
    app = AppConnection(8080, "http", "127.0.0.1", -1, "/h", seconds, 0.5, 1)
    props = MetadataBlock("app", lambda: [], app).snapshot()["appConnectionProperties"]
    assert props["health"]["healthProbeInterval"] == go


# --- health -----------------------------------------------------------------------------------


def test_health_not_ready_then_ready() -> None:
    h = Health("app")
    with pytest.raises(PillionError) as info:
        h.check()
    err = info.value
    assert (err.code, err.http_status, err.grpc_code) == (
        "ERR_HEALTH_NOT_READY",
        500,
        GrpcCode.INTERNAL,
    )
    assert err.message.startswith("dapr is not ready: ")
    assert "components" in err.message and "app" in err.message
    h.ready = True
    h.check()
    h.check("app")


def test_health_not_ready_message_uses_go_list_format() -> None:
    with pytest.raises(PillionError) as info:
        Health("app").check()
    assert info.value.message == "dapr is not ready: [components app]"


def test_health_not_ready_is_checked_before_appid() -> None:
    with pytest.raises(PillionError) as info:
        Health("app").check("other")
    assert info.value.code == "ERR_HEALTH_NOT_READY"


def test_health_appid_mismatch_when_ready() -> None:
    h = Health("app", ready=True)
    with pytest.raises(PillionError) as info:
        h.check("other")
    err = info.value
    assert (err.code, err.http_status) == ("ERR_HEALTH_APPID_NOT_MATCH", 500)
    assert err.message == "dapr app-id does not match"


def test_health_outbound() -> None:
    h = Health("app")
    with pytest.raises(PillionError) as info:
        h.check_outbound()
    assert (info.value.code, info.value.http_status, info.value.message) == (
        "ERR_OUTBOUND_HEALTH_NOT_READY",
        500,
        "dapr outbound is not ready",
    )
    h.outbound_ready = True
    h.check_outbound()
    # Outbound readiness does not imply full readiness.
    with pytest.raises(PillionError):
        h.check()
