"""Tests for the Dapr resource loader, the typed model and metadata placeholders."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import textwrap
import uuid
from pathlib import Path

import pytest

from pillion.manifests.loader import load_configuration, load_resources
from pillion.manifests.model import (
    DEFAULT_SAMPLING_RATE,
    Component,
    Configuration,
    ManifestError,
    MetadataItem,
    SecretKeyRef,
    merge_configurations,
)
from pillion.manifests.placeholders import expand, expand_env


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def component_yaml(name: str, *, type_: str = "state.in-memory", extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata:
          name: {name}
        spec:
          type: {type_}
          version: v1
        """
    ) + textwrap.dedent(extra)


def one_value(tmp_path: Path, value_yaml: str) -> str:
    """The stringified value of a single metadata item written as `value: <value_yaml>`."""
    write(
        tmp_path,
        "c.yaml",
        component_yaml("c") + f"  metadata:\n  - name: v\n    value: {value_yaml}\n",
    )
    res = load_resources([tmp_path], app_id="app", env={})
    return res.components[0].properties({})["v"]


# --- loading ------------------------------------------------------------------------------------


def test_full_component_is_typed(tmp_path: Path) -> None:
    write(
        tmp_path,
        "statestore.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata:
          name: statestore
          namespace: default
        spec:
          type: state.redis
          version: v2
          initTimeout: 1m30s
          ignoreErrors: true
          metadata:
          - name: redisHost
            value: localhost:6379
          - name: redisPassword
            secretKeyRef: {name: redis-secret, key: password}
          - name: apiKey
            envRef: MY_KEY
          - name: actorStateStore
            value: "true"
        auth:
          secretStore: localsecretstore
        scopes: [app1, app2]
        """,
    )
    res = load_resources([tmp_path], app_id="app1", env={})
    (comp,) = res.components
    assert comp == Component(
        name="statestore",
        namespace="default",
        type="state.redis",
        version="v2",
        init_timeout=90.0,
        ignore_errors=True,
        metadata=(
            MetadataItem("redisHost", value="localhost:6379"),
            MetadataItem("redisPassword", secret_key_ref=SecretKeyRef("redis-secret", "password")),
            MetadataItem("apiKey", env_ref="MY_KEY"),
            MetadataItem("actorStateStore", value="true"),
        ),
        auth_secret_store="localsecretstore",
        scopes=("app1", "app2"),
        source=f"{tmp_path}/statestore.yaml#1",
    )
    assert comp.category == "state"
    assert comp.properties({"MY_KEY": "k"}) == {
        "redisHost": "localhost:6379",
        "apiKey": "k",
        "actorStateStore": "true",
    }
    assert comp.secret_refs() == (("redisPassword", SecretKeyRef("redis-secret", "password")),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        comp.name = "other"  # type: ignore[misc]


def test_defaults_for_optional_component_fields(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: c}
        spec: {type: pubsub.in-memory}
        """,
    )
    (comp,) = load_resources([tmp_path], app_id="a").components
    assert comp.version == "v1"
    assert comp.init_timeout is None
    assert comp.ignore_errors is False
    assert comp.metadata == ()
    assert comp.auth_secret_store is None
    assert comp.scopes == ()
    assert comp.namespace == ""


