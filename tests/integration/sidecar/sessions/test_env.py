"""GET /v1/env: the real sidecar (a subprocess) started with the prefixed variables
injection gives it serves the app's environment to a caller with the token only,
and never writes a value to its log."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sidecar.appenv import PREFIX
from tests.support import HttpApp, start_sidecar, stop_cleanly

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-5f2a9"


def test_the_apps_environment_goes_to_the_token_holder_only(
    app: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    sidecar = start_sidecar(
        app.port, token_file, tmp_path, "--log-level=debug",
        env={
            PREFIX + "DB_PASSWORD": SECRET,
            # Junk that would break the sidecar's own Python, were it not prefixed.
            PREFIX + "PYTHONPATH": "/nonexistent/junk",
            PREFIX + "PYTHONHOME": "/nonexistent/home",
            PREFIX + "URL": f"redis://$({PREFIX}REDIS_SERVICE_HOST):6379/$({PREFIX}NOPE)",
            "REDIS_SERVICE_HOST": "10.0.0.7",
        },
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{sidecar.control_port}/v1/env"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert httpx.get(url, headers=wrong, timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {sidecar.token}"}
        answer = httpx.get(url, headers=auth, timeout=10)
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == "no-store"
        assert answer.json() == {
            "env": {
                "REDIS_SERVICE_HOST": "10.0.0.7",
                "DB_PASSWORD": SECRET,
                "PYTHONPATH": "/nonexistent/junk",
                "PYTHONHOME": "/nonexistent/home",
                "URL": "redis://10.0.0.7:6379/$(NOPE)",
            }
        }
        status = httpx.get(
            f"http://127.0.0.1:{sidecar.control_port}/v1/status", headers=auth, timeout=10
        ).json()
        assert status["env"] == ["DB_PASSWORD", "PYTHONHOME", "PYTHONPATH", "REDIS_SERVICE_HOST",
                                 "URL"]  # fmt: skip
    finally:
        stop_cleanly(sidecar)
    assert "env: 5 variables given to 127.0.0.1" in sidecar.log()
    assert SECRET not in sidecar.log()
