"""The tunnel driver over a real websocket, against a raw protocol peer.

The local proxy may flush a whole answer (head, body, end) in one websocket
message; the sidecar's driver must hand every one of those frames to the stream,
even though its protocol state has already moved past them when the first is
dispatched. (A fast local app once made the driver drop the body and the end.)
Also: what a message sent without a flush waits for, and the order of DATA
handed to a stream's sink.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from sidecar.tunnel.driver import StreamHandle, Tunnel
from sidecar.tunnel.protocol import (
    PROTOCOL_VERSION,
    Connect,
    Connected,
    Connection,
    Data,
    DnsQuery,
    End,
    Hello,
    RequestHead,
    ResponseHead,
    Role,
    Welcome,
)

pytestmark = pytest.mark.timeout(20)


async def _welcome(ws: ClientConnection | ServerConnection) -> Connection:
    """The sidecar's end of the handshake, on `ws`: HELLO read, WELCOME sent."""
    conn = Connection(Role.SIDECAR)
    conn.receive_data(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome(PROTOCOL_VERSION, "s1", "test", (80,), outgoing=("tcp",)))
    await ws.send(conn.data_to_send())
    return conn


@pytest.mark.parametrize("request_has_body", [False, True])
async def test_a_whole_answer_in_one_websocket_message_reaches_the_stream(
    request_has_body: bool,
) -> None:
    answered = asyncio.Event()

    async def local_side(ws: ServerConnection) -> None:
        # A raw protocol peer: it collects the request, then sends the answer's
        # three frames in a single websocket message.
        conn = Connection(Role.CLIENT)
        conn.send(Hello(PROTOCOL_VERSION, "t", {}))
        await ws.send(conn.data_to_send())
        request_done = False
        while not request_done:
            conn.receive_data(await ws.recv())  # type: ignore[arg-type]
            while (event := conn.next_event()) is not None:
                if isinstance(event, RequestHead):
                    stream = event.stream_id
                    request_done = event.end_stream
                elif isinstance(event, End):
                    request_done = True
        conn.send(ResponseHead(stream, 200, ((b"content-length", b"5"),), "OK"))
        conn.send(Data(stream, b"hello"))
        conn.send(End(stream))
        await ws.send(conn.data_to_send())
        answered.set()
        await ws.wait_closed()

    async with serve(local_side, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            conn = await _welcome(ws)
            tunnel = Tunnel(conn, ws)
            pump = asyncio.create_task(tunnel.run())
            handle = tunnel.open_stream(
                lambda sid: RequestHead(sid, "POST", "/", (), 80, end_stream=not request_has_body)
            )
            assert handle is not None
            if request_has_body:
                assert await handle.send_body(b"ping")
                handle.send(End(handle.id))
            await asyncio.wait_for(answered.wait(), 5)
            got = [await asyncio.wait_for(handle.next(), 5) for _ in range(3)]
            assert [type(e) for e in got] == [ResponseHead, Data, End], got
            assert isinstance(got[1], Data) and got[1].data == b"hello"
            assert not handle.active
            # The finished stream was retired: closing the tunnel tells it nothing more.
            await tunnel.close("done")
            await pump
            assert handle._inbox.empty()


async def _raw_frames(ws: ServerConnection | object, conn: Connection, wait: float) -> list[object]:
    """The frames of the next websocket message the raw peer receives."""
    message = await asyncio.wait_for(ws.recv(), wait)  # type: ignore[attr-defined]
    conn.receive_data(message)
    frames = []
    while (event := conn.next_event()) is not None:
        frames.append(event)
    return frames


@pytest.mark.parametrize("then", ["send", "flush"])
async def test_a_message_sent_without_a_flush_goes_with_the_next_one(then: str) -> None:
    """The sidecar answers a CONNECT whose bytes came with it without a flush: the
    CONNECTED waits, then leaves in one websocket message with the next DATA,
    sent as usual (at the writer's next turn) or flushed (in this very turn)."""
    opened: asyncio.Queue[StreamHandle] = asyncio.Queue()
    results: list[list[object]] = []
    done = asyncio.Event()

    async def laptop(ws: ServerConnection) -> None:
        conn = Connection(Role.CLIENT)
        conn.send(Hello(PROTOCOL_VERSION, "t", {}))
        await ws.send(conn.data_to_send())
        await _raw_frames(ws, conn, 5)  # WELCOME
        conn.send(Connect(2, "10.0.0.1", 80))
        conn.send(Data(2, b"ping"))
        await ws.send(conn.data_to_send())
        with pytest.raises(TimeoutError):  # CONNECTED alone does not leave
            await _raw_frames(ws, conn, 0.3)
        flushed.set()
        results.append(await _raw_frames(ws, conn, 5))
        done.set()
        await ws.wait_closed()

    flushed = asyncio.Event()
    async with serve(laptop, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            conn = await _welcome(ws)

            def on_outgoing(event: Connect | DnsQuery, handle: StreamHandle) -> None:
                opened.put_nowait(handle)

            tunnel = Tunnel(conn, ws, on_outgoing=on_outgoing)
            pump = asyncio.create_task(tunnel.run())
            handle = await asyncio.wait_for(opened.get(), 5)
            await asyncio.sleep(0.05)  # the DATA behind the CONNECT is dispatched too
            assert handle.has_pending
            handle.send(Connected(handle.id, "10.0.0.1:80"), flush=False)
            await asyncio.wait_for(flushed.wait(), 5)
            if then == "send":
                handle.send(Data(handle.id, b"pong"))
            else:
                handle.send(Data(handle.id, b"pong"), flush=False)
                tunnel.flush()
                assert tunnel.conn.data_to_send() == b""  # nothing left for a later turn
            await asyncio.wait_for(done.wait(), 5)
            await tunnel.close("done")
            await pump
    assert [type(f) for f in results[0]] == [Connected, Data]


async def test_data_handed_to_a_sink_never_overtakes_queued_messages() -> None:
    """A sink that declines DATA (its socket is busy) has it queued; DATA that
    arrives while anything is queued is queued behind it, whatever the sink says."""
    go = asyncio.Queue[bytes]()

    async def pod(ws: ServerConnection) -> None:
        conn = await _welcome(ws)
        await _raw_frames(ws, conn, 5)  # the CONNECT
        conn.send(Connected(2, "10.0.0.1:80"))
        await ws.send(conn.data_to_send())
        while chunk := await go.get():
            conn.send(Data(2, chunk))
            await ws.send(conn.data_to_send())
        await ws.wait_closed()

    async with serve(pod, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            conn = Connection(Role.CLIENT)
            conn.send(Hello(PROTOCOL_VERSION, "t", {}))
            await ws.send(conn.data_to_send())
            conn.receive_data(await ws.recv())  # type: ignore[arg-type]
            assert isinstance(conn.next_event(), Welcome)
            tunnel = Tunnel(conn, ws)
            pump = asyncio.create_task(tunnel.run())
            handle = tunnel.open_stream(lambda sid: Connect(sid, "10.0.0.1", 80))
            assert handle is not None
            assert isinstance(await asyncio.wait_for(handle.next(), 5), Connected)
            taken: list[bytes] = []
            accept = False

            def sink(event: Data | Connected) -> bool:
                if accept and isinstance(event, Data):
                    taken.append(event.data)
                return accept

            handle.take_data(sink)

            async def arrives(chunk: bytes, queued: int) -> None:
                await go.put(chunk)
                for _ in range(500):
                    await asyncio.sleep(0.01)
                    if handle._inbox.qsize() == queued and (queued or chunk in taken):
                        return
                raise AssertionError(f"{chunk!r} did not arrive")

            await arrives(b"a", queued=1)  # declined: queued
            accept = True
            await arrives(b"b", queued=2)  # the sink would take it, but "a" waits
            assert taken == []
            got = [await asyncio.wait_for(handle.next(), 5) for _ in range(2)]
            assert [e.data for e in got if isinstance(e, Data)] == [b"a", b"b"]
            await arrives(b"c", queued=0)  # nothing queued: the sink takes it
            assert taken == [b"c"]
            await go.put(b"")
            await tunnel.close("done")
            await pump