def test_multi_document_file_with_every_kind(tmp_path: Path) -> None:
    write(
        tmp_path,
        "all.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: statestore}
        spec: {type: state.in-memory, version: v1}
        ---
        # a Kubernetes object in the same folder is skipped like daprd does
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec: {replicas: 3}
        ---
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Configuration
        metadata: {name: cfg}
        spec:
          tracing: {samplingRate: "1"}
        ---
        apiVersion: dapr.io/v2alpha1
        kind: Subscription
        metadata: {name: sub}
        spec: {pubsubname: pubsub, topic: orders, routes: {default: /orders}}
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Resiliency
        metadata: {name: res}
        spec:
          policies: {timeouts: {general: 5s}}
        ---
        apiVersion: dapr.io/v1alpha1
        kind: HTTPEndpoint
        metadata: {name: github}
        spec: {baseUrl: https://api.github.com}
        """,
    )
    res = load_resources([tmp_path / "all.yaml"], app_id="a")
    file = str(tmp_path / "all.yaml")
    assert [c.name for c in res.components] == ["statestore"]
    assert res.components[0].source == f"{file}#1"
    # Document numbers count the empty document too, so they match what a reader counts.
    assert [(c.name, c.source) for c in res.configurations] == [("cfg", f"{file}#4")]
    assert [(s.name, s.source) for s in res.subscriptions] == [("sub", f"{file}#5")]
    assert res.other == (("Resiliency", f"{file}#6"), ("HTTPEndpoint", f"{file}#7"))
    assert res.raw[0]["spec"] == {"policies": {"timeouts": {"general": "5s"}}}
    assert res.raw[1]["spec"]["baseUrl"] == "https://api.github.com"
    assert [src for src, _ in res.of_kind("Resiliency")] == [f"{file}#6"]
    assert res.component("statestore") is res.components[0]
    assert res.component("missing") is None


def test_folder_reads_yaml_and_yml_sorted_not_recursive(tmp_path: Path) -> None:
    write(tmp_path, "res/b.yml", component_yaml("b"))
    write(tmp_path, "res/a.yaml", component_yaml("a"))
    write(tmp_path, "res/C.YAML", component_yaml("upper"))
    write(tmp_path, "res/notes.txt", "not: yaml [")
    write(tmp_path, "res/nested/d.yaml", component_yaml("nested"))
    (tmp_path / "res" / "dir.yaml").mkdir()
    res = load_resources([tmp_path / "res"], app_id="app")
    assert [c.name for c in res.components] == ["upper", "a", "b"]
    assert res.components[1].source == f"{tmp_path / 'res' / 'a.yaml'}#1"


def test_several_paths_folder_and_file(tmp_path: Path) -> None:
    write(tmp_path, "one/a.yaml", component_yaml("a"))
    extra = write(tmp_path, "two/extra.yaml", component_yaml("x"))
    write(tmp_path, "two/ignored.yaml", component_yaml("not-read"))
    res = load_resources([tmp_path / "one", str(extra)], app_id="app")
    assert [c.name for c in res.components] == ["a", "x"]


def test_same_file_through_folder_and_file_is_read_once(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", component_yaml("a"))
    res = load_resources([tmp_path, f], app_id="app")
    assert [c.name for c in res.components] == ["a"]


def test_empty_folder_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path, "blank.yaml", "# only a comment\n---\n")
    res = load_resources([tmp_path / "empty", tmp_path / "blank.yaml"], app_id="a")
    assert res.components == () and res.subscriptions == () and res.configurations == ()
    assert res.other == ()


def test_unknown_dapr_kind_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(
        tmp_path,
        "x.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: MCPServer
        metadata: {name: m}
        """,
    )
    with caplog.at_level(logging.WARNING, logger="pillion.manifests.loader"):
        res = load_resources([tmp_path], app_id="a")
    assert res.other == ()
    assert "MCPServer" in caplog.text


# --- scoping ------------------------------------------------------------------------------------


def test_scopes_filter_components_subscriptions_and_other(tmp_path: Path) -> None:
    write(
        tmp_path,
        "r.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: mine}
        spec: {type: state.in-memory}
        scopes: [app1, app2]
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: theirs}
        spec: {type: state.in-memory}
        scopes: [other]
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: everyone}
        spec: {type: state.in-memory}
        scopes: []
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Subscription
        metadata: {name: s1}
        spec: {pubsubname: p, topic: t, route: /a}
        scopes: [other]
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Subscription
        metadata: {name: s2}
        spec: {pubsubname: p, topic: t, route: /b}
        scopes: [app1]
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Resiliency
        metadata: {name: r}
        spec: {}
        scopes: [other]
        """,
    )
    res = load_resources([tmp_path], app_id="app1")
    assert [c.name for c in res.components] == ["mine", "everyone"]
    assert [s.name for s in res.subscriptions] == ["s2"]
    assert res.other == ()
    res2 = load_resources([tmp_path], app_id="other")
    assert [c.name for c in res2.components] == ["theirs", "everyone"]
    assert [s.name for s in res2.subscriptions] == ["s1"]
    assert [k for k, _ in res2.other] == ["Resiliency"]


def test_namespace_filters_components_pinned_elsewhere(tmp_path: Path) -> None:
    write(
        tmp_path,
        "r.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: here, namespace: prod}
        spec: {type: state.in-memory}
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: there, namespace: dev}
        spec: {type: state.in-memory}
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Component
        metadata: {name: anywhere}
        spec: {type: state.in-memory}
        """,
    )
    assert [
        c.name for c in load_resources([tmp_path], app_id="a", namespace="prod").components
    ] == [
        "here",
        "anywhere",
    ]
    # No sidecar namespace: nothing is filtered by namespace.
    assert len(load_resources([tmp_path], app_id="a").components) == 3


