"""Nothing is lost: what callers get when the local side is absent, slow or broken."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from sidecar.sessions.spec import HttpFilterSpec, Mode, SessionSpec
from tests.support import HttpApp, SidecarProcess, free_port, header_spec, open_session

pytestmark = pytest.mark.timeout(90)

ALICE = {"x-preview": "alice"}


async def test_tunnel_cut_mid_request_gives_502_then_app_serves(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client:
        async with open_session(sidecar, local.port, header_spec("^x-preview: alice$")) as session:
            pending = asyncio.create_task(client.get("/sleep/3", headers=ALICE))
            await asyncio.to_thread(local.wait_seen, 1)
            # Cut the websocket under the session, as a dropped network would.
            ws = session._tunnel.ws if session._tunnel else None
            assert ws is not None
            ws.transport.abort()  # type: ignore[attr-defined]
            r = await pending
            session.stop()
        assert r.status_code == 502
        assert "handed to" in r.text and "tunnel" in r.text, r.text
        # The session is gone: the next matching request goes to the app at once.
        started = time.monotonic()
        r = await client.get("/after", headers=ALICE)
        assert r.headers["x-served-by"] == "app"
        assert time.monotonic() - started < 5


async def test_local_side_reconnects_after_a_cut(sidecar: SidecarProcess, local: HttpApp) -> None:
    lines: list[str] = []
    async with (
        open_session(
            sidecar, local.port, header_spec("^x-preview: alice$"), lines=lines
        ) as session,
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        assert session._tunnel is not None
        session._tunnel.ws.transport.abort()  # type: ignore[attr-defined]
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (
                session.ready.is_set()
                and (await client.get("/", headers=ALICE)).headers["x-served-by"] == "local"
            ):
                break
        else:
            raise AssertionError(f"the session did not come back: {lines}")
    assert any("reconnecting" in line for line in lines), lines


async def test_local_app_refusing_connections_gives_502(sidecar: SidecarProcess) -> None:
    nobody = free_port()
    async with (
        open_session(sidecar, nobody, header_spec("^x-preview: alice$")),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        r = await client.post("/x", headers=ALICE, content=b"body")
    assert r.status_code == 502
    assert f"127.0.0.1:{nobody}" in r.text and "--to" in r.text, r.text


async def test_a_local_process_that_hangs_up_gives_502_saying_it_may_have_run_the_request(
    sidecar: SidecarProcess,
) -> None:
    """It read the whole request, then closed without answering."""
    heard: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readuntil(b"\r\n\r\n") + await reader.readexactly(4))
        writer.close()

    local = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = local.sockets[0].getsockname()[1]
    try:
        async with (
            open_session(sidecar, port, header_spec("^x-preview: alice$")),
            httpx.AsyncClient(base_url=sidecar.url) as client,
        ):
            r = await client.post("/order", headers=ALICE, content=b"body")
    finally:
        local.close()
    assert heard and heard[0].endswith(b"body")
    assert r.status_code == 502
    assert r.text.startswith("offramp: "), r.text  # offramp's page, not mitmproxy's
    assert "your local process may already have run the request" in r.text, r.text


async def test_local_app_too_slow_gives_504(sidecar: SidecarProcess, local: HttpApp) -> None:
    async with (
        open_session(sidecar, local.port, header_spec("^x-preview: alice$"), answer_timeout=0.5),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        r = await client.get("/sleep/3", headers=ALICE)
    assert r.status_code == 504
    assert "did not answer within 0.5 s" in r.text, r.text


async def test_mirror_gives_the_local_side_a_copy_and_the_app_answers(
    sidecar: SidecarProcess, local: HttpApp, app: HttpApp
) -> None:
    spec = SessionSpec(mode=Mode.MIRROR, http_filter=HttpFilterSpec(path_filter="^/orders"))
    async with (
        open_session(sidecar, local.port, spec),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        r = await client.post("/orders", content=b"x" * 300_000)
        assert r.headers["x-served-by"] == "app"
        r = await client.get("/other")
        assert r.headers["x-served-by"] == "app"
        await asyncio.to_thread(local.wait_seen, 1)
    assert [(s.method, s.path, s.body_bytes) for s in local.seen] == [("POST", "/orders", 300_000)]
    assert [s.path for s in app.seen] == ["/orders", "/other"]


async def test_slow_mirror_never_delays_the_caller_and_drops_are_counted(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    spec = SessionSpec(mode=Mode.MIRROR, http_filter=HttpFilterSpec(path_filter="^/sleep/"))
    lines: list[str] = []
    async with (
        open_session(sidecar, local.port, spec, mirror_queue=2, lines=lines) as session,
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        started = time.monotonic()
        # The app answers /sleep/0 at once; the local copies each take 0 s too, but
        # only 2 may run at once and 20 arrive together: most are dropped.
        answers = await asyncio.gather(*(client.get("/sleep/0") for _ in range(20)))
        assert all(a.headers["x-served-by"] == "app" for a in answers)
        slow = await client.get("/sleep/0", headers={"x": "1"})
        assert slow.status_code == 200
        elapsed = time.monotonic() - started
        counters = session.forwarder.counters
        for _ in range(100):
            if (
                counters.mirrored + counters.mirror_dropped_here + counters.mirror_dropped_sidecar
                >= 21
            ):
                break
            await asyncio.sleep(0.05)
    assert counters.mirror_dropped_here + counters.mirror_dropped_sidecar > 0
    assert counters.mirrored + counters.mirror_dropped_here + counters.mirror_dropped_sidecar == 21
    assert elapsed < 10


async def test_sigterm_finishes_in_flight_requests_and_exits_0(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with (
        open_session(sidecar, local.port, header_spec("^x-preview: alice$")),
        httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client,
    ):
        passed = asyncio.create_task(client.get("/sleep/1.5"))
        stolen = asyncio.create_task(client.get("/sleep/1.5", headers=ALICE))
        await asyncio.to_thread(local.wait_seen, 1)
        await asyncio.sleep(0.2)
        sidecar.proc.send_signal(signal.SIGTERM)
        p, s = await asyncio.gather(passed, stolen)
        assert (p.status_code, p.headers["x-served-by"]) == (200, "app")
        assert (s.status_code, s.headers["x-served-by"]) == (200, "local")
    assert await asyncio.to_thread(sidecar.proc.wait, 20) == 0
