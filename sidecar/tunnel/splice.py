"""After an HTTP/1.1 Upgrade (a websocket, say), or on a CONNECT stream: bytes both
ways between a socket and a tunnel stream, until both directions have ended.

Each direction ends on its own, as TCP half-closes do: end of file on the
socket sends END, an END from the tunnel shuts the socket's write side. A
reset stream, a lost tunnel or a broken socket ends both at once.

Also `next_h11_event`, with which both ends read the HTTP/1.1 exchange that
precedes an upgrade (and the sidecar's gateway every HTTP/1.1 exchange).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

import h11

from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import Connected, Data, End, ResetCode

__all__ = ["Transferred", "next_h11_event", "splice"]

_READ = 64 * 1024


@dataclass
class Transferred:
    """Bytes a splice has moved: from the socket into the tunnel, and back; and the
    CONNECTED that answered a CONNECT the splice started before its answer."""

    to_tunnel: int = 0
    to_socket: int = 0
    connected: Connected | None = None


async def splice(
    handle: StreamHandle,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes = b"",
    counts: Transferred | None = None,
    *,
    reset_socket: bool = False,
) -> str | None:
    """Returns None if both directions ended cleanly, else why they did not.
    `first`: bytes already read from the socket after the upgrade. `counts`, if
    given, is kept up to date. A CONNECTED on the stream is noted there: a CONNECT
    may be spliced before its answer, its bytes going ahead. `reset_socket`: when
    the stream is reset, so is the socket (RST, not FIN)."""
    counts = counts if counts is not None else Transferred()
    outbound = asyncio.create_task(_socket_to_tunnel(handle, reader, first, counts))
    inbound = asyncio.create_task(_tunnel_to_socket(handle, writer, counts))
    try:
        pending: set[asyncio.Task[str | None]] = {outbound, inbound}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                why = task.result()
                if why is not None:
                    if task is outbound and handle.active:
                        handle.reset(ResetCode.CANCEL, why)
                    if reset_socket and task is inbound:
                        _linger_zero(writer)
                    writer.transport.abort()
                    return why
        return None
    finally:
        for task in (outbound, inbound):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _socket_to_tunnel(
    handle: StreamHandle, reader: asyncio.StreamReader, first: bytes, counts: Transferred
) -> str | None:
    data = first
    try:
        while True:
            if data and not await handle.send_body(data):
                return "the tunnel stream ended"
            if data:
                handle.tunnel.flush()  # the bytes may be awaited: not one turn later
            counts.to_tunnel += len(data)
            data = await reader.read(_READ)
            if not data:
                handle.send(End(handle.id))
                return None
    except ConnectionError as e:
        return f"the connection broke: {e}"


async def _tunnel_to_socket(
    handle: StreamHandle, writer: asyncio.StreamWriter, counts: Transferred
) -> str | None:
    transport = writer.transport

    def write_now(event: Data | Connected) -> bool:
        # While the socket keeps up (nothing left unsent), DATA is written as it
        # arrives; else it waits its turn below, where writing waits for the socket.
        if isinstance(event, Connected):
            counts.connected = counts.connected or event
            return True
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        transport.write(event.data)
        handle.ack(len(event.data))
        counts.to_socket += len(event.data)
        return True

    handle.take_data(write_now)
    try:
        while True:
            event = await handle.next()
            if isinstance(event, Data):
                writer.write(event.data)
                try:
                    await writer.drain()
                except ConnectionError as e:
                    return f"the connection broke: {e}"
                handle.ack(len(event.data))
                counts.to_socket += len(event.data)
            elif isinstance(event, Connected) and counts.connected is None:
                counts.connected = event
            elif isinstance(event, End):
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return None
            else:
                return f"the tunnel stream ended: {event!r}"
    finally:
        handle.take_data(None)


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def next_h11_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading from `reader` as needed. On end of file h11
    reports ConnectionClosed, or raises on a message cut short."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_READ))
            continue
        return event
