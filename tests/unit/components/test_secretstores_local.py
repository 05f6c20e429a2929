"""The local secret stores: file flattening and metadata, env prefixes and forbidden names."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from pillion.components.secretstores.api import Feature, SecretNotFound
from pillion.components.secretstores.local_env import LocalEnvSecretStore
from pillion.components.secretstores.local_file import LocalFileSecretStore

NESTED = {
    "plain": "v",
    "db": {"user": "admin", "conn": {"host": "h", "port": 5432}},
    "list": ["a", {"b": "c"}],
    "flags": {"on": True, "off": False, "none": None, "ratio": 0.5, "whole": 2.0},
}


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("s", "secretstores.local.file", "v1", "app", Properties(props))


def file_store(tmp: Path, doc: Any, **props: str) -> LocalFileSecretStore:
    path = tmp / "secrets.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    s = LocalFileSecretStore()
    asyncio.run(s.init(info(**{"secretsFile": str(path), **props})))
    return s


def test_file_flattens_nested_objects_and_arrays(tmp_path: Path) -> None:
    s = file_store(tmp_path, NESTED)
    flat = {name: v[name] for name, v in asyncio.run(s.bulk_get({})).items()}
    assert flat == {
        "plain": "v",
        "db:user": "admin",
        "db:conn:host": "h",
        "db:conn:port": "5432",
        "list:0": "a",
        "list:1:b": "c",
        "flags:on": "true",
        "flags:off": "false",
        "flags:none": "",
        "flags:ratio": "0.5",
        "flags:whole": "2",
    }
    assert asyncio.run(s.get("db:conn:host", {})) == {"db:conn:host": "h"}
    assert s.features() == frozenset()
    with pytest.raises(SecretNotFound):
        asyncio.run(s.get("db", {}))


def test_file_nested_separator(tmp_path: Path) -> None:
    s = file_store(tmp_path, NESTED, nestedSeparator=".")
    assert asyncio.run(s.get("db.conn.host", {})) == {"db.conn.host": "h"}


def test_file_multi_valued_maps_top_level_keys(tmp_path: Path) -> None:
    s = file_store(tmp_path, NESTED, multiValued="true")
    assert s.features() == frozenset({Feature.MULTIPLE_KEY_VALUES_PER_SECRET})
    assert asyncio.run(s.get("plain", {})) == {"plain": "v"}
    assert asyncio.run(s.get("db", {})) == {"user": "admin", "conn:host": "h", "conn:port": "5432"}
    assert asyncio.run(s.get("list", {})) == {"0": "a", "1:b": "c"}


def test_file_relative_path_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel.json").write_text('{"k": "v"}')
    monkeypatch.chdir(tmp_path)
    s = LocalFileSecretStore()
    asyncio.run(s.init(info(secretsFile="rel.json")))
    assert asyncio.run(s.get("k", {})) == {"k": "v"}


@pytest.mark.parametrize(
    ("doc", "props", "message"),
    [
        ({"k": "v"}, {"secretsFile": ""}, "'secretsFile': is required"),
        ("{not json", {}, "is not valid JSON"),
        ("[1, 2]", {}, "must hold a JSON object"),
        ({"a:b": "x", "a": {"b": "y"}}, {}, "duplicate secret name 'a:b'"),
        ({"k": "v"}, {"multiValued": "maybe"}, "'multiValued': expected true or false"),
    ],
)
def test_file_bad_configuration(
    tmp_path: Path, doc: Any, props: dict[str, str], message: str
) -> None:
    with pytest.raises(ComponentConfigError) as ei:
        file_store(tmp_path, doc, **props)
    assert message in str(ei.value)


def test_file_missing_file_names_the_path(tmp_path: Path) -> None:
    s = LocalFileSecretStore()
    with pytest.raises(ComponentConfigError) as ei:
        asyncio.run(s.init(info(secretsFile=str(tmp_path / "absent.json"))))
    assert "absent.json" in str(ei.value) and "secretsFile" in str(ei.value)


ENV = {
    "MYAPP_DB": "db-pw",
    "MYAPP_": "only-the-prefix",
    "OTHER": "other",
    "DAPR_API_TOKEN": "t",
    "MYAPP_DAPR_X": "allowed: the forbidden check is on the full name",
    "APP_API_TOKEN": "a",
}


def env_store(prefix: str = "") -> LocalEnvSecretStore:
    s = LocalEnvSecretStore(ENV)
    asyncio.run(s.init(info(prefix=prefix) if prefix else info()))
    return s


def test_env_prefix_is_added_on_get_and_stripped_on_bulk() -> None:
    s = env_store("MYAPP_")
    assert asyncio.run(s.get("DB", {})) == {"DB": "db-pw"}
    assert asyncio.run(s.bulk_get({})) == {
        "DB": {"DB": "db-pw"},
        "DAPR_X": {"DAPR_X": ENV["MYAPP_DAPR_X"]},
    }


def test_env_without_prefix_lists_everything_but_the_sidecar_credentials() -> None:
    s = env_store()
    bulk = asyncio.run(s.bulk_get({}))
    assert set(bulk) == {"MYAPP_DB", "MYAPP_", "OTHER", "MYAPP_DAPR_X"}
    assert asyncio.run(s.get("OTHER", {})) == {"OTHER": "other"}


@pytest.mark.parametrize("name", ["DAPR_API_TOKEN", "dapr_api_token", "APP_API_TOKEN", "UNSET"])
def test_env_forbidden_or_unset_reads_empty(name: str) -> None:
    assert asyncio.run(env_store().get(name, {})) == {name: ""}
