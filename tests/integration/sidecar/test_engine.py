"""The engine on demand (`sidecar.primary`): an idle sidecar is one small process
that has not loaded mitmproxy; the first session starts the engine, the last one
lets it go, and nothing a caller sends is lost on the way.

Checked in the processes themselves: which shared libraries a process has mapped
(mitmproxy_rs, pydantic_core and websockets' speedups are native modules, mapped
once imported), and which processes exist. Not by timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    HttpApp,
    SidecarProcess,
    header_spec,
    open_session,
    start_sidecar,
    stop_cleanly,
)

ENGINE_LIBRARIES = ("mitmproxy_rs", "pydantic_core", "websockets/speedups")


def loaded(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {lib for lib in ENGINE_LIBRARIES if lib in maps}


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(check, timeout: float = 15, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


def broken_mitmproxy(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import mitmproxy` fails (the engine cannot start)."""
    broken = tmp_path / "broken" / "mitmproxy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('mitmproxy broken for this test')\n")
    return {"PYTHONPATH": f"{broken.parent}:{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def idle_sidecar(app: HttpApp, token_file: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    s = start_sidecar(app.port, token_file, tmp_path, "--engine=on-demand", "--engine-linger=1")
    yield s
    stop_cleanly(s)


def test_an_idle_sidecar_has_not_loaded_the_engine_and_passes_traffic_on(
    idle_sidecar: SidecarProcess,
) -> None:
    s = idle_sidecar
    assert "engine: idle" in s.health()
    for _ in range(3):
        r = httpx.get(s.url + "/idle", headers={"x-dev": "me"})
        assert r.json()["served_by"] == "app"
    assert "engine: idle" in s.health()
    assert loaded(s.proc.pid) == set()
    assert children(s.proc.pid) == set()
    # The libraries are there to be found once loaded: the engine maps them.
    asyncio.run(_steal_once(s))
    engine = s.wait_engine()
    assert loaded(engine) == set(ENGINE_LIBRARIES)
    assert loaded(s.proc.pid) == set()


async def _steal_once(s: SidecarProcess, local_port: int | None = None) -> None:
    from tests.support import serving

    with serving("local") as local:
        async with open_session(s, local_port or local.port, header_spec("x-dev: me")):
            r = await asyncio.to_thread(httpx.get, s.url + "/steal", headers={"x-dev": "me"})
            assert r.json()["served_by"] == "local"


def test_the_first_session_starts_the_engine_and_the_last_lets_it_go(
    idle_sidecar: SidecarProcess, local: HttpApp
) -> None:
    s = idle_sidecar

    async def scenario() -> int:
        # A keep-alive client from before the session: its idle connection is
        # closed once the engine listens, so its next request is decided by it.
        async with httpx.AsyncClient() as client:
            first = await client.get(s.url + "/before", headers={"x-dev": "me"})
            assert first.json()["served_by"] == "app"
            async with open_session(s, local.port, header_spec("x-dev: me")):
                engine = s.engine_pid()
                assert engine is not None and engine in children(s.proc.pid)
                await asyncio.sleep(0.8)  # the primary's idle sweep (500 ms rule)
                second = await client.get(s.url + "/during", headers={"x-dev": "me"})
                assert second.json()["served_by"] == "local"
                other = await client.get(s.url + "/during", headers={"x-dev": "you"})
                assert other.json()["served_by"] == "app"
        return engine

    engine = asyncio.run(scenario())
    # The linger (1 s) passes: the engine goes; the primary serves on.
    wait_for(lambda: not alive(engine), what="the engine to go")
    assert "engine: idle" in s.health()
    assert "proxy engine gone" in s.log()
    assert httpx.get(s.url + "/after").json()["served_by"] == "app"
    # The next session starts a new engine.
    asyncio.run(_steal_once(s, local.port))
    assert s.engine_pid() not in (None, engine)


def test_a_request_in_flight_when_the_engine_goes_gets_its_answer(
    idle_sidecar: SidecarProcess, local: HttpApp
) -> None:
    s = idle_sidecar

    async def scenario() -> tuple[httpx.Response, int]:
        async with open_session(s, local.port, header_spec("x-dev: me")):
            engine = s.engine_pid()
            assert engine is not None
            slow = asyncio.create_task(asyncio.to_thread(httpx.get, s.url + "/sleep/3", timeout=20))
            await asyncio.sleep(0.3)
        # The session has ended; the linger (1 s) runs out while the app still works.
        return await slow, engine

    r, engine = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["served_by"] == "app"
    wait_for(lambda: not alive(engine), what="the engine to go")
    assert "finishing 1 requests" in s.log()


def test_a_status_call_wakes_the_engine_and_a_probe_does_not(
    idle_sidecar: SidecarProcess,
) -> None:
    s = idle_sidecar
    for _ in range(5):
        assert httpx.get(f"http://127.0.0.1:{s.health_port}/healthz").status_code == 200
    assert httpx.post(f"http://127.0.0.1:{s.health_port}/healthz").status_code == 405
    assert httpx.get(f"http://127.0.0.1:{s.health_port}/v1/status").status_code == 404
    assert children(s.proc.pid) == set()
    r = httpx.get(
        f"http://127.0.0.1:{s.control_port}/v1/status",
        headers={"authorization": f"Bearer {s.token}"},
        timeout=20,
    )
    assert r.status_code == 200 and r.json()["sessions"] == []
    engine = s.wait_engine()
    wait_for(lambda: not alive(engine), what="the engine to go after its linger")


def test_workers_start_with_the_engine_not_at_boot(
    app: HttpApp, local: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    s = start_sidecar(
        app.port, token_file, tmp_path, "--engine=on-demand", "--engine-linger=1", "--workers=2"
    )
    try:
        assert children(s.proc.pid) == set()

        async def scenario() -> tuple[int, set[int]]:
            async with open_session(s, local.port, header_spec("x-dev: me")):
                engine = s.wait_engine()
                workers = children(engine)
                assert len(workers) == 1, workers
                for _ in range(20):  # some land on the worker, which hands them over
                    r = await asyncio.to_thread(
                        httpx.get, s.url + "/w", headers={"x-dev": "me", "connection": "close"}
                    )
                    assert r.json()["served_by"] == "local"
            return engine, workers

        engine, workers = asyncio.run(scenario())
        wait_for(lambda: not alive(engine) and not any(map(alive, workers)), what="all to go")
        assert httpx.get(s.url + "/after").json()["served_by"] == "app"
    finally:
        stop_cleanly(s)


def test_an_engine_that_dies_leaves_traffic_flowing_and_starts_again(
    idle_sidecar: SidecarProcess, local: HttpApp
) -> None:
    s = idle_sidecar

    async def scenario() -> None:
        async with open_session(s, local.port, header_spec("x-dev: me")):
            engine = s.engine_pid()
            assert engine is not None
            os.kill(engine, signal.SIGKILL)
            wait_for(lambda: not alive(engine), what="the engine to die")
            r = await asyncio.to_thread(httpx.get, s.url + "/x", headers={"x-dev": "me"})
            assert r.json()["served_by"] == "app"

    asyncio.run(scenario())
    assert "the proxy engine exited with signal SIGKILL" in s.log()
    # After its pause the next session gets a new engine.
    time.sleep(1.2)
    asyncio.run(_steal_once(s, local.port))
    log = s.log()
    s.stop()
    assert "Traceback" not in log, log


def test_an_engine_that_cannot_start_is_reported_on_the_control_port(
    app: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    """mitmproxy that cannot be imported: the primary, which never imports it,
    serves on; a caller of the control port learns what happened."""
    s = start_sidecar(
        app.port,
        token_file,
        tmp_path,
        "--engine=on-demand",
        env=broken_mitmproxy(tmp_path),
    )
    try:
        assert httpx.get(s.url + "/x").json()["served_by"] == "app"
        with socket.create_connection(("127.0.0.1", s.control_port)):
            pass  # wakes the engine, which fails
        wait_for(lambda: "before it was ready" in s.log(), what="the engine to fail")
        r = httpx.get(f"http://127.0.0.1:{s.control_port}/v1/status", timeout=10)
        assert r.status_code == 503, r.text
        assert "proxy engine exited" in r.text and "retry-after" in r.headers
        assert httpx.get(s.url + "/y").json()["served_by"] == "app"
        assert "ok" in s.health()
    finally:
        assert s.stop() == 0, s.log()


def test_with_engine_always_the_sidecar_is_ready_only_once_the_engine_is(
    app: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    """--engine always (privilege-free mode's default): an engine that cannot start
    keeps the pod unready, is tried again after a pause, and meanwhile the
    primary passes traffic to the app."""
    s = start_sidecar(
        app.port,
        token_file,
        tmp_path,
        "--engine=always",
        env=broken_mitmproxy(tmp_path),
        wait=False,
    )
    try:
        health = f"http://127.0.0.1:{s.health_port}/healthz"
        wait_for(
            lambda: s.log().count("proxy engine starting") >= 2, what=f"a second try: {s.log()}"
        )
        r = httpx.get(health)
        assert r.status_code == 503 and "engine:" in r.text, r.text
        assert httpx.get(s.url + "/x").json()["served_by"] == "app"
    finally:
        assert s.stop() == 0, s.log()
