"""Lint, format, strict typing and the import contracts: one failing check fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.timeout(60)
def test_ruff_lint() -> None:
    run(str(BIN / "ruff"), "check", ".")


@pytest.mark.timeout(60)
def test_ruff_format() -> None:
    run(str(BIN / "ruff"), "format", "--check", ".")


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    run(str(BIN / "mypy"))


@pytest.mark.timeout(120)
def test_import_contracts() -> None:
    """The protocol and filters import no I/O library; the sidecar never imports the local proxy."""
    run(str(BIN / "lint-imports"))
