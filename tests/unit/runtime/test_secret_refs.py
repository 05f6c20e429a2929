"""Loading secret stores first and resolving other components' secretKeyRef metadata from them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pillion.components.secretstores.api import Feature
from pillion.manifests.model import Component, MetadataItem, SecretKeyRef
from pillion.runtime.components import (
    ComponentInitError,
    Loaded,
    _resolve_secret_refs,
    load_components,
)

SECRETS = {"db": "PLACEHOLDER", "multi": {"conn": "PLACEHOLDER", "user": "u"}, "one": {"x": "y"}}


def secret_file(tmp: Path, multi: bool = False) -> Component:
    path = tmp / ("multi.json" if multi else "secrets.json")
    path.write_text(json.dumps(SECRETS).replace("PLACEHOLDER", str(tmp / "state.db")))
    md = [MetadataItem("secretsFile", value=str(path))]
    if multi:
        md.append(MetadataItem("multiValued", value="true"))
    return Component(
        name="multistore" if multi else "filestore",
        type="secretstores.local.file",
        metadata=tuple(md),
        source="secrets.yaml#1",
    )


def sqlite_with_ref(
    ref: SecretKeyRef, store: str | None = "filestore", *, ignore: bool = False
) -> Component:
    return Component(
        name="statestore",
        type="state.sqlite",
        metadata=(MetadataItem("connectionString", secret_key_ref=ref),),
        auth_secret_store=store,
        ignore_errors=ignore,
        source="state.yaml#1",
    )


def load(*components: Component) -> Loaded:
    return asyncio.run(load_components(components, app_id="app", namespace="default", env={}))


def load_error(*components: Component) -> str:
    with pytest.raises(ComponentInitError) as ei:
        load(*components)
    return str(ei.value)


def close(loaded: Loaded) -> None:
    asyncio.run(loaded.close())


def test_secret_stores_load_first_and_feed_secret_key_refs(tmp_path: Path) -> None:
    # The state component comes first in the manifests; the store it reads must still be ready.
    loaded = load(sqlite_with_ref(SecretKeyRef("db", "db")), secret_file(tmp_path))
    try:
        assert list(loaded.secretstores) == ["filestore"]
        assert [v.name for v in loaded.views] == ["filestore", "statestore"]
        assert (tmp_path / "state.db").exists()
    finally:
        close(loaded)


def test_multi_valued_secret_key(tmp_path: Path) -> None:
    comp = sqlite_with_ref(SecretKeyRef("multi", "conn"), "multistore")
    loaded = load(secret_file(tmp_path, multi=True), comp)
    try:
        (view,) = [v for v in loaded.views if v.name == "multistore"]
        assert view.capabilities == (str(Feature.MULTIPLE_KEY_VALUES_PER_SECRET),)
        assert (tmp_path / "state.db").exists()
    finally:
        close(loaded)


def test_key_left_out_takes_a_single_valued_secret(tmp_path: Path) -> None:
    # The loader makes a missing key the secret's name; {"x": "y"} has one value only.
    loaded = load(secret_file(tmp_path, multi=True))
    try:
        comp = Component(
            name="c",
            type="state.in-memory",
            metadata=(MetadataItem("k", secret_key_ref=SecretKeyRef("one", "one")),),
            auth_secret_store="multistore",
        )
        resolved = asyncio.run(_resolve_secret_refs(comp, loaded.secretstores))
        assert resolved.properties({}) == {"k": "y"}
        assert resolved.secret_refs() == ()
    finally:
        close(loaded)


@pytest.mark.parametrize(
    ("ref", "store", "message"),
    [
        (
            SecretKeyRef("db", "db"),
            None,
            "component statestore (state.sqlite/v1) from state.yaml#1: metadata "
            "'connectionString' uses secretKeyRef but auth.secretStore is not set",
        ),
        (
            SecretKeyRef("db", "db"),
            "vault",
            "component statestore (state.sqlite/v1) from state.yaml#1: auth.secretStore "
            "'vault' is not a loaded secret store (filestore)",
        ),
        (
            SecretKeyRef("nope", "nope"),
            "filestore",
            "component statestore (state.sqlite/v1) from state.yaml#1: metadata "
            "'connectionString': secretKeyRef 'nope': secret store 'filestore': secret nope "
            "not found",
        ),
        (
            SecretKeyRef("db", "other"),
            "filestore",
            "component statestore (state.sqlite/v1) from state.yaml#1: metadata "
            "'connectionString': secretKeyRef 'db' key 'other': secret 'db' of secret store "
            "'filestore' has no key 'other' (its keys: db)",
        ),
    ],
)
def test_bad_secret_key_ref_stops_loading(
    tmp_path: Path, ref: SecretKeyRef, store: str | None, message: str
) -> None:
    assert load_error(secret_file(tmp_path), sqlite_with_ref(ref, store)).startswith(message)


def test_bad_secret_key_ref_with_ignore_errors_skips_the_component(tmp_path: Path) -> None:
    loaded = load(secret_file(tmp_path), sqlite_with_ref(SecretKeyRef("nope", "nope"), ignore=True))
    try:
        assert [v.name for v in loaded.views] == ["filestore"]
        assert loaded.state == {}
    finally:
        close(loaded)


def test_broken_secret_store_is_a_component_error(tmp_path: Path) -> None:
    comp = Component(
        name="filestore",
        type="secretstores.local.file",
        metadata=(MetadataItem("secretsFile", value=str(tmp_path / "absent.json")),),
        source="secrets.yaml#1",
    )
    assert "absent.json" in load_error(comp)
