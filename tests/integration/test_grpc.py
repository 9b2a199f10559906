"""gRPC (cleartext HTTP/2 with prior knowledge) through the real sidecar:
passed to the pod's app, and stolen to a local grpcio server through the real
local proxy. Clients and servers are real grpcio (asyncio API)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.errors
import h2.events
import httpx
import pytest

from sidecar.sessions.spec import HttpFilterSpec, SessionSpec
from sidecar.tunnel.h2conn import H2Endpoint, H2Stream
from tests.grpc_apps import EchoClient, GrpcApp, start_grpc_app
from tests.support import (
    HttpApp,
    SidecarProcess,
    free_port,
    header_spec,
    open_session,
    start_sidecar,
    stop_cleanly,
)

ME = (("x-who", "me"),)


@pytest.fixture
async def grpc_app() -> AsyncIterator[GrpcApp]:
    app = await start_grpc_app("app")
    yield app
    await app.stop()


@pytest.fixture
async def grpc_local() -> AsyncIterator[GrpcApp]:
    local = await start_grpc_app("local")
    yield local
    await local.stop()


@pytest.fixture
async def grpc_sidecar(
    grpc_app: GrpcApp, token_file: Path, tmp_path: Path
) -> AsyncIterator[SidecarProcess]:
    s = await asyncio.to_thread(start_sidecar, grpc_app.port, token_file, tmp_path)
    yield s
    await asyncio.to_thread(stop_cleanly, s)


@pytest.fixture
async def client(grpc_sidecar: SidecarProcess) -> AsyncIterator[EchoClient]:
    c = EchoClient(grpc_sidecar.listen_port)
    yield c
    await c.close()


async def four_kinds(c: EchoClient, who: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """Each kind of call once, checking that `who` answered every message."""
    tag = who.encode() + b":"
    assert await c.unary(b"hello", metadata=metadata, timeout=10) == tag + b"hello"
    answers = [m async for m in c.server_stream(b"50", metadata=metadata, timeout=10)]
    assert answers == [tag + str(i).encode() for i in range(50)]

    async def upload() -> AsyncIterator[bytes]:
        for i in range(100):
            yield bytes([i % 256]) * i

    total = sum(range(100))
    assert (
        await c.client_stream(upload(), metadata=metadata, timeout=10)
        == tag + f"100:{total}".encode()
    )
    await ping_pong(c, tag, 20, metadata)


async def ping_pong(
    c: EchoClient, tag: bytes, n: int, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    """One bidirectional call: each answer is read before the next message is
    written, so this only works if messages stream both ways as produced."""
    call = c.bidi(metadata=metadata, timeout=60)
    for i in range(n):
        await call.write(b"ping %d" % i)
        assert await call.read() == tag + b"ping %d" % i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def expect_error(
    c: EchoClient, code: grpc.StatusCode, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.unary(b"fail:" + code.name.encode(), metadata=metadata, timeout=10)
    assert caught.value.code() == code
    return caught.value


# -- passthrough --------------------------------------------------------------------


@pytest.mark.parametrize("session", [False, True], ids=["no session", "non-matching session"])
async def test_grpc_passes_through_unchanged(
    session: bool,
    client: EchoClient,
    grpc_app: GrpcApp,
    grpc_local: GrpcApp,
    grpc_sidecar: SidecarProcess,
) -> None:
    async def calls() -> None:
        await four_kinds(client, "app", ME)
        error = await expect_error(client, grpc.StatusCode.NOT_FOUND)
        assert error.details() == "app failed this call on purpose"
        assert ("x-failed-by", "app") in tuple(error.trailing_metadata() or ())

    if session:
        spec = header_spec("^x-who: somebody-else$")
        async with open_session(grpc_sidecar, grpc_local.port, spec):
            await calls()
    else:
        await calls()
    assert grpc_local.seen == []
    method, metadata, _ = grpc_app.seen[0]
    assert method == "Unary"
    assert metadata["x-who"] == "me"
    assert metadata.get("x-forwarded-for") == "127.0.0.1", grpc_app.seen


async def test_passed_bidi_stream_carries_1000_messages(
    client: EchoClient, grpc_app: GrpcApp
) -> None:
    await ping_pong(client, b"app:", 1000)


# -- steal --------------------------------------------------------------------------


async def test_grpc_stolen_by_header_all_four_kinds(
    client: EchoClient, grpc_app: GrpcApp, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    lines: list[str] = []
    async with open_session(grpc_sidecar, grpc_local.port, header_spec("^x-who: me$"), lines=lines):
        await four_kinds(client, "local", ME)
        await four_kinds(client, "app")
    assert [m for m, _, _ in grpc_local.seen] == ["Unary", "ServerStream", "ClientStream", "Bidi"]
    assert [m for m, _, _ in grpc_app.seen] == ["Unary", "ServerStream", "ClientStream", "Bidi"]
    # Metadata arrive as they were sent, and the caller's address is passed on.
    assert grpc_local.seen[0][1]["x-who"] == "me"
    assert grpc_local.seen[0][1]["x-forwarded-for"] == "127.0.0.1"
    assert any("steal  POST /offramp.test.Echo/Bidi -> 200" in line for line in lines), lines


async def test_grpc_stolen_by_path(
    client: EchoClient, grpc_app: GrpcApp, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    spec = SessionSpec(http_filter=HttpFilterSpec(path_filter=r"^/offramp\.test\.Echo/Bidi$"))
    async with open_session(grpc_sidecar, grpc_local.port, spec):
        await ping_pong(client, b"local:", 5)
        assert await client.unary(b"x", timeout=10) == b"app:x"
        assert [m async for m in client.server_stream(b"2", timeout=10)] == [b"app:0", b"app:1"]


async def test_stolen_bidi_stream_carries_1000_messages(
    client: EchoClient, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    async with open_session(grpc_sidecar, grpc_local.port, header_spec("^x-who: me$")):
        await ping_pong(client, b"local:", 1000, ME)


async def test_stolen_and_passed_calls_mix_on_one_channel(
    client: EchoClient, grpc_app: GrpcApp, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    """One channel is one HTTP/2 connection: its streams are routed one by one."""
    async with open_session(grpc_sidecar, grpc_local.port, header_spec("^x-who: me$")):

        async def one(i: int) -> None:
            mine = i % 2 == 0
            answer = await client.unary(b"%d" % i, metadata=ME if mine else (), timeout=10)
            assert answer == (b"local:" if mine else b"app:") + b"%d" % i

        # Two long bidi calls, one each way, stay open while unary calls interleave.
        stolen = client.bidi(metadata=ME, timeout=30)
        passed = client.bidi(timeout=30)
        for round_ in range(5):
            await stolen.write(b"s%d" % round_)
            await passed.write(b"p%d" % round_)
            await asyncio.gather(*(one(round_ * 10 + i) for i in range(10)))
            assert await stolen.read() == b"local:s%d" % round_
            assert await passed.read() == b"app:p%d" % round_
        for call in (stolen, passed):
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    assert len(grpc_local.seen) == 26 and len(grpc_app.seen) == 26


async def test_stolen_errors_and_deadlines_carry_both_ways(
    client: EchoClient, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    async with open_session(grpc_sidecar, grpc_local.port, header_spec("^x-who: me$")):
        # A trailers-only error reply: status, details and trailing metadata.
        error = await expect_error(client, grpc.StatusCode.PERMISSION_DENIED, ME)
        assert error.details() == "local failed this call on purpose"
        assert ("x-failed-by", "local") in tuple(error.trailing_metadata() or ())

        # The caller's deadline reaches the local server, which gives up with it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.unary(b"sleep:5", metadata=ME, timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _, _, remaining = grpc_local.seen[-1]
        # grpc-timeout is rounded up to whole units; without it there is no deadline.
        assert remaining is not None and 0 < remaining < 1.5, remaining
        await wait_for(lambda: "Unary" in grpc_local.cancelled)


async def test_caller_cancelling_cancels_the_local_call(
    client: EchoClient, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    async with open_session(grpc_sidecar, grpc_local.port, header_spec("^x-who: me$")):
        # While the local handler works on a unary call...
        unary = asyncio.ensure_future(client.unary(b"sleep:30", metadata=ME, timeout=60))
        await wait_for(lambda: len(grpc_local.seen) == 1)
        unary.cancel()
        await wait_for(lambda: grpc_local.cancelled == ["Unary"])
        # ...and part-way through a server stream.
        stream = client.server_stream(b"1000:0.05", metadata=ME, timeout=60)
        assert await stream.read() == b"local:0"
        stream.cancel()
        await wait_for(lambda: grpc_local.cancelled == ["Unary", "ServerStream"])
        # The channel goes on working.
        assert await client.unary(b"after", metadata=ME, timeout=10) == b"local:after"


async def test_mirrored_grpc_calls_are_answered_by_the_app_and_copied_locally(
    client: EchoClient, grpc_app: GrpcApp, grpc_local: GrpcApp, grpc_sidecar: SidecarProcess
) -> None:
    spec = header_spec("^x-who: me$", mode="mirror")
    async with open_session(grpc_sidecar, grpc_local.port, spec):
        assert await client.unary(b"copy me", metadata=ME, timeout=10) == b"app:copy me"
        await ping_pong(client, b"app:", 10, ME)
        await wait_for(lambda: [m for m, _, _ in grpc_local.seen] == ["Unary", "Bidi"])
    assert [m for m, _, _ in grpc_app.seen] == ["Unary", "Bidi"]


async def test_stolen_call_with_no_local_server_gets_a_clear_grpc_status(
    client: EchoClient, grpc_sidecar: SidecarProcess
) -> None:
    nobody = free_port()
    async with open_session(grpc_sidecar, nobody, header_spec("^x-who: me$")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.unary(b"x", metadata=ME, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert f"nothing accepts connections on 127.0.0.1:{nobody}" in details, details
    assert "listening on --to" in details


async def test_http1_and_grpc_callers_share_the_port(
    app: HttpApp, grpc_local: GrpcApp, token_file: Path, tmp_path: Path
) -> None:
    """The pod's app speaks HTTP/1.1; gRPC calls that match are stolen on the same port."""
    s = await asyncio.to_thread(start_sidecar, app.port, token_file, tmp_path)
    try:
        c = EchoClient(s.listen_port)
        async with (
            open_session(s, grpc_local.port, header_spec("^x-who: me$")),
            httpx.AsyncClient() as http,
        ):
            for _ in range(3):
                r = await http.get(f"{s.url}/plain")
                assert r.json()["served_by"] == "app"
                assert await c.unary(b"rpc", metadata=ME, timeout=10) == b"local:rpc"
        await c.close()
    finally:
        await asyncio.to_thread(stop_cleanly, s)


