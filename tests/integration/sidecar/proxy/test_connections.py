"""When the sidecar connects to the app, and how long a caller may take over a
request head: the real sidecar in front of an app that counts the connections
it accepts, callers on raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import SidecarProcess, start_sidecar, stop_cleanly

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 2.0
"""--header-timeout for these tests."""


class CountingApp:
    """An HTTP/1.1 app that counts accepted connections and answers each request
    200 with its path; with `greeting`, it speaks first (as SMTP or MySQL do)."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.accepted = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.greeting:
                writer.write(self.greeting)
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next(
                    (int(v) for n, _, v in (x.partition(b":") for x in lines)
                     if n.strip().lower() == b"content-length"),
                    0,
                )  # fmt: skip
                body = await reader.readexactly(length)
                path = lines[0].split(b" ")[1]
                answer = path + b" " + str(len(body)).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def counting_app(greeting: bytes = b"") -> AsyncIterator[CountingApp]:
    app = CountingApp(greeting)
    app.server = await asyncio.start_server(app._serve, "127.0.0.1", 0)
    try:
        yield app
    finally:
        app.server.close()


@contextlib.contextmanager
def sidecar_for(
    app: CountingApp, token_file: Path, log_dir: Path, *extra: str
) -> Iterator[SidecarProcess]:
    s = start_sidecar(app.port, token_file, log_dir, f"--header-timeout={TIMEOUT}", *extra)
    try:
        yield s
    finally:
        stop_cleanly(s)


async def get(
    port: int,
    writer_reader: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
    path: str = "/",
) -> bytes:
    reader, writer = writer_reader or await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    if writer_reader is None:
        writer.close()
    return head + body


async def test_callers_that_dribble_a_head_get_408_and_never_reach_the_app(
    token_file: Path, tmp_path: Path
) -> None:
    async with counting_app() as app:
        with sidecar_for(app, token_file, tmp_path) as sidecar:

            async def collect(reader: asyncio.StreamReader) -> bytes:
                """What arrives until EOF; a reset after the answer (a byte of ours
                that crossed the sidecar's close) keeps what was read."""
                data = b""
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(65536):
                        data += chunk
                return data

            async def dribble() -> tuple[float, bytes]:
                reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.listen_port)
                started = time.monotonic()
                answer = asyncio.create_task(asyncio.wait_for(collect(reader), TIMEOUT * 2 + 10))
                writer.write(b"GET /slow HTTP/1.1\r\nHost: shop\r\n")
                for _ in range(int(TIMEOUT * 4)):  # a byte every 0.5 s, for twice the limit
                    await asyncio.sleep(0.5)
                    if answer.done() or reader.at_eof():
                        break
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"x")
                took = time.monotonic() - started
                data = await answer
                writer.close()
                return took, data

            results = await asyncio.gather(*(dribble() for _ in range(100)))
            for took, answer in results:
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert b"did not arrive within 2 s" in answer
                assert TIMEOUT - 0.1 < took < TIMEOUT + 3, took
            # The app never saw them: no request of theirs ever needed it.
            assert app.accepted == 0
            # and the sidecar serves on.
            assert (await get(sidecar.listen_port, path="/after")).endswith(b"/after 0")
            assert app.accepted == 1


async def test_a_slow_body_an_idle_keep_alive_connection_and_a_silent_caller_are_not_timed(
    token_file: Path, tmp_path: Path
) -> None:
    async with counting_app() as app:
        with sidecar_for(app, token_file, tmp_path) as sidecar:
            conn = await asyncio.open_connection("127.0.0.1", sidecar.listen_port)
            assert (await get(sidecar.listen_port, conn, "/one")).endswith(b"/one 0")
            await asyncio.sleep(TIMEOUT + 1)  # idle between requests
            assert (await get(sidecar.listen_port, conn, "/two")).endswith(b"/two 0")
            reader, writer = conn
            writer.write(b"POST /body HTTP/1.1\r\nHost: shop\r\nContent-Length: 6\r\n\r\n")
            for byte in b"abcdef":  # a body over twice the limit
                await asyncio.sleep(TIMEOUT / 3)
                writer.write(bytes([byte]))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()

            # Silent for longer than the limit, then a request: served.
            silent = await asyncio.open_connection("127.0.0.1", sidecar.listen_port)
            await asyncio.sleep(TIMEOUT + 1)
            assert (await get(sidecar.listen_port, silent, "/late")).endswith(b"/late 0")
            silent[1].close()


async def test_a_server_that_speaks_first_greets_a_silent_caller(
    token_file: Path, tmp_path: Path
) -> None:
    async with counting_app(greeting=b"220 hello\r\n") as app:
        with sidecar_for(app, token_file, tmp_path) as sidecar:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.listen_port)
            started = time.monotonic()
            greeting = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            assert greeting == b"220 hello\r\n"
            assert time.monotonic() - started < 1.5  # SERVER_FIRST_WAIT, then at once
            # and the conversation goes on as raw TCP, whatever the caller sends.
            writer.write(b"\x00\x01 raw \xff")
            await writer.drain()
            writer.close()


async def test_with_app_connect_accept_the_app_connection_opens_at_once(
    token_file: Path, tmp_path: Path
) -> None:
    async with counting_app() as app:
        with sidecar_for(app, token_file, tmp_path, "--app-connect=accept") as sidecar:
            _, writer = await asyncio.open_connection("127.0.0.1", sidecar.listen_port)
            writer.write(b"GET / HTTP/1.1\r\n")  # a first byte: no wait for the server
            deadline = time.monotonic() + 5
            while app.accepted == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            writer.close()
