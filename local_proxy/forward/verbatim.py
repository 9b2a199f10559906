"""HTTP/1.1 requests that the pooled client cannot send as the caller wrote them.

aiohttp refuses a header value with a control character and re-encodes one
with bytes above 0x7f as UTF-8, and a target with raw bytes above 0x7f does not
survive it either. The app behind the sidecar gets such requests as they came,
so the local process must too: they go out here, byte for byte, on a
connection of their own that closes after the answer. h11 reads the answer.

`encode_head` is also what writes an Upgrade handshake (`upgrade.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import h11

from local_proxy.forward.dial import SocketFactory, open_connection
from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.protocol import HOP_BY_HOP, Data, End, RequestHead, Reset, ResetCode
from sidecar.tunnel.protocol import ResponseHead as TunnelResponseHead
from sidecar.tunnel.splice import next_h11_event

__all__ = [
    "MAY_HAVE_RUN",
    "answer_reader",
    "connect",
    "encode_head",
    "forward_verbatim",
    "pooled_client_keeps",
    "relay_answer",
]

MAY_HAVE_RUN = "; your local process may already have run the request"
"""Said when the exchange broke after the request reached the local process."""

# What the pooled client sends unchanged: printable ASCII targets, token names and
# values of visible ASCII, space and tab.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLAIN_VALUE = re.compile(rb"[\t\x20-\x7e]*")
# Not "#": the client would take what follows for a fragment and drop it.
_PLAIN_TARGET = re.compile(r"[\x21\x22\x24-\x7e]+")


def _target_bytes(head: RequestHead) -> bytes:
    """The target as the caller sent it (the sidecar decodes it as mitmproxy does:
    UTF-8, undecodable bytes as surrogate escapes)."""
    return head.target.encode("utf-8", "surrogateescape")


def pooled_client_keeps(head: RequestHead) -> bool:
    """Whether aiohttp would send this request exactly as it arrived."""
    return _PLAIN_TARGET.fullmatch(head.target) is not None and all(
        _TOKEN.fullmatch(n) and _PLAIN_VALUE.fullmatch(v) for n, v in head.headers
    )


def encode_head(head: RequestHead, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """The request line and header block, from the tunnel's bytes; hop-by-hop
    headers stay out (this hop frames the body itself), `extra` goes at the end."""
    lines = [b"%s %s HTTP/1.1" % (head.method.encode("ascii"), _target_bytes(head))]
    lines += [n + b": " + v for n, v in head.headers if n.lower() not in HOP_BY_HOP]
    lines += [n + b": " + v for n, v in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_reader(method: str, upgrade: str = "") -> h11.Connection:
    """An h11 client connection ready to read the answer to a request that went
    out as raw bytes. h11 is told of it by a stand-in: what it needs to know is the
    method (a HEAD's answer has no body) and whether the request asked to upgrade."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "local")]
    if upgrade:
        headers += [("connection", "upgrade"), ("upgrade", upgrade)]
    conn.send(h11.Request(method=method, target="/", headers=headers))
    conn.send(h11.EndOfMessage())
    return conn


async def connect(
    host: str, port: int, stream: StreamHandle, factory: SocketFactory | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
    """A connection of the stream's own to the local process, or (the stream reset)
    what to report."""
    try:
        return await asyncio.wait_for(open_connection(host, port, factory), 5)
    except (OSError, TimeoutError) as e:
        why = (
            f"nothing accepts connections on {host}:{port} ({e}); "
            "is your local process running and listening on --to?"
        )
        stream.reset(ResetCode.UNREACHABLE, why)
        return f"502 ({why})"


async def forward_verbatim(
    host: str,
    port: int,
    answer_timeout: float,
    head: RequestHead,
    stream: StreamHandle,
    factory: SocketFactory | None = None,
) -> str:
    """Returns what to report: the status, or what went wrong."""
    where = f"{host}:{port}"
    connected = await connect(host, port, stream, factory)
    if isinstance(connected, str):
        return connected
    reader, writer = connected
    has_length = any(n.lower() == b"content-length" for n, _ in head.headers)
    chunked = not head.end_stream and not has_length
    extra = ((b"transfer-encoding", b"chunked"),) if chunked else ()
    body: asyncio.Task[str | None] | None = None
    try:
        writer.write(encode_head(head, extra))
        if not head.end_stream:
            body = asyncio.create_task(_send_body(stream, writer, chunked))
        conn = answer_reader(head.method)
        try:
            async with asyncio.timeout(answer_timeout or None):
                event = await next_h11_event(conn, reader)
                while isinstance(event, h11.InformationalResponse):
                    event = await next_h11_event(conn, reader)
        except TimeoutError:
            why = f"the local process on {where} did not answer within {answer_timeout:g} s"
            stream.reset(ResetCode.TIMEOUT, why + " (--timeout; 0 waits forever)")
            return f"504 ({why})"
        except (h11.ProtocolError, ConnectionError) as e:
            if not stream.active:
                return "abandoned by the caller"
            why = f"the local process broke the exchange: {e}{MAY_HAVE_RUN}"
            stream.reset(ResetCode.UNREACHABLE, why)
            return f"502 ({why})"
        if not isinstance(event, h11.Response):
            why = (
                f"the local process closed the connection without answering ({event!r})"
                + MAY_HAVE_RUN
            )
            stream.reset(ResetCode.UNREACHABLE, why)
            return f"502 ({why})"
        if head.mirror:
            return await _discard_answer(conn, reader, event, stream)
        return await relay_answer(conn, reader, event, stream)
    finally:
        if body is not None and not body.done():
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body
        with contextlib.suppress(Exception):
            writer.close()


async def _send_body(
    stream: StreamHandle, writer: asyncio.StreamWriter, chunked: bool
) -> str | None:
    """The request body from the tunnel onto the socket; None when it is all sent,
    else what to report (the caller went away)."""
    while True:
        event = await stream.next()
        if isinstance(event, Data):
            writer.write(b"%x\r\n%s\r\n" % (len(event.data), event.data) if chunked else event.data)
            await writer.drain()
            stream.ack(len(event.data))
        elif isinstance(event, End):
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return None
        elif isinstance(event, Reset | Lost):
            writer.transport.abort()
            return "abandoned by the caller"


async def relay_answer(
    conn: h11.Connection, reader: asyncio.StreamReader, event: h11.Response, stream: StreamHandle
) -> str:
    """Stream the local process's answer (its head already read) into the tunnel."""
    fields = tuple(
        (bytes(n), bytes(v)) for n, v in event.headers.raw_items() if n.lower() not in HOP_BY_HOP
    )
    reason = bytes(event.reason).decode("latin-1")
    stream.send(TunnelResponseHead(stream.id, event.status_code, fields, reason))
    try:
        while True:
            part = await next_h11_event(conn, reader)
            if isinstance(part, h11.Data):
                if not await stream.send_body(bytes(part.data)):
                    return f"{event.status_code}, abandoned by the caller"
            elif isinstance(part, h11.EndOfMessage):
                stream.send(End(stream.id))
                return str(event.status_code)
            else:
                raise h11.ProtocolError(f"unexpected {part!r}")
    except (h11.ProtocolError, ConnectionError) as e:
        stream.reset(ResetCode.UPSTREAM_BROKEN, f"the local process's answer broke off: {e}")
        return f"{event.status_code}, broke off"


async def _discard_answer(
    conn: h11.Connection, reader: asyncio.StreamReader, event: h11.Response, stream: StreamHandle
) -> str:
    """A mirror copy's answer goes nowhere: read it, then tell the sidecar the status."""
    try:
        while not isinstance(await next_h11_event(conn, reader), h11.EndOfMessage):
            pass
    except (h11.ProtocolError, ConnectionError):
        pass
    stream.send(TunnelResponseHead(stream.id, event.status_code, (), end_stream=True))
    return str(event.status_code)
