"""WebSocket (HTTP/1.1 Upgrade) through the real sidecar: a matching handshake
steals the whole websocket to the local side, any other goes to the pod's app.
Servers and clients are the real `websockets` library."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import SidecarProcess, header_spec, open_session, start_sidecar, stop_cleanly

ME = {"x-who": "me"}


async def start_ws_app(name: str) -> Server:
    """Echoes each message as "<name>:<message>"; on "bye" it closes with code
    4001; on "push N" it sends N messages of its own without waiting."""

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            assert isinstance(message, str)
            if message == "bye":
                await ws.close(4001, f"{name} says bye")
                return
            if message.startswith("push "):
                for i in range(int(message[5:])):
                    await ws.send(f"{name}:push {i}")
                continue
            await ws.send(f"{name}:{message}")

    def only_chat(connection: ServerConnection, request: object) -> object:
        path = getattr(request, "path", "")
        if path != "/chat":
            return connection.respond(404, f"{name}: no websocket at {path}\n")
        return None

    return await serve(handler, "127.0.0.1", 0, process_request=only_chat)


def port_of(server: Server) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


@pytest.fixture
async def ws_app() -> AsyncIterator[Server]:
    server = await start_ws_app("app")
    yield server
    server.close()
    await server.wait_closed()


@pytest.fixture
async def ws_local() -> AsyncIterator[Server]:
    server = await start_ws_app("local")
    yield server
    server.close()
    await server.wait_closed()


@pytest.fixture
async def ws_sidecar(
    ws_app: Server, token_file: Path, tmp_path: Path
) -> AsyncIterator[SidecarProcess]:
    s = await asyncio.to_thread(start_sidecar, port_of(ws_app), token_file, tmp_path)
    yield s
    await asyncio.to_thread(stop_cleanly, s)


async def converse(url: str, who: str, headers: dict[str, str]) -> None:
    """Messages both ways, a burst the server sends unprompted, then the
    server closes and its close code reaches the caller."""
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        for i in range(100):
            await ws.send(f"m{i}")
            assert await ws.recv() == f"{who}:m{i}"
        await ws.send("push 200")
        for i in range(200):
            assert await ws.recv() == f"{who}:push {i}"
        big = "x" * 300_000
        await ws.send(big)
        assert await ws.recv() == f"{who}:{big}"
        await ws.send("bye")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, f"{who} says bye")


async def test_websocket_passes_through_without_a_session(ws_sidecar: SidecarProcess) -> None:
    await converse(f"ws://127.0.0.1:{ws_sidecar.listen_port}/chat", "app", ME)


async def test_matching_websocket_is_stolen_the_rest_goes_to_the_app(
    ws_sidecar: SidecarProcess, ws_local: Server
) -> None:
    url = f"ws://127.0.0.1:{ws_sidecar.listen_port}/chat"
    lines: list[str] = []
    async with open_session(ws_sidecar, port_of(ws_local), header_spec("^x-who: me$"), lines=lines):
        await asyncio.gather(converse(url, "local", ME), converse(url, "app", {}))
    assert any("steal  GET /chat -> 101" in line for line in lines), lines


async def test_caller_closing_a_stolen_websocket_closes_it_locally(
    ws_sidecar: SidecarProcess, ws_local: Server
) -> None:
    url = f"ws://127.0.0.1:{ws_sidecar.listen_port}/chat"
    async with open_session(ws_sidecar, port_of(ws_local), header_spec("^x-who: me$")):
        async with connect(url, additional_headers=ME, open_timeout=10) as ws:
            await ws.send("hello")
            assert await ws.recv() == "local:hello"
            assert len(ws_local.connections) == 1
            await ws.close(1000, "caller done")
        for _ in range(200):
            if not ws_local.connections:
                break
            await asyncio.sleep(0.02)
        assert not ws_local.connections, "the local websocket stayed open"
        # The next one works as the first did.
        async with connect(url, additional_headers=ME, open_timeout=10) as ws:
            await ws.send("again")
            assert await ws.recv() == "local:again"


async def test_stolen_handshake_the_local_app_refuses_reaches_the_caller(
    ws_sidecar: SidecarProcess, ws_local: Server
) -> None:
    url = f"ws://127.0.0.1:{ws_sidecar.listen_port}/elsewhere"
    async with open_session(ws_sidecar, port_of(ws_local), header_spec("^x-who: me$")):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=ME, open_timeout=10):
                pass
    assert refused.value.response.status_code == 404
    assert b"local: no websocket at /elsewhere" in refused.value.response.body