# --- metadata values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("localhost:6379", "localhost:6379"),
        ('"quoted"', "quoted"),
        ("5", "5"),
        ("-12", "-12"),
        ("1.5", "1.5"),
        ("1.50", "1.50"),
        ("0.0001", "0.0001"),
        ("true", "true"),
        ("false", "false"),
        ("True", "true"),
        ("yes", "true"),
        ("0x10", "16"),
        ('"0x10"', "0x10"),
        ("null", ""),
        ("''", ""),
        ("2024-01-02", "2024-01-02"),
        ("[1, two, 3.5]", '[1,"two",3.5]'),
        ("{a: 1, b: [true, null]}", '{"a":1,"b":[true,null]}'),
        ('{"unicode": "é"}', '{"unicode":"é"}'),
    ],
)
def test_values_are_stringified(tmp_path: Path, written: str, expected: str) -> None:
    assert one_value(tmp_path, written) == expected


def test_missing_value_is_empty_string(tmp_path: Path) -> None:
    write(tmp_path, "c.yaml", component_yaml("c") + "  metadata:\n  - name: flag\n")
    (comp,) = load_resources([tmp_path], app_id="a").components
    assert comp.metadata == (MetadataItem("flag", value=""),)
    assert comp.properties({}) == {"flag": ""}


def test_secret_key_ref_key_defaults_to_name_like_daprd(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        component_yaml("c")
        + "  metadata:\n  - name: pw\n    secretKeyRef:\n      name: redis-password\n",
    )
    (comp,) = load_resources([tmp_path], app_id="a").components
    assert comp.secret_refs() == (("pw", SecretKeyRef("redis-password", "redis-password")),)
    assert comp.properties({}) == {}


def test_env_ref_resolved_and_missing_env_names_file_component_and_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        "apiVersion: v1\nkind: Service\n---\n"
        + component_yaml("c")
        + "  metadata:\n  - name: a\n    value: x\n  - name: key\n    envRef: MY_KEY\n",
    )
    (comp,) = load_resources([tmp_path], app_id="a").components
    assert comp.properties({"MY_KEY": "secret"}) == {"a": "x", "key": "secret"}
    with pytest.raises(ManifestError) as info:
        comp.properties({})
    err = info.value
    assert (err.file, err.document, err.field) == (
        str(tmp_path / "c.yaml"),
        2,
        "spec.metadata[1].envRef",
    )
    assert "'c'" in str(err) and "MY_KEY" in str(err)
    assert str(err).startswith(f"{tmp_path / 'c.yaml'}: document 2: spec.metadata[1].envRef: ")


# --- placeholders -------------------------------------------------------------------------------


def test_uuid_placeholder_is_fresh_per_occurrence(tmp_path: Path) -> None:
    value = one_value(tmp_path, '"{uuid}/{uuid}"')
    first, second = value.split("/")
    assert uuid.UUID(first) != uuid.UUID(second)


def test_app_id_and_namespace_placeholders(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        component_yaml("c")
        + "  metadata:\n  - name: consumerID\n    value: '{appID}-{namespace}'\n"
        + "  - name: json\n    value: {group: '{appID}'}\n",
    )
    res = load_resources([tmp_path], app_id="orders", namespace="prod", env={})
    assert res.components[0].properties({}) == {
        "consumerID": "orders-prod.orders",
        "json": '{"group":"orders"}',
    }
    # daprd writes "namespace.appID" even with no namespace; keep its exact output.
    res = load_resources([tmp_path], app_id="orders", env={})
    assert res.components[0].properties({})["consumerID"] == "orders-.orders"


def test_pod_name_placeholder(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        component_yaml("c") + "  metadata:\n  - name: x\n  - name: id\n    value: pod-{podName}\n",
    )
    res = load_resources([tmp_path], app_id="a", env={"POD_NAME": "web-1"})
    assert res.components[0].properties({})["id"] == "pod-web-1"
    with pytest.raises(ManifestError) as info:
        load_resources([tmp_path], app_id="a", env={})
    assert info.value.field == "spec.metadata[1].value"
    assert info.value.document == 1
    assert "POD_NAME" in str(info.value)


def test_out_of_scope_component_does_not_need_pod_name(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        component_yaml("c", extra="scopes: [someone-else]\n").replace(
            "  version: v1\n", "  version: v1\n  metadata:\n  - name: id\n    value: '{podName}'\n"
        ),
    )
    assert load_resources([tmp_path], app_id="a", env={}).components == ()


