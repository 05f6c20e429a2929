"""Unit tests for the `pillion` entry point: dispatch, version, usage errors, lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pillion
from pillion.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[3]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    expected = f"CLI version: {pillion.__version__}\nRuntime version: {pillion.__version__}\n"
    assert main(["version"]) == 0
    assert capsys.readouterr().out == expected
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == expected


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith('Error: unknown command "frobnicate" for "pillion"\n')
    assert "Usage:" in err


def test_argument_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--bogus"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "Error: unknown flag: --bogus\n"
    assert main(["run", "--app-port", "x"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_import_is_light() -> None:
    code = (
        "import sys, pillion.cli.main; "
        "heavy = [m for m in ('asyncio', 'yaml', 'pillion.runtime', 'pillion.cli.run') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
