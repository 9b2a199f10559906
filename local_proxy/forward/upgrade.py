"""Hand a stolen HTTP/1.1 Upgrade request (a websocket handshake) to the local app.

The handshake goes out as the caller wrote it, on a connection of its own. If
the app switches protocols (101), that connection becomes a byte pipe to the
caller through the tunnel until both sides have closed; any other answer is
passed back as an ordinary response.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11

from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import HOP_BY_HOP, End, RequestHead, ResetCode, ResponseHead
from sidecar.tunnel.splice import next_h11_event, splice

__all__ = ["forward_upgrade"]


async def forward_upgrade(
    host: str, port: int, answer_timeout: float, head: RequestHead, stream: StreamHandle
) -> str:
    """Returns what to report: the status, or what went wrong."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as e:
        why = (
            f"nothing accepts connections on {host}:{port} ({e}); "
            "is your local process running and listening on --to?"
        )
        stream.reset(ResetCode.UNREACHABLE, why)
        return f"502 ({why})"
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
    conn = h11.Connection(h11.CLIENT)
    headers = [
        *((n, v) for n, v in head.headers if n.lower() not in HOP_BY_HOP),
        (b"connection", b"Upgrade"),
        (b"upgrade", head.upgrade.encode("latin-1")),
    ]
    try:
        request = h11.Request(method=head.method, target=head.target, headers=headers)
        writer.write(conn.send(request) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
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
    fields = tuple(
        (bytes(n), bytes(v)) for n, v in event.headers.raw_items() if n.lower() not in HOP_BY_HOP
    )
    reason = bytes(event.reason).decode("latin-1")
    if event.status_code == 101:
        stream.send(ResponseHead(stream.id, 101, fields, reason))
        broke = await splice(stream, reader, writer, conn.trailing_data[0])
        return "101" if broke is None else f"101, then {broke}"
    # Refused the upgrade: an ordinary answer. The request half ends with END.
    stream.send(ResponseHead(stream.id, event.status_code, fields, reason))
    try:
        while True:
            part = await next_h11_event(conn, reader)
            if isinstance(part, h11.Data):
                if not await stream.send_body(bytes(part.data)):
                    return f"{event.status_code}, abandoned by the caller"
            elif isinstance(part, h11.EndOfMessage):
                stream.send(End(stream.id))
                break
            else:
                raise h11.ProtocolError(f"unexpected {part!r}")
    except (h11.ProtocolError, ConnectionError) as e:
        stream.reset(ResetCode.UPSTREAM_BROKEN, f"the local process's answer broke off: {e}")
        return f"{event.status_code}, broke off"
    return str(event.status_code)