def test_expand_helpers() -> None:
    assert expand("plain", app_id="a", namespace="n", env={}) == "plain"
    assert expand("{appID}.{namespace}", app_id="a", namespace="n", env={}) == "a.n.a"
    env = {"HOST": "h", "PORT": "1"}
    assert expand_env("${HOST}:$PORT/$MISSING/${}/$ cost $", env) == "h:1///$ cost $"
    assert expand_env("no dollars", env) == "no dollars"


# --- duplicates ---------------------------------------------------------------------------------


def test_duplicate_component_names_name_both_sources(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", component_yaml("store"))
    write(tmp_path, "b.yaml", "kind: Other\n---\n" + component_yaml("store"))
    with pytest.raises(ManifestError) as info:
        load_resources([tmp_path], app_id="app")
    err = info.value
    assert err.file == str(tmp_path / "b.yaml")
    assert err.document == 2
    assert err.field == "metadata.name"
    assert f"{tmp_path / 'a.yaml'}#1" in str(err)


def test_duplicate_names_are_fine_when_one_is_scoped_out(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", component_yaml("store", extra="scopes: [x]\n"))
    write(tmp_path, "b.yaml", component_yaml("store", extra="scopes: [y]\n"))
    assert [c.source for c in load_resources([tmp_path], app_id="y").components] == [
        f"{tmp_path / 'b.yaml'}#1"
    ]


# --- subscriptions ------------------------------------------------------------------------------


def test_subscription_v1_route(tmp_path: Path) -> None:
    write(
        tmp_path,
        "s.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Subscription
        metadata: {name: s}
        spec:
          pubsubname: pubsub
          topic: orders
          route: /orders
          deadLetterTopic: poison
          metadata: {rawPayload: true, maxLen: 10}
        scopes: [app]
        """,
    )
    (sub,) = load_resources([tmp_path], app_id="app").subscriptions
    assert sub.api_version == "dapr.io/v1alpha1"
    assert (sub.pubsubname, sub.topic, sub.route, sub.rules) == ("pubsub", "orders", "/orders", ())
    assert sub.default_path == "/orders"
    assert sub.dead_letter_topic == "poison"
    assert sub.metadata == {"rawPayload": "true", "maxLen": "10"}
    assert sub.bulk_subscribe == {}
    assert sub.scopes == ("app",)


def test_subscription_v2_routes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "s.yaml",
        """
        apiVersion: dapr.io/v2alpha1
        kind: Subscription
        metadata: {name: order-sub}
        spec:
          pubsubname: pubsub
          topic: orders
          route: /ignored-when-default-set
          routes:
            rules:
            - {match: 'event.type == "order.v2"', path: /orders/v2}
            - {path: /always}
            default: /orders
          bulkSubscribe: {enabled: true, maxMessagesCount: 100, maxAwaitDurationMs: 40}
        """,
    )
    (sub,) = load_resources([tmp_path], app_id="x").subscriptions
    assert [(r.match, r.path) for r in sub.rules] == [
        ('event.type == "order.v2"', "/orders/v2"),
        ("", "/always"),
    ]
    assert sub.default_route == "/orders"
    assert sub.default_path == "/orders"  # routes.default wins over route (§3.5)
    assert sub.bulk_subscribe == {
        "enabled": True,
        "maxMessagesCount": 100,
        "maxAwaitDurationMs": 40,
    }
    assert type(sub.bulk_subscribe["maxMessagesCount"]) is int


def test_subscription_with_only_rules(tmp_path: Path) -> None:
    write(
        tmp_path,
        "s.yaml",
        """
        apiVersion: dapr.io/v2alpha1
        kind: Subscription
        metadata: {name: s}
        spec: {pubsubname: p, topic: t, routes: {rules: [{match: 'true', path: /a}]}}
        """,
    )
    (sub,) = load_resources([tmp_path], app_id="x").subscriptions
    assert sub.default_path is None


# --- configuration ------------------------------------------------------------------------------


def test_configuration_accessors(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path,
        "config.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Configuration
        metadata: {name: daprConfig}
        spec:
          tracing: {samplingRate: "0.5"}
          metrics: {enabled: false}
          logging: {apiLogging: {enabled: true}}
          features:
          - {name: ActorStateTTL, enabled: true}
          - {name: HotReload, enabled: false}
          nameResolution: {component: sqlite, configuration: {connectionString: x.db}}
          mtls: {enabled: false, workloadCertTTL: 24h}
        """,
    )
    cfg = load_configuration([cfg_file], env={})
    assert cfg.name == "daprConfig"
    assert cfg.source == f"{cfg_file}#1"
    assert cfg.tracing_sampling_rate == 0.5
    assert cfg.metrics_enabled is False
    assert cfg.api_logging is True
    assert cfg.features["ActorStateTTL"] is True
    assert cfg.features["HotReload"] is False
    assert cfg.feature_enabled("WorkflowsRemoteActivityReminder") is True
    assert cfg.feature_enabled("Unknown") is False
    assert cfg.name_resolution == {
        "component": "sqlite",
        "configuration": {"connectionString": "x.db"},
    }
    assert cfg.spec["mtls"] == {"enabled": False, "workloadCertTTL": "24h"}


@pytest.mark.parametrize(
    ("tracing", "rate"),
    [
        ({}, DEFAULT_SAMPLING_RATE),
        ({"tracing": {}}, DEFAULT_SAMPLING_RATE),
        ({"tracing": {"samplingRate": "1"}}, 1.0),
        ({"tracing": {"samplingRate": "0"}}, 0.0),
        ({"tracing": {"samplingRate": 1}}, 1.0),
        ({"tracing": {"samplingRate": "abc"}}, DEFAULT_SAMPLING_RATE),
        ({"tracing": {"samplingRate": "2"}}, DEFAULT_SAMPLING_RATE),
        ({"tracing": {"samplingRate": "nan"}}, DEFAULT_SAMPLING_RATE),
        ({"tracing": {"samplingRate": True}}, DEFAULT_SAMPLING_RATE),
        ({"tracing": "bad"}, DEFAULT_SAMPLING_RATE),
    ],
)
def test_sampling_rate(tracing: dict[str, object], rate: float) -> None:
    assert Configuration(spec=tracing).tracing_sampling_rate == rate


def test_configuration_defaults() -> None:
    cfg = Configuration()
    assert cfg.tracing_sampling_rate == DEFAULT_SAMPLING_RATE
    assert cfg.metrics_enabled is True
    assert cfg.api_logging is False
    assert cfg.name_resolution is None
    assert cfg.features == {"HotReload": True, "WorkflowsRemoteActivityReminder": True}
    assert Configuration(spec={"metric": {"enabled": False}}).metrics_enabled is False
    assert load_configuration([]) == Configuration()


def test_merge_configurations() -> None:
    a = Configuration(
        name="a",
        source="a.yaml#1",
        spec={
            "tracing": {"samplingRate": "1"},
            "metrics": {"enabled": False},
            "features": [{"name": "A", "enabled": True}, {"name": "B", "enabled": True}],
        },
    )
    b = Configuration(
        name="b",
        source="b.yaml#1",
        spec={"tracing": {"stdout": True}, "features": [{"name": "B", "enabled": False}]},
    )
    merged = merge_configurations([a, b])
    assert merged.name == "b"
    assert merged.source == "a.yaml#1, b.yaml#1"
    # Top-level keys are replaced whole: b's tracing has no samplingRate.
    assert merged.spec["tracing"] == {"stdout": True}
    assert merged.tracing_sampling_rate == DEFAULT_SAMPLING_RATE
    assert merged.metrics_enabled is False
    assert merged.features["A"] is True
    assert merged.features["B"] is False
    assert merge_configurations([a]) is a
    assert merge_configurations([]) == Configuration()


def test_load_configuration_merges_files_and_expands_env(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "one.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Configuration
        metadata: {name: one}
        spec:
          features: [{name: A, enabled: true}]
          tracing: {zipkin: {endpointAddress: "${ZIPKIN}"}}
        """,
    )
    second = write(
        tmp_path,
        "two.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        ---
        apiVersion: dapr.io/v1alpha1
        kind: Configuration
        metadata: {name: two}
        spec:
          features: [{name: B, enabled: true}]
        """,
    )
    cfg = load_configuration([first, second], env={"ZIPKIN": "http://z:9411"})
    assert cfg.name == "two"
    assert cfg.features["A"] and cfg.features["B"]
    assert cfg.spec["tracing"] == {"zipkin": {"endpointAddress": "http://z:9411"}}


def test_configurations_in_resources_folder_are_kept(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        """
        apiVersion: dapr.io/v1alpha1
        kind: Configuration
        metadata: {name: c}
        """,
    )
    (cfg,) = load_resources([tmp_path], app_id="a").configurations
    assert cfg.spec == {}


def test_load_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="Configuration file not found"):
        load_configuration([tmp_path / "missing.yaml"])
    with pytest.raises(ManifestError, match="is a folder"):
        load_configuration([tmp_path])
    no_cfg = write(tmp_path, "c.yaml", component_yaml("c"))
    with pytest.raises(ManifestError) as info:
        load_configuration([no_cfg])
    assert str(info.value).startswith(f"{no_cfg}: no Configuration document")


# --- errors -------------------------------------------------------------------------------------


def test_error_message_format(tmp_path: Path) -> None:
    folder = tmp_path / "components"
    write(
        folder,
        "statestore.yaml",
        "apiVersion: v1\nkind: Service\n---\n"
        + component_yaml("s")
        + "  metadata:\n  - name: a\n    value: b\n  - value: c\n",
    )
    with pytest.raises(ManifestError) as info:
        load_resources([folder], app_id="a")
    assert str(info.value) == (
        f"{folder / 'statestore.yaml'}: document 2: spec.metadata[1].name: is required"
    )
    assert (
        ManifestError("f.yaml", None, None, "file not found").__str__() == "f.yaml: file not found"
    )
    assert str(ManifestError("f.yaml", 3, None, "x")) == "f.yaml: document 3: x"


def test_manifest_error_pickles() -> None:
    err = ManifestError("f.yaml", 2, "spec.type", "is required")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.file, copy.document, copy.field, copy.message) == (
        "f.yaml",
        2,
        "spec.type",
        "is required",
    )
    assert str(copy) == str(err)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_resources([tmp_path / "nope"], app_id="a")
    assert str(info.value) == f"{tmp_path / 'nope'}: no such file or folder"


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", component_yaml("ok") + "---\nkind: Component\n  name: [oops\n")
    with pytest.raises(ManifestError) as info:
        load_resources([tmp_path], app_id="a")
    err = info.value
    assert err.file == str(tmp_path / "bad.yaml")
    assert err.document == 2
    assert "line 10, column 7" in err.message


def test_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_resources([tmp_path], app_id="a")


COMPONENT_HEAD = "apiVersion: dapr.io/v1alpha1\nkind: Component\n"
GOOD_META = "metadata: {name: c}\n"


# (yaml text, document, field, message fragment) for each error class the loader reports.
ERROR_CASES: list[tuple[str, int | None, str | None, str]] = [
    ("- a\n- b\n", 1, None, "must be a mapping"),
    ("just a string\n", 1, None, "must be a mapping"),
    (
        "---\n" + COMPONENT_HEAD + GOOD_META + "spec: {type: state.x}\n---\n- 1\n",
        2,
        None,
        "mapping",
    ),
    ("apiVersion: dapr.io/v1alpha1\nmetadata: {name: c}\n", 1, "kind", "is required"),
    ("apiVersion: dapr.io/v1\nkind: Component\n" + GOOD_META, 1, "apiVersion", "dapr.io/v1alpha1"),
    ("apiVersion: dapr.io/v2alpha1\nkind: Component\n" + GOOD_META, 1, "apiVersion", "Component"),
    (COMPONENT_HEAD + "spec: {type: state.x}\n", 1, "metadata.name", "is required"),
    (COMPONENT_HEAD + "metadata: [a]\nspec: {type: state.x}\n", 1, "metadata", "must be a mapping"),
    (COMPONENT_HEAD + "metadata: {}\nspec: {type: state.x}\n", 1, "metadata.name", "is required"),
    (COMPONENT_HEAD + "metadata: {name: 5}\nspec: {type: state.x}\n", 1, "metadata.name", "string"),
    (
        COMPONENT_HEAD + "metadata: {name: a/b}\nspec: {type: state.x}\n",
        1,
        "metadata.name",
        "valid",
    ),
    (
        COMPONENT_HEAD + "metadata: {name: '..'}\nspec: {type: state.x}\n",
        1,
        "metadata.name",
        "valid",
    ),
    (
        COMPONENT_HEAD + "metadata: {name: c, namespace: [x]}\nspec: {type: state.x}\n",
        1,
        "metadata.namespace",
        "string",
    ),
    (COMPONENT_HEAD + GOOD_META, 1, "spec", "is required"),
    (COMPONENT_HEAD + GOOD_META + "spec: state.redis\n", 1, "spec", "must be a mapping"),
    (COMPONENT_HEAD + GOOD_META + "spec: {version: v1}\n", 1, "spec.type", "is required"),
    (COMPONENT_HEAD + GOOD_META + "spec: {type: redis}\n", 1, "spec.type", "<category>.<kind>"),
    (COMPONENT_HEAD + GOOD_META + "spec: {type: 'state redis'}\n", 1, "spec.type", "category"),
    (COMPONENT_HEAD + GOOD_META + "spec: {type: [state.x]}\n", 1, "spec.type", "string"),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, version: 1}\n",
        1,
        "spec.version",
        "string",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, initTimeout: soon}\n",
        1,
        "spec.initTimeout",
        "duration",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, initTimeout: 5}\n",
        1,
        "spec.initTimeout",
        "duration",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, initTimeout: '-5s'}\n",
        1,
        "spec.initTimeout",
        "duration",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, ignoreErrors: 'yes'}\n",
        1,
        "spec.ignoreErrors",
        "true or false",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: {a: b}}\n",
        1,
        "spec.metadata",
        "must be a list",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: [a]}\n",
        1,
        "spec.metadata[0]",
        "must be a mapping",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: [{value: 1}]}\n",
        1,
        "spec.metadata[0].name",
        "is required",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: [{name: [a]}]}\n",
        1,
        "spec.metadata[0].name",
        "string",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, secretKeyRef: s}]}\n",
        1,
        "spec.metadata[0].secretKeyRef",
        "mapping",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, secretKeyRef: {key: k}}]}\n",
        1,
        "spec.metadata[0].secretKeyRef.name",
        "is required",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, secretKeyRef: {name: n, key: 3}}]}\n",
        1,
        "spec.metadata[0].secretKeyRef.key",
        "string",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: [{name: a, envRef: 5}]}\n",
        1,
        "spec.metadata[0].envRef",
        "string",
    ),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x, metadata: [{name: a, envRef: ''}]}\n",
        1,
        "spec.metadata[0].envRef",
        "environment variable",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, value: v, envRef: E}]}\n",
        1,
        "spec.metadata[0]",
        "only one of",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, envRef: E, secretKeyRef: {name: s}}]}\n",
        1,
        "spec.metadata[0]",
        "only one of",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, value: !!binary aGk=}]}\n",
        1,
        "spec.metadata[0].value",
        "bytes",
    ),
    (
        COMPONENT_HEAD
        + GOOD_META
        + "spec: {type: state.x, metadata: [{name: a, value: &x [*x]}]}\n",
        1,
        "spec.metadata[0].value",
        "JSON",
    ),
    (COMPONENT_HEAD + GOOD_META + "spec: {type: state.x}\nscopes: app1\n", 1, "scopes", "list"),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x}\nscopes: [a, 1]\n",
        1,
        "scopes[1]",
        "string",
    ),
    (COMPONENT_HEAD + GOOD_META + "spec: {type: state.x}\nauth: vault\n", 1, "auth", "mapping"),
    (
        COMPONENT_HEAD + GOOD_META + "spec: {type: state.x}\nauth: {secretStore: [v]}\n",
        1,
        "auth.secretStore",
        "string",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {topic: t, route: /a}\n",
        1,
        "spec.pubsubname",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p}\n",
        1,
        "spec.topic",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t}\n",
        1,
        "spec.routes",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t}\n",
        1,
        "spec.route",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t, routes: [a]}\n",
        1,
        "spec.routes",
        "mapping",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t, routes: {rules: [{match: x}]}}\n",
        1,
        "spec.routes.rules[0].path",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t, route: /a, bulkSubscribe: {enabled: 'on'}}\n",
        1,
        "spec.bulkSubscribe.enabled",
        "true or false",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t, route: /a, bulkSubscribe: {maxMessagesCount: x}}\n",
        1,
        "spec.bulkSubscribe.maxMessagesCount",
        "integer",
    ),
    (
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\n"
        + GOOD_META
        + "spec: {pubsubname: p, topic: t, route: /a, metadata: [x]}\n",
        1,
        "spec.metadata",
        "mapping",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n" + GOOD_META + "spec: [a]\n",
        1,
        "spec",
        "mapping",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n"
        + GOOD_META
        + "spec: {features: [{enabled: true}]}\n",
        1,
        "spec.features[0].name",
        "is required",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n"
        + GOOD_META
        + "spec: {features: [{name: A, enabled: 'yes'}]}\n",
        1,
        "spec.features[0].enabled",
        "true or false",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n"
        + GOOD_META
        + "spec: {metrics: {enabled: 1}}\n",
        1,
        "spec.metrics.enabled",
        "true or false",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n"
        + GOOD_META
        + "spec: {logging: {apiLogging: true}}\n",
        1,
        "spec.logging.apiLogging",
        "mapping",
    ),
    (
        "apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nspec: {}\n",
        1,
        "metadata.name",
        "is required",
    ),
    ("key: [unclosed\n", 1, None, "line 2, column 1"),
    ("a: b\n  c: d\n", 1, None, "line 2, column 4"),
    ("a: !!python/object:os.system x\n", 1, None, "line 1, column 4"),
    ("{a: 1, [b]: 2}\n", 1, None, "unhashable"),
    ("a: 'unclosed\n", 1, None, "line 2, column 1"),
]


