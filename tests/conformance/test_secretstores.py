"""Secret store conformance: every registered `secretstores.*` type against the same contract."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from pillion.components import registry
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.secretstores.api import Feature, SecretNotFound, SecretStore

# What every row holds once set up: single-valued secrets named like their one key.
SINGLE = {"CONF_DB_PASSWORD": "s3cr3t", "CONF_API_KEY": "key with spaces = and é", "CONF_E": ""}
# Multi-valued secrets, for rows that can hold them.
MULTI = {
    "database": {"user": "admin", "password": "pw", "port": "5432"},
    "api": {"token": "t0k3n"},
}


@dataclass(frozen=True)
class Setup:
    """What a row did to hold the test secrets: its component metadata."""

    properties: dict[str, str]


@dataclass(frozen=True)
class Backend:
    """How to fill one store type with SINGLE (and MULTI where it can)."""

    single: Callable[[Path, pytest.MonkeyPatch], Setup]
    multi: Callable[[Path, pytest.MonkeyPatch], Setup] | None = None
    # Dapr's local.env answers an unset variable with an empty value, not an error.
    missing_is_empty: bool = False


def _file_single(tmp: Path, mp: pytest.MonkeyPatch) -> Setup:
    path = tmp / "secrets.json"
    path.write_text(json.dumps(SINGLE))
    return Setup({"secretsFile": str(path)})


def _file_multi(tmp: Path, mp: pytest.MonkeyPatch) -> Setup:
    path = tmp / "multi.json"
    path.write_text(json.dumps(MULTI))
    return Setup({"secretsFile": str(path), "multiValued": "true"})


def _env_single(tmp: Path, mp: pytest.MonkeyPatch) -> Setup:
    # A prefix of its own keeps the rest of the environment out of bulk answers.
    prefix = f"PILLION_CONF_{uuid.uuid4().hex[:8].upper()}_"
    for name, value in SINGLE.items():
        mp.setenv(prefix + name, value)
    return Setup({"prefix": prefix})


# One row per registered secretstores type.
BACKENDS: dict[str, Backend] = {
    "secretstores.local.file": Backend(_file_single, _file_multi),
    "secretstores.local.env": Backend(_env_single, missing_is_empty=True),
}

SECRET_TYPES = sorted({t for t, _ in registry.kinds() if registry.category(t) == "secretstores"})


def _open(
    component_type: str, props: Mapping[str, str], aio: asyncio.Runner
) -> Iterator[SecretStore]:
    instance: SecretStore = registry.load(component_type, "v1")()
    info = ComponentInfo("secretstore", component_type, "v1", "app", Properties(dict(props)))
    aio.run(instance.init(info))
    try:
        yield instance
    finally:
        aio.run(instance.close())


def _backend(component_type: str) -> Backend:
    backend = BACKENDS.get(component_type)
    if backend is None:
        pytest.fail(f"{component_type} is registered but has no row in BACKENDS")
    return backend


@pytest.fixture(params=SECRET_TYPES)
def row(request: pytest.FixtureRequest) -> tuple[str, Backend]:
    return request.param, _backend(request.param)


@pytest.fixture
def store(
    row: tuple[str, Backend],
    aio: asyncio.Runner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SecretStore]:
    component_type, backend = row
    yield from _open(component_type, backend.single(tmp_path, monkeypatch).properties, aio)


@pytest.fixture
def multi_store(
    row: tuple[str, Backend],
    aio: asyncio.Runner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SecretStore]:
    component_type, backend = row
    if backend.multi is None:
        pytest.skip(f"{component_type} holds one value per secret only")
    yield from _open(component_type, backend.multi(tmp_path, monkeypatch).properties, aio)


def test_every_registered_type_has_a_row() -> None:
    assert SECRET_TYPES, "no secretstores.* type is registered"
    assert set(SECRET_TYPES) == set(BACKENDS)


# -- single-valued --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SINGLE)
async def test_get_answers_the_secret_named_like_itself(store: SecretStore, name: str) -> None:
    assert await store.get(name, {}) == {name: SINGLE[name]}


async def test_get_ignores_unknown_request_metadata(store: SecretStore) -> None:
    got = await store.get("CONF_DB_PASSWORD", {"namespace": "default", "version_id": "1"})
    assert got == {"CONF_DB_PASSWORD": "s3cr3t"}


async def test_missing_secret(store: SecretStore, row: tuple[str, Backend]) -> None:
    _, backend = row
    if backend.missing_is_empty:
        assert await store.get("CONF_NOPE", {}) == {"CONF_NOPE": ""}
        return
    with pytest.raises(SecretNotFound) as info:
        await store.get("CONF_NOPE", {})
    assert "CONF_NOPE" in str(info.value)


async def test_bulk_answers_every_secret(store: SecretStore) -> None:
    assert await store.bulk_get({}) == {name: {name: v} for name, v in SINGLE.items()}


async def test_answers_are_copies(store: SecretStore) -> None:
    got = await store.get("CONF_DB_PASSWORD", {})
    got["CONF_DB_PASSWORD"] = "changed"
    bulk = await store.bulk_get({})
    bulk["CONF_API_KEY"]["CONF_API_KEY"] = "changed"
    assert await store.get("CONF_DB_PASSWORD", {}) == {"CONF_DB_PASSWORD": "s3cr3t"}
    assert (await store.bulk_get({}))["CONF_API_KEY"] == {"CONF_API_KEY": SINGLE["CONF_API_KEY"]}


async def test_single_valued_store_does_not_declare_multiple_values(store: SecretStore) -> None:
    assert store.features() <= set(Feature)
    assert Feature.MULTIPLE_KEY_VALUES_PER_SECRET not in store.features()


# -- multi-valued ---------------------------------------------------------------------------------


async def test_multi_valued_declares_the_feature(multi_store: SecretStore) -> None:
    assert Feature.MULTIPLE_KEY_VALUES_PER_SECRET in multi_store.features()


@pytest.mark.parametrize("name", MULTI)
async def test_multi_valued_get_answers_the_map(multi_store: SecretStore, name: str) -> None:
    assert await multi_store.get(name, {}) == MULTI[name]


async def test_multi_valued_bulk_answers_every_map(multi_store: SecretStore) -> None:
    assert await multi_store.bulk_get({}) == MULTI


async def test_multi_valued_missing_secret(multi_store: SecretStore) -> None:
    with pytest.raises(SecretNotFound):
        await multi_store.get("nope", {})