async def wait_for(condition: object, within: float = 10) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met within the time limit")
        await asyncio.sleep(0.02)


async def test_a_local_server_that_resets_a_stream_is_reported_as_such(
    client: EchoClient, grpc_sidecar: SidecarProcess
) -> None:
    """A local server that resets a call part-way breaks the caller's call, and
    the session reports the local side, not the caller, as the one that left."""

    async def reset_after_first_message(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        def on_stream(stream: H2Stream, _: object) -> None:
            async def answer() -> None:
                while not isinstance(await stream.next(), h2.events.DataReceived):
                    pass
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

            tasks.add(asyncio.create_task(answer()))

        await H2Endpoint(reader, writer, client_side=False, on_stream=on_stream).run()

    tasks: set[asyncio.Task[None]] = set()
    server = await asyncio.start_server(reset_after_first_message, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lines: list[str] = []
    try:
        async with open_session(grpc_sidecar, port, header_spec("^x-who: me$"), lines=lines):

            async def slow_upload() -> AsyncIterator[bytes]:
                for i in range(50):
                    yield b"m%d" % i
                    await asyncio.sleep(0.02)

            with pytest.raises(grpc.aio.AioRpcError):
                await client.client_stream(slow_upload(), metadata=ME, timeout=10)
    finally:
        server.close()
    (line,) = [line for line in lines if "ClientStream" in line]
    assert "abandoned by the caller" not in line, line
    assert "reset the stream" in line, line
