"""A session whose laptop vanished is closed after the idle timeout: the real
sidecar, and the real local proxy reaching it through a relay the test freezes
(as a laptop that sleeps or drops off the network: no message, no pong)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from local_proxy.config import LocalSettings
from local_proxy.session import LocalSession
from sidecar.sessions.spec import HttpFilterSpec, SessionSpec
from tests.support import HttpApp, start_sidecar, stop_cleanly

pytestmark = pytest.mark.timeout(60)

IDLE = 2.0


class Relay:
    """127.0.0.1:port -> the sidecar's control port, until frozen."""

    def __init__(self, target: int):
        self.target = target
        self.frozen = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # hold it, as a dead network does
                writer.write(data)
                await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer),
                             return_exceptions=True)  # fmt: skip


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(port)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    try:
        yield relay, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in relay.writers:
            writer.close()
        for writer in relay.writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def open_sessions(base: str, token: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{base}/v1/status", headers={"Authorization": f"Bearer {token}"})
    sessions: list[dict[str, object]] = r.json()["sessions"]
    return sessions


async def test_a_vanished_client_is_closed_after_the_idle_timeout(
    app: HttpApp, local: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    sidecar = start_sidecar(app.port, token_file, tmp_path, f"--session-idle-timeout={IDLE}")
    base = f"http://127.0.0.1:{sidecar.control_port}"
    try:
        async with relay_to(sidecar.control_port) as (relay, port):
            spec = SessionSpec(http_filter=HttpFilterSpec(preview="alice"), client="alice@a")
            settings = LocalSettings(sidecar_url=f"ws://127.0.0.1:{port}", token=sidecar.token,
                                     to_port=local.port, spec=spec)  # fmt: skip
            session = LocalSession(settings, report=lambda _: None)
            runner = asyncio.create_task(session.run())
            await asyncio.wait_for(session.ready.wait(), 10)
            # Idle but answering: the session stays past the timeout.
            await asyncio.sleep(IDLE * 2)
            assert [s["client"] for s in await open_sessions(base, sidecar.token)] == ["alice@a"]
            relay.frozen.set()
            frozen_at = time.monotonic()
            while await open_sessions(base, sidecar.token):
                assert time.monotonic() - frozen_at < IDLE * 4, "the session was not closed"
                await asyncio.sleep(0.2)
            # The request a colleague sends now is the app's, not held for a dead laptop.
            async with httpx.AsyncClient(base_url=sidecar.url) as client:
                r = await client.get("/", headers={"x-offramp-preview": "alice"})
            assert r.headers["x-served-by"] == "app"
            session.stop()
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
    finally:
        stop_cleanly(sidecar)
    assert "(alice@a) closed: its client (127.0.0.1" in sidecar.log()
    assert f"answered nothing for {IDLE:g} s (the idle timeout)" in sidecar.log()
