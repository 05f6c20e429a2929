"""Loading lock components: the lock category, its keyPrefix and what the metadata API lists."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pillion.components.lock.sqlite import SQLiteLockStore
from pillion.manifests.model import Component, MetadataItem
from pillion.runtime.components import ComponentInitError, Loaded, load_components


def lock_component(
    tmp: Path, name: str = "lockstore", *, ignore: bool = False, **md: str
) -> Component:
    items = [MetadataItem("connectionString", value=str(tmp / "lock.db"))]
    items += [MetadataItem(k, value=v) for k, v in md.items()]
    return Component(
        name=name,
        type="lock.sqlite",
        metadata=tuple(items),
        ignore_errors=ignore,
        source="lock.yaml#1",
    )


def load(*components: Component) -> Loaded:
    return asyncio.run(load_components(components, app_id="app", namespace="default", env={}))


def test_lock_components_load_with_their_key_prefix(tmp_path: Path) -> None:
    loaded = load(
        lock_component(tmp_path),
        lock_component(tmp_path, "byname", keyPrefix="Name"),
        lock_component(tmp_path, "custom", keyPrefix="Team-A"),
    )
    try:
        assert {n: e.key_prefix for n, e in loaded.lock.items()} == {
            "lockstore": "appid",
            "byname": "name",
            "custom": "team-a",
        }
        assert isinstance(loaded.lock["lockstore"].store, SQLiteLockStore)
        view = loaded.views[0]
        assert (view.name, view.type, view.version, view.capabilities) == (
            "lockstore",
            "lock.sqlite",
            "v1",
            (),
        )
        assert len(loaded.closers) == 3
    finally:
        asyncio.run(loaded.close())


def test_key_prefix_with_separator_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ComponentInitError) as ei:
        load(lock_component(tmp_path, keyPrefix="a||b"))
    msg = str(ei.value)
    assert "component lockstore (lock.sqlite/v1) from lock.yaml#1" in msg
    assert "keyPrefix" in msg and "can't contain '||'" in msg


def test_bad_lock_component_is_skipped_with_ignore_errors(tmp_path: Path) -> None:
    bad = Component(name="broken", type="lock.sqlite", ignore_errors=True, source="x.yaml#1")
    loaded = load(bad, lock_component(tmp_path))
    try:
        assert list(loaded.lock) == ["lockstore"]
    finally:
        asyncio.run(loaded.close())
    with pytest.raises(ComponentInitError, match="connectionString"):
        load(Component(name="broken", type="lock.sqlite", source="x.yaml#1"))


def test_unknown_lock_type_names_the_known_ones() -> None:
    with pytest.raises(ComponentInitError) as ei:
        load(Component(name="l", type="lock.etcd", source="x.yaml#1"))
    assert "known lock types: lock.redis, lock.sqlite" in str(ei.value)
