"""The tunnel driver over a real websocket, against a peer that batches frames.

The local proxy may flush a whole answer (head, body, end) in one websocket
message; the sidecar's driver must hand every one of those frames to the stream,
even though its protocol state has already moved past them when the first is
dispatched. (A fast local app once made the driver drop the body and the end.)
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from sidecar.tunnel.driver import Tunnel
from sidecar.tunnel.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Data,
    End,
    Hello,
    RequestHead,
    ResponseHead,
    Role,
    Welcome,
)

pytestmark = pytest.mark.timeout(20)


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
            conn = Connection(Role.SIDECAR)
            conn.receive_data(await ws.recv())  # type: ignore[arg-type]
            assert isinstance(conn.next_event(), Hello)
            conn.send(Welcome(PROTOCOL_VERSION, "s1", "test", (80,)))
            await ws.send(conn.data_to_send())
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