@pytest.mark.parametrize(("text", "document", "field", "fragment"), ERROR_CASES)
def test_each_error_class_names_file_document_and_field(
    tmp_path: Path, text: str, document: int | None, field: str | None, fragment: str
) -> None:
    path = write(tmp_path, "components/broken.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_resources([tmp_path / "components"], app_id="a", env={})
    err = info.value
    assert err.file == str(path)
    assert err.document == document
    assert err.field == field
    assert fragment in err.message
    message = str(err)
    assert message.startswith(f"{path}: ")
    if document is not None:
        assert f": document {document}: " in message
    if field is not None:
        assert f": {field}: " in message


# Mutations of a valid manifest: wrong types, nulls and odd shapes in every position. Each must
# come out as a ManifestError naming the file (or load cleanly), never as another exception.
VALID = textwrap.dedent(
    """\
    apiVersion: dapr.io/v1alpha1
    kind: Component
    metadata:
      name: statestore
      namespace: default
    spec:
      type: state.redis
      version: v1
      initTimeout: 5s
      ignoreErrors: false
      metadata:
      - name: redisHost
        value: localhost:6379
      - name: redisPassword
        secretKeyRef:
          name: redis-secret
          key: password
      - name: apiKey
        envRef: API_KEY
    auth:
      secretStore: local
    scopes:
    - app
    """
)
REPLACEMENTS = ["null", "[]", "{}", "7", "true", "'x'", "[[1]]", "{a: {b: c}}", "!!binary aGk="]
MALFORMED = [
    VALID.replace(line, line.split(":")[0] + ": " + repl, 1)
    for line in VALID.splitlines()
    if ":" in line and not line.strip().startswith("- name") and line.split(":")[1].strip()
    for repl in REPLACEMENTS
] + [
    VALID.replace("spec:", "spec: 5\nx:"),
    VALID.replace("- name: redisHost", "- 5"),
    VALID.replace("- name: redisHost", "- [redisHost]"),
    VALID.replace("- name: redisHost", "- null"),
    VALID.replace("scopes:\n- app", "scopes:\n- {a: b}"),
    VALID + "---\n- list\n",
    VALID + "---\n42\n",
    VALID + "---\n" + VALID,
    VALID.replace("    value: localhost:6379", "  value: localhost:6379"),
    VALID[: len(VALID) // 2] + "[",
    "[" * 5000,
    "&a [*a, *a]\n",
    "apiVersion: dapr.io/v1alpha1\nkind: [Component]\n",
    "apiVersion: dapr.io/v1alpha1\nkind: Subscription\nmetadata: {name: s}\nspec: 5\n",
    "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s}\n"
    "spec: {pubsubname: p, topic: t, routes: {rules: 5}}\n",
    "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s}\n"
    "spec: {pubsubname: p, topic: t, routes: {rules: [5]}}\n",
    "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s}\n"
    "spec: {pubsubname: p, topic: t, routes: {default: [x]}}\n",
    "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s}\n"
    "spec: {pubsubname: p, topic: t, route: /a, metadata: {1: a}}\n",
    "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: 5\n",
    "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nspec: {features: 5}\n",
    "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nspec: {features: [5]}\n",
    "apiVersion: dapr.io/v1alpha1\nkind: HTTPEndpoint\nmetadata: {name: h}\nscopes: {a: b}\n",
]


def test_malformed_variants_are_generated() -> None:
    assert len(MALFORMED) > 100


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_manifests_fail_cleanly(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "res/m.yaml", text)
    try:
        res = load_resources([tmp_path / "res"], app_id="app", env={})
    except ManifestError as err:
        assert str(path) in str(err)
        return
    # Some substitutions are legal (an empty version, a null namespace); the result must still
    # be usable without surprises.
    for comp in res.components:
        try:
            comp.properties({"API_KEY": "k"})
        except ManifestError as err:
            assert str(path) in str(err)
