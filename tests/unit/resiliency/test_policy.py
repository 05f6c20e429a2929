"""Resiliency documents: parsing errors with field paths, scopes, merging and target resolution."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pillion.manifests.loader import load_resources
from pillion.manifests.model import ManifestError
from pillion.resiliency import BUILTIN_POLICIES, Resiliency
from pillion.resiliency.policy import parse_go_duration


def doc(
    spec: Mapping[str, Any], *, name: str = "res", scopes: list[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Resiliency",
        "metadata": {"name": name},
        "spec": spec,
    }
    if scopes is not None:
        out["scopes"] = scopes
    return out


def load(*docs: Mapping[str, Any], app_id: str = "app1") -> Resiliency:
    return Resiliency.from_documents(
        [(f"res.yaml#{i + 1}", d) for i, d in enumerate(docs)], app_id=app_id
    )


def error(*docs: Mapping[str, Any]) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load(*docs)
    return info.value


FULL = doc(
    {
        "policies": {
            "timeouts": {"general": "5s", "short": "500ms", "ms": "250"},
            "retries": {
                "retryForever": {"policy": "constant", "duration": "5s", "maxRetries": -1},
                "important": {
                    "policy": "exponential",
                    "maxInterval": "15s",
                    "maxRetries": 10,
                    "matching": {
                        "httpStatusCodes": "429,500-599",
                        "gRPCStatusCodes": "1-4,8-11,13,14",
                    },
                },
            },
            "circuitBreakers": {
                "simpleCB": {
                    "maxRequests": 1,
                    "interval": "8s",
                    "timeout": "45s",
                    "trip": "consecutiveFailures >= 5",
                }
            },
        },
        "targets": {
            "apps": {
                "appB": {"timeout": "general", "retry": "important", "circuitBreaker": "simpleCB"}
            },
            "actors": {
                "myActor": {
                    "timeout": "general",
                    "retry": "important",
                    "circuitBreaker": "simpleCB",
                    "circuitBreakerScope": "id",
                    "circuitBreakerCacheSize": 2,
                }
            },
            "components": {
                "statestore": {"outbound": {"timeout": "short", "retry": "retryForever"}},
                "pubsub": {"inbound": {"retry": "important"}},
            },
        },
    }
)


def test_full_document_resolves_every_target() -> None:
    r = load(FULL)
    assert r.names == ("res",)
    b = r.app("appB")
    assert b is not None
    assert (b.name, b.target, b.direction, b.timeout) == ("appB", "app_appB", "outbound", 5.0)
    assert b.retry is not None and b.retry.policy == "exponential"
    assert (b.retry.max_interval, b.retry.max_retries) == (15.0, 10)
    assert b.retry.max_elapsed == 900.0
    assert b.breaker is not None
    assert (b.breaker.max_requests, b.breaker.interval, b.breaker.timeout) == (1, 8.0, 45.0)
    assert b.resiliency == "res"

    s = r.component_outbound("statestore", "state")
    assert s is not None
    assert (s.target, s.direction, s.timeout) == ("Statestore_statestore", "outbound", 0.5)
    assert s.retry is not None and s.retry.max_retries == -1 and s.retry.duration == 5.0
    assert s.breaker is None
    # Listed under targets with only `outbound`: no inbound policy, and no defaults either.
    assert r.component_inbound("statestore", "state") is None
    p = r.component_inbound("pubsub", "pubsub")
    assert p is not None and p.target == "Pubsub_pubsub" and p.direction == "inbound"

    a = r.actor("myActor")
    assert a is not None and a.target == "actor_myActor"
    assert a.breaker is None and a.breaker_spec is not None  # per-id breakers via for_key


def test_lookups_return_the_same_object_and_none_when_nothing_applies() -> None:
    r = load(FULL)
    assert r.app("appB") is r.app("appB")
    assert r.component_outbound("statestore", "state") is r.component_outbound(
        "statestore", "state"
    )
    assert r.app("other") is None
    assert r.actor("other") is None
    assert r.component_outbound("other", "state") is None
    assert Resiliency.empty().app("appB") is None


def test_actor_id_scope_gives_one_breaker_per_id_in_a_bounded_cache() -> None:
    a = load(FULL).actor("myActor")
    assert a is not None
    one, two = a.for_key("1"), a.for_key("2")
    assert one is a.for_key("1") and one.breaker is not None
    assert one.breaker is not two.breaker
    assert one.retry is a.retry and one.timeout == a.timeout and one.target == a.target
    a.for_key("3")  # cache size 2: "2" is the least recently used ("1" was just read again)
    assert a.for_key("1") is one
    assert a.for_key("2") is not two  # evicted


def test_app_policies_are_not_keyed() -> None:
    b = load(FULL).app("appB")
    assert b is not None and b.for_key("x") is b


def test_durations() -> None:
    assert parse_go_duration("1m30s") == 90.0
    assert parse_go_duration("1h") == 3600.0
    assert parse_go_duration("500ms") == 0.5
    assert parse_go_duration("250") == 0.25  # daprd: a bare integer is milliseconds
    assert parse_go_duration(100) == 0.1
    for bad in ("1.5", "5 parsecs", "", True, None, 1.5):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def at(path: str, value: object, words: str) -> tuple[dict[str, Any], str, str]:
    """A spec with `value` at dotted `path`, the field its error names, and words it contains."""
    spec: Any = value
    for key in reversed(path.split(".")):
        spec = {key: spec}
    return spec, f"spec.{path}", words


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        at("policies.timeouts.t", "soon", "soon"),
        at("policies.timeouts.t", "-5s", "negative"),
        at("policies.retries.important.maxRetries", "lots", "integer"),
        at("policies.retries.r.maxRetries", -2, "-1"),
        at("policies.retries.r.policy", "linear", "linear"),
        at("policies.retries.r.duration", "1.5", "unit"),
        at("policies.retries.r.matching.httpStatusCodes", "600", "600"),
        at("policies.retries.r.matching.gRPCStatusCodes", "5-2", "greater"),
        at("policies.retries.r.matching.httpStatusCodes", "500-502-504", "'-'"),
        at("policies.retries.r", "fast", "mapping"),
        at("policies.circuitBreakers.cb.trip", "consecutiveFailures >", "invalid trip expression"),
        at("policies.circuitBreakers.cb.maxRequests", -1, "negative"),
        at("targets.apps.b.retry", "x", "unknown retry policy 'x'"),
        at("targets.apps.b.timeout", "x", "unknown timeout policy 'x'"),
        at(
            "targets.components.s.outbound.circuitBreaker",
            "x",
            "unknown circuit breaker policy 'x'",
        ),
        (
            {
                "policies": {"circuitBreakers": {"cb": {}}},
                "targets": {"actors": {"A": {"circuitBreaker": "cb"}}},
            },
            "spec.targets.actors.A.circuitBreakerScope",
            "scope",
        ),
        at("targets.actors.A.circuitBreakerScope", "cluster", "cluster"),
        at("policies", ["x"], "mapping"),
    ],
)
def test_bad_input_names_file_document_and_field(
    spec: Mapping[str, Any], field: str, words: str
) -> None:
    err = error(doc({}), doc(spec))
    assert (err.file, err.document, err.field) == ("res.yaml", 2, field)
    assert words in err.message
    assert str(err).startswith(f"res.yaml: document 2: {field}: ")


def test_scopes_leave_out_documents_for_other_apps_unread() -> None:
    bad_for_other = doc({"policies": {"timeouts": {"t": "soon"}}}, scopes=["other"])
    mine = doc(
        {"policies": {"timeouts": {"t": "1s"}}, "targets": {"apps": {"b": {"timeout": "t"}}}},
        name="mine",
        scopes=["app1", "app2"],
    )
    r = load(bad_for_other, mine, app_id="app1")
    assert r.names == ("mine",)
    b = r.app("b")
    assert b is not None and b.timeout == 1.0
    assert load(mine, app_id="app3").app("b") is None
    # An empty scopes list applies to every app.
    assert load(doc({}, scopes=[]), app_id="x").names == ("res",)


def test_later_documents_override_policies_and_targets_by_name() -> None:
    first = doc(
        {
            "policies": {"timeouts": {"t": "1s", "u": "9s"}},
            "targets": {"apps": {"a": {"timeout": "t"}, "b": {"timeout": "u"}}},
        },
        name="first",
    )
    second = doc(
        {
            "policies": {"timeouts": {"t": "2s"}, "retries": {"r": {"maxRetries": 1}}},
            "targets": {"apps": {"b": {"retry": "r"}}},
        },
        name="second",
    )
    r = load(first, second)
    assert r.names == ("first", "second")
    a, b = r.app("a"), r.app("b")
    assert a is not None and a.timeout == 2.0  # policy from the later document
    assert b is not None and b.timeout is None and b.retry is not None  # whole target replaced
    # daprd labels every policy with the last document's name.
    assert a.resiliency == "second"


def test_targets_may_name_policies_from_another_document() -> None:
    targets = doc({"targets": {"apps": {"b": {"retry": "r"}}}})
    policies = doc({"policies": {"retries": {"r": {"maxRetries": 2}}}})
    b = load(targets, policies).app("b")
    assert b is not None and b.retry is not None and b.retry.max_retries == 2


def test_retry_defaults() -> None:
    r = load(
        doc(
            {
                "policies": {"retries": {"r": {}, "e": {"policy": "Exponential"}}},
                "targets": {"apps": {"a": {"retry": "r"}, "b": {"retry": "e"}}},
            }
        )
    )
    a, b = r.app("a"), r.app("b")
    assert a is not None and a.retry is not None
    assert (a.retry.policy, a.retry.duration, a.retry.max_retries) == ("constant", 5.0, -1)
    assert a.retry.http_codes is None and a.retry.retry_http(404)
    assert b is not None and b.retry is not None
    assert (b.retry.policy, b.retry.max_interval, b.retry.initial_interval) == (
        "exponential",
        60.0,
        0.5,
    )


def test_breaker_defaults_follow_gobreaker() -> None:
    r = load(
        doc(
            {
                "policies": {"circuitBreakers": {"cb": {"maxRequests": 0}}},
                "targets": {"apps": {"a": {"circuitBreaker": "cb"}}},
            }
        )
    )
    a = r.app("a")
    assert a is not None and a.breaker is not None and a.breaker_spec is not None
    assert (a.breaker.max_requests, a.breaker.interval, a.breaker.timeout) == (1, 0.0, 60.0)
    assert a.breaker_spec.trip_expression == "consecutiveFailures > 5"


DEFAULTS = doc(
    {
        "policies": {
            "timeouts": {
                "DefaultTimeoutPolicy": "9s",
                "DefaultAppTimeoutPolicy": "1s",
                "DefaultComponentTimeoutPolicy": "2s",
                "DefaultComponentOutboundTimeoutPolicy": "3s",
                "DefaultStatestoreComponentOutboundTimeoutPolicy": "4s",
            },
            "retries": {
                "DefaultRetryPolicy": {"maxRetries": 1},
                "DefaultPubsubComponentInboundRetryPolicy": {"maxRetries": 7},
            },
            "circuitBreakers": {"DefaultActorCircuitBreakerPolicy": {"timeout": "5s"}},
        },
        "targets": {"apps": {"listed": {"retry": "DefaultRetryPolicy"}}},
    }
)


def test_default_policies_most_specific_first_per_kind() -> None:
    r = load(DEFAULTS)
    app = r.app("anyapp")
    assert app is not None and app.target == "app_anyapp"
    assert app.timeout == 1.0 and app.retry is not None and app.retry.max_retries == 1
    assert app.breaker is None
    assert r.app("anyapp") is app and r.app("another") is not app

    state_out = r.component_outbound("s", "state")
    assert state_out is not None and state_out.timeout == 4.0
    pubsub_out = r.component_outbound("p", "pubsub")
    assert pubsub_out is not None and pubsub_out.timeout == 3.0
    state_in = r.component_inbound("s", "state")
    assert state_in is not None and state_in.timeout == 2.0
    assert state_in.retry is not None and state_in.retry.max_retries == 1
    pubsub_in = r.component_inbound("p", "pubsub")
    assert pubsub_in is not None and pubsub_in.retry is not None
    assert pubsub_in.retry.max_retries == 7
    # Inbound and outbound of one component are separate policies.
    assert r.component_outbound("s", "state") is not state_in

    actor = r.actor("T")
    assert actor is not None and actor.timeout == 9.0
    assert actor.breaker is not None and actor.breaker.timeout == 5.0  # one per actor type
    assert actor.for_key("id1") is actor

    # A listed target uses only what it lists: no default timeout here.
    listed = r.app("listed")
    assert listed is not None and listed.timeout is None


def test_each_defaulted_app_has_its_own_breaker() -> None:
    r = load(doc({"policies": {"circuitBreakers": {"DefaultAppCircuitBreakerPolicy": {}}}}))
    a, b = r.app("a"), r.app("b")
    assert a is not None and b is not None and a.breaker is not None
    assert a.breaker is not b.breaker


def test_builtin_policies() -> None:
    r = Resiliency.empty()
    svc = r.builtin("DaprBuiltInServiceRetries")
    assert svc.retry is not None
    assert (svc.retry.policy, svc.retry.duration, svc.retry.max_retries) == ("constant", 1.0, 3)
    assert (
        r.builtin("DaprBuiltInActorNotFoundRetries").retry
        == BUILTIN_POLICIES["DaprBuiltInActorNotFoundRetries"]
    )
    init = r.builtin("DaprBuiltInInitializationRetries").retry
    assert init is not None and (init.policy, init.max_retries, init.max_interval) == (
        "exponential",
        3,
        1.0,
    )
    assert r.builtin("DaprBuiltInServiceRetries") is svc
    with pytest.raises(KeyError):
        r.builtin("Nope")


def test_builtin_overrides_keep_at_least_three_retries_and_protected_stays() -> None:
    r = load(
        doc(
            {
                "policies": {
                    "retries": {
                        "DaprBuiltInServiceRetries": {"duration": "10ms", "maxRetries": 1},
                        "DaprBuiltInActorRetries": {"duration": "20ms", "maxRetries": 8},
                        "DaprBuiltInActorNotFoundRetries": {"maxRetries": 50},
                    }
                }
            }
        )
    )
    svc = r.builtin("DaprBuiltInServiceRetries").retry
    assert svc is not None and (svc.duration, svc.max_retries) == (0.01, 3)
    act = r.builtin("DaprBuiltInActorRetries").retry
    assert act is not None and (act.duration, act.max_retries) == (0.02, 8)
    nf = r.builtin("DaprBuiltInActorNotFoundRetries").retry
    assert nf is not None and nf.max_retries == 5


def test_matching_codes() -> None:
    r = load(FULL)
    b = r.app("appB")
    assert b is not None and b.retry is not None
    assert b.retry.retry_http(429) and b.retry.retry_http(503)
    assert not b.retry.retry_http(404) and not b.retry.retry_http(400)
    assert b.retry.retry_grpc(14) and b.retry.retry_grpc(2)
    assert not b.retry.retry_grpc(5) and not b.retry.retry_grpc(0)


def test_documents_from_the_loader(tmp_path: Path) -> None:
    """What the runtime does: the loader's (source, document) pairs straight in."""
    one = (
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Resiliency\n"
        "metadata: {name: one}\n"
        "spec:\n"
        "  policies:\n"
        "    retries: {r: {policy: constant, duration: 250, maxRetries: 2}}\n"
        "  targets: {apps: {b: {retry: r}}}\n"
    )
    (tmp_path / "resiliency.yaml").write_text(
        one + "---\n"
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Resiliency\n"
        "metadata: {name: two}\n"
        "spec:\n"
        "  targets: {components: {s: {outbound: {retry: missing}}}}\n"
    )
    resources = load_resources([tmp_path], app_id="app1")
    with pytest.raises(ManifestError) as info:
        Resiliency.from_documents(resources.of_kind("Resiliency"), app_id="app1")
    err = info.value
    assert (Path(err.file).name, err.document) == ("resiliency.yaml", 2)
    assert err.field == "spec.targets.components.s.outbound.retry"

    (tmp_path / "resiliency.yaml").write_text(one)
    resources = load_resources([tmp_path], app_id="app1")
    b = Resiliency.from_documents(resources.of_kind("Resiliency"), app_id="app1").app("b")
    assert b is not None and b.retry is not None
    assert (b.retry.duration, b.retry.max_retries) == (0.25, 2)
