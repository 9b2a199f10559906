"""The gateway: where mitmproxy sends a stolen request, to be bridged onto a tunnel.

mitmproxy streams a request only to a server connection, and an addon cannot
stream a response of its own. So when the router steals a request, the addon
opens the tunnel stream itself (the request head is handed over right then),
registers the stream here under a one-time key, and points the request at this
loopback server. The gateway pairs the incoming HTTP/1.1 request with the stream
by that key, streams the body into the tunnel (waiting for window, so a slow
local side slows the caller rather than growing memory) and streams the answer
back. An Upgrade request (a websocket) that the local side accepts with 101
becomes a byte pipe (`sidecar.tunnel.splice`). A connection that opens with the
HTTP/2 preface carries an h2c caller's stolen streams (`sidecar.proxy.gateway_h2`).

What the caller gets when things go wrong:
- tunnel lost or stream reset before the answer's head: 502 (504 for a local
  timeout) with a body that says what happened;
- after the head: the connection is aborted, so the caller sees a broken
  response rather than a silently truncated one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from http import HTTPStatus

import h11

from sidecar.proxy.gateway_h2 import ROUTE_HEADER, serve_h2, why_broken
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.h2conn import H2_PREFACE
from sidecar.tunnel.protocol import HOP_BY_HOP, End, ResetCode, ResponseHead
from sidecar.tunnel.protocol import Data as TunnelData
from sidecar.tunnel.protocol import Reset as ResetMsg
from sidecar.tunnel.splice import next_h11_event, splice

__all__ = ["ROUTE_HEADER", "Gateway"]

log = logging.getLogger(__name__)


_READ = 64 * 1024


@dataclass(slots=True)
class _Pending:
    handle: StreamHandle
    who: str
    head_ended: bool
    """The head was sent with end_stream: there is no body to pass on."""
    upgrade: str
    """The protocol an HTTP/1.1 Upgrade request asks for, or ""."""


class _Closed(Exception):
    pass


class Gateway:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self._secret = secrets.token_hex(8)
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._counter = 0
        self._open: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, reset what is still pending and close the idle
        keep-alive connections, so each connection task ends on its own
        rather than being cancelled when the event loop closes."""
        if self._server is not None:
            self._server.close()
        for pending in self._pending.values():
            pending.handle.reset(ResetCode.CANCEL, "the sidecar is shutting down")
        self._pending.clear()
        for writer in list(self._open):
            writer.close()
        if self._open:
            await asyncio.wait(list(self._open.values()), timeout=2)
        tasks = list(self._open.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def register(self, handle: StreamHandle, who: str, head_ended: bool, upgrade: str = "") -> str:
        self._counter += 1
        key = f"{self._secret}.{self._counter}"
        self._pending[key] = _Pending(handle, who, head_ended, upgrade)
        return key

    def abandon(self, key: str) -> None:
        """The caller went away before mitmproxy reached the gateway."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.handle.reset(ResetCode.CANCEL, "the caller went away")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task
        conn = h11.Connection(h11.SERVER)
        try:
            first = await reader.read(_READ)
            while first and len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                more = await reader.read(_READ)
                if not more:
                    break
                first += more
            if first.startswith(H2_PREFACE):
                await serve_h2(reader, writer, first, self._claim)
                return
            conn.receive_data(first)
            while True:
                event = await next_h11_event(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                key = _route_key(event)
                pending = self._pending.pop(key, None) if key else None
                if pending is None or not key.startswith(self._secret):
                    await _simple(conn, writer, 502, "offramp: no stolen request under that key")
                    break
                await self._exchange(conn, reader, writer, pending)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (_Closed, ConnectionError, h11.ProtocolError) as e:
            log.debug("gateway connection ended: %s", e)
        except asyncio.CancelledError:
            # Only `stop` cancels these, for an exchange still open after the drain.
            # Ending normally keeps Python 3.12.1's stream callback from logging
            # the cancellation as an error; nothing awaits this task.
            log.warning("a stolen request was still open at shutdown; its connection is closed")
        finally:
            del self._open[writer]
            with contextlib.suppress(Exception):
                writer.close()

    def _claim(self, key: str) -> tuple[StreamHandle, str] | None:
        """The stolen request registered under `key`, once: its stream and who took it."""
        pending = self._pending.pop(key, None) if key.startswith(self._secret) else None
        return (pending.handle, pending.who) if pending is not None else None

    async def _exchange(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: _Pending,
    ) -> None:
        if pending.upgrade:
            await self._upgrade(conn, reader, writer, pending)
            return
        handle = pending.handle
        upload = asyncio.create_task(_upload(conn, reader, handle, not pending.head_ended))
        try:
            await _download(conn, writer, handle, pending.who)
            # The answer is complete; the request body may still be arriving.
            await upload
        finally:
            # Awaited even when done: a body that broke off is this exchange's
            # end, not an exception nobody retrieves.
            if not upload.done():
                upload.cancel()
            with contextlib.suppress(
                asyncio.CancelledError, _Closed, ConnectionError, h11.ProtocolError
            ):
                await upload
            if handle.active:
                handle.reset(ResetCode.CANCEL, "the caller went away")

    async def _upgrade(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: _Pending,
    ) -> None:
        """An Upgrade request (a websocket handshake): if the local side answers
        101, the connection becomes a byte pipe to it through the tunnel."""
        handle = pending.handle
        try:
            while not isinstance(await next_h11_event(conn, reader), h11.EndOfMessage):
                pass  # a body on an upgrade request has no meaning here: dropped
            first = await handle.next()
            if not (isinstance(first, ResponseHead) and first.status == 101):
                if isinstance(first, ResponseHead):
                    handle.send(End(handle.id))  # refused: the request half is complete
                await _download(conn, writer, handle, pending.who, first)
                return
            headers = [
                (b"connection", b"Upgrade"),
                (b"upgrade", pending.upgrade.encode("utf-8", "surrogateescape")),
                *((n, v) for n, v in first.headers if n.lower() not in HOP_BY_HOP),
            ]
            reason = first.reason.encode("latin-1", "replace") or b"Switching Protocols"
            writer.write(
                conn.send(
                    h11.InformationalResponse(status_code=101, headers=headers, reason=reason)
                )
                or b""
            )
            await writer.drain()
            why = await splice(handle, reader, writer, conn.trailing_data[0])
            if why is not None:
                log.info("stolen %s connection ended: %s", pending.upgrade, why)
        finally:
            if handle.active:
                handle.reset(ResetCode.CANCEL, "the caller went away")


async def _upload(
    conn: h11.Connection, reader: asyncio.StreamReader, handle: StreamHandle, sending: bool
) -> None:
    """Request body: gateway connection -> tunnel. Once the stream cannot take
    more (reset by the local side, or no body expected) the rest is read and dropped."""
    while True:
        event = await next_h11_event(conn, reader)
        if isinstance(event, h11.Data):
            if sending:
                sending = await handle.send_body(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            if sending:
                handle.send(End(handle.id, tuple(event.headers.raw_items())))
            return
        else:
            raise _Closed(f"request body broke off: {event!r}")


async def _download(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    handle: StreamHandle,
    who: str,
    first: object = None,
) -> None:
    """Answer: tunnel -> gateway connection. `first`: its first event, if already read."""
    started = False
    while True:
        if first is not None:
            event, first = first, None
        else:
            event = await handle.next()
        if isinstance(event, ResponseHead):
            headers = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=event.status,
                        headers=headers,
                        reason=event.reason.encode("latin-1", "replace"),
                    )
                )
                or b""
            )
            started = True
            if event.end_stream:
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                return
        elif isinstance(event, TunnelData):
            writer.write(conn.send(h11.Data(data=event.data)) or b"")
            await writer.drain()
            handle.ack(len(event.data))
        elif isinstance(event, End):
            writer.write(conn.send(h11.EndOfMessage(headers=list(event.trailers))) or b"")
            await writer.drain()
            return
        else:
            why = why_broken(event, who)
            if started:
                log.info("stolen response broke off: %s", why)
                writer.transport.abort()
                raise _Closed(why)
            status = 504 if isinstance(event, ResetMsg) and event.code is ResetCode.TIMEOUT else 502
            await _simple(conn, writer, status, why)
            return


async def _simple(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, text: str
) -> None:
    body = (text + "\n").encode()
    if conn.our_state is not h11.SEND_RESPONSE:
        writer.transport.abort()
        raise _Closed(text)
    writer.write(
        conn.send(
            h11.Response(
                status_code=status,
                headers=[
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(body))),
                    ("x-offramp", "error"),
                ],
                reason=HTTPStatus(status).phrase,
            )
        )
        or b""
    )
    writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def _route_key(request: h11.Request) -> str:
    for name, value in request.headers:
        if name == ROUTE_HEADER.encode():
            return bytes(value).decode("latin-1")
    return ""
