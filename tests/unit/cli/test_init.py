"""Unit tests for `pillion init`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pillion.cli.init import DEFAULT_FILES, initialise, is_initialised
from pillion.cli.main import main


def test_writes_the_default_files(tmp_path: Path) -> None:
    result = initialise(tmp_path)
    store = tmp_path / "components" / "statestore.yaml"
    config = tmp_path / "config.yaml"
    pubsub = tmp_path / "components" / "pubsub.yaml"
    lockstore = tmp_path / "components" / "lockstore.yaml"
    assert set(result.written) == {
        store.resolve(),
        pubsub.resolve(),
        lockstore.resolve(),
        config.resolve(),
    }
    assert result.kept == ()
    assert is_initialised(tmp_path)

    doc = yaml.safe_load(store.read_text())
    assert doc["apiVersion"] == "dapr.io/v1alpha1"
    assert doc["kind"] == "Component"
    assert doc["metadata"]["name"] == "statestore"
    assert doc["spec"]["type"] == "state.sqlite"
    assert doc["spec"]["version"] == "v1"
    meta = {m["name"]: m["value"] for m in doc["spec"]["metadata"]}
    assert meta == {
        "connectionString": str(tmp_path.resolve() / "state.db"),
        "actorStateStore": "true",
    }

    ps = yaml.safe_load(pubsub.read_text())
    assert (ps["metadata"]["name"], ps["spec"]["type"]) == ("pubsub", "pubsub.sqlite")
    assert ps["spec"]["metadata"] == [
        {"name": "connectionString", "value": str(tmp_path.resolve() / "pubsub.db")}
    ]

    lk = yaml.safe_load(lockstore.read_text())
    assert (lk["kind"], lk["metadata"]["name"], lk["spec"]["type"], lk["spec"]["version"]) == (
        "Component",
        "lockstore",
        "lock.sqlite",
        "v1",
    )
    assert lk["spec"]["metadata"] == [
        {"name": "connectionString", "value": str(tmp_path.resolve() / "lock.db")}
    ]

    cfg = yaml.safe_load(config.read_text())
    assert cfg["kind"] == "Configuration"
    assert cfg["metadata"]["name"] == "daprConfig"
    assert cfg["spec"]["tracing"]["samplingRate"] == "1"
    assert "zipkin" not in cfg["spec"]["tracing"]


def test_idempotent_and_keeps_user_edits(tmp_path: Path) -> None:
    initialise(tmp_path)
    store = tmp_path / "components" / "statestore.yaml"
    store.write_text("# mine\n")
    (tmp_path / "config.yaml").unlink()
    result = initialise(tmp_path)
    assert store.read_text() == "# mine\n"
    assert result.written == ((tmp_path / "config.yaml").resolve(),)
    assert result.kept == (
        store.resolve(),
        (tmp_path / "components" / "pubsub.yaml").resolve(),
        (tmp_path / "components" / "lockstore.yaml").resolve(),
    )
    again = initialise(tmp_path)
    assert again.written == ()
    assert len(again.kept) == len(DEFAULT_FILES)


def test_odd_home_path_stays_valid_yaml(tmp_path: Path) -> None:
    home = tmp_path / 'we"ird: #home'
    initialise(home)
    doc = yaml.safe_load((home / "components" / "statestore.yaml").read_text())
    assert doc["spec"]["metadata"][0]["value"] == str(home.resolve() / "state.db")


def test_command_prints_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--pillion-home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"✅  Success! pillion is initialised in {tmp_path.resolve()}" in out
    assert main(["init", "--pillion-home", str(tmp_path), "--slim"]) == 0
    assert "Kept existing" in capsys.readouterr().out


def test_home_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PILLION_HOME", str(tmp_path / "h"))
    assert main(["init"]) == 0
    assert (tmp_path / "h" / "config.yaml").is_file()
