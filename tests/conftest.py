from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import HttpApp, SidecarProcess, start_app, start_sidecar


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def _serving(name: str) -> Iterator[HttpApp]:
    a = start_app(name)
    yield a
    a.server.shutdown()
    a.server.server_close()


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
    rc = s.stop()
    assert rc == 0, f"the sidecar exited with {rc} on SIGTERM:\n{s.log()}"
    # mitmproxy catches an addon's exception and only logs it: look for that too.
    for sign in ("Traceback", "Addon error", "Error in"):
        assert sign not in s.log(), f"the sidecar logged an error:\n{s.log()}"
