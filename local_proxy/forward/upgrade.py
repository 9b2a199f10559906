"""Hand a stolen HTTP/1.1 Upgrade request (a websocket handshake) to the local app.

The handshake goes out as the caller wrote it (byte for byte, as in
`verbatim.py`), on a connection of its own. If the app switches protocols
(101), that connection becomes a byte pipe to the caller through the tunnel
until both sides have closed; any other answer is passed back as an ordinary
response.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11

from local_proxy.forward.dial import SocketFactory
from local_proxy.forward.verbatim import answer_reader, connect, encode_head, relay_answer
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import HOP_BY_HOP, RequestHead, ResetCode, ResponseHead
from sidecar.tunnel.splice import next_h11_event, splice

__all__ = ["forward_upgrade"]


async def forward_upgrade(
    host: str,
    port: int,
    answer_timeout: float,
    head: RequestHead,
    stream: StreamHandle,
    factory: SocketFactory | None = None,
) -> str:
    """Returns what to report: the status, or what went wrong."""
    connected = await connect(host, port, stream, factory)
    if isinstance(connected, str):
        return connected
    reader, writer = connected
    try:
        return await _exchange(reader, writer, answer_timeout, head, stream, f"{host}:{port}")
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer_timeout: float,
    head: RequestHead,
    stream: StreamHandle,
    where: str,
) -> str:
    upgrade = (
        (b"connection", b"Upgrade"),
        (b"upgrade", head.upgrade.encode("utf-8", "surrogateescape")),
    )
    conn = answer_reader(head.method, head.upgrade)
    try:
        writer.write(encode_head(head, upgrade))
        async with asyncio.timeout(answer_timeout or None):
            event = await next_h11_event(conn, reader)
            while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                event = await next_h11_event(conn, reader)
    except TimeoutError:
        why = f"the local process on {where} did not answer within {answer_timeout:g} s (--timeout)"
        stream.reset(ResetCode.TIMEOUT, why)
        return f"504 ({why})"
    except (h11.ProtocolError, ConnectionError) as e:
        why = f"the local process broke the exchange: {e}"
        stream.reset(ResetCode.UNREACHABLE, why)
        return f"502 ({why})"
    if not isinstance(event, h11.InformationalResponse | h11.Response):
        why = f"the local process closed the connection without answering ({event!r})"
        stream.reset(ResetCode.UNREACHABLE, why)
        return f"502 ({why})"
    if isinstance(event, h11.Response):
        # Refused the upgrade: an ordinary answer. The request half ends with END.
        return await relay_answer(conn, reader, event, stream)
    fields = tuple(
        (bytes(n), bytes(v)) for n, v in event.headers.raw_items() if n.lower() not in HOP_BY_HOP
    )
    stream.send(ResponseHead(stream.id, 101, fields, bytes(event.reason).decode("latin-1")))
    broke = await splice(stream, reader, writer, conn.trailing_data[0])
    return "101" if broke is None else f"101, then {broke}"
