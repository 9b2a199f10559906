from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import HttpApp, SidecarProcess, serving, start_sidecar, stop_cleanly


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def _serving(name: str) -> Iterator[HttpApp]:
    with serving(name) as a:
        yield a


@pytest.fixture
def app() -> Iterator[HttpApp]:
    """The pod's app, behind the sidecar."""
    yield from _serving("app")


@pytest.fixture
def local() -> Iterator[HttpApp]:
    """The developer's local process."""
    yield from _serving("local")


@pytest.fixture
def sidecar(app: HttpApp, token_file: Path, tmp_path: Path) -> Iterator[SidecarProcess]:
    s = start_sidecar(app.port, token_file, tmp_path)
    yield s
    stop_cleanly(s)
