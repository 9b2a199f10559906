"""The gateway's HTTP/2 side: stolen streams of h2c callers (gRPC among them).

mitmproxy sends the stolen streams of one HTTP/2 caller connection here over
one h2c connection. Each stream is paired with its tunnel stream by the key in
its route header (`claim`), then bridged both ways with trailers
(`sidecar.tunnel.h2bridge`). A caller that resets its stream resets the tunnel stream,
so the local call is cancelled too; a tunnel stream that breaks off before its
answer becomes a 502 (504 for a local timeout), or for a gRPC caller the gRPC
status UNAVAILABLE (DEADLINE_EXCEEDED), with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h2.errors
import h2.events

from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.h2bridge import h2_fields, h2_to_tunnel, tunnel_to_h2
from sidecar.tunnel.h2conn import H2Endpoint, H2Stream
from sidecar.tunnel.protocol import Reset as ResetMsg
from sidecar.tunnel.protocol import ResetCode, ResponseHead

__all__ = ["ROUTE_HEADER", "serve_h2", "why_broken"]

log = logging.getLogger("sidecar.proxy.gateway")

ROUTE_HEADER = "x-offramp-route"
"""Carries the one-time key from the addon to the gateway; never leaves the sidecar."""


async def serve_h2(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes,
    claim: Callable[[str], tuple[StreamHandle, str] | None],
) -> None:
    """mitmproxy sends the stolen streams of an HTTP/2 caller here over one
    h2c connection; each stream is paired with its tunnel stream by key."""
    exchanges: set[asyncio.Task[None]] = set()

    def on_stream(stream: H2Stream, event: h2.events.RequestReceived) -> None:
        task = asyncio.create_task(_exchange(stream, event, claim))
        exchanges.add(task)
        task.add_done_callback(exchanges.discard)

    endpoint = H2Endpoint(reader, writer, client_side=False, on_stream=on_stream)
    try:
        reason = await endpoint.run(first)
        log.debug("gateway h2 connection ended: %s", reason)
    finally:
        endpoint.close()
        if exchanges:
            await asyncio.wait(list(exchanges), timeout=2)
        for task in exchanges:
            task.cancel()


async def _exchange(
    stream: H2Stream,
    event: h2.events.RequestReceived,
    claim: Callable[[str], tuple[StreamHandle, str] | None],
) -> None:
    key = ""
    grpc = False
    for name, value in event.headers or ():
        if name == ROUTE_HEADER.encode():
            key = bytes(value).decode("latin-1")
        elif name == b"content-type":
            grpc = bytes(value).startswith(b"application/grpc")
    claimed = claim(key) if key else None
    if claimed is None:
        await _simple(stream, 502, "offramp: no stolen request under that key", grpc)
        return
    handle, who = claimed
    upload = asyncio.create_task(h2_to_tunnel(stream, handle))
    gone = asyncio.create_task(stream.gone.wait())
    try:
        broke = await _download(stream, handle, who, gone, grpc)
        if broke is None:
            # The answer is complete; the request half may still be arriving.
            await upload
    finally:
        for task in (upload, gone):
            if not task.done():
                task.cancel()
        stream.done()
        if handle.active:
            handle.reset(ResetCode.CANCEL, "the caller went away")


async def _download(
    stream: H2Stream,
    handle: StreamHandle,
    who: str,
    gone: asyncio.Task[Any],
    grpc: bool,
) -> object | None:
    """The answer: tunnel -> h2 stream. Returns None when it is complete,
    else what broke it off. A caller that resets its stream (`gone`) ends
    this at any point, and the tunnel stream is then reset too."""
    head_task = asyncio.create_task(handle.next())
    await asyncio.wait({head_task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not head_task.done():
        head_task.cancel()
        return "the caller reset its stream"
    head = head_task.result()
    if not isinstance(head, ResponseHead):
        why = why_broken(head, who)
        status = 504 if isinstance(head, ResetMsg) and head.code is ResetCode.TIMEOUT else 502
        await _simple(stream, status, why, grpc)
        return head
    fields = [(b":status", str(head.status).encode()), *h2_fields(head.headers)]
    stream.send_headers(fields, end_stream=head.end_stream)
    if head.end_stream:
        return None
    download = asyncio.create_task(tunnel_to_h2(handle, stream))
    await asyncio.wait({download, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not download.done():
        download.cancel()
        return "the caller reset its stream"
    broke = download.result()
    if broke is not None:
        log.info("stolen response broke off: %s", why_broken(broke, who))
        stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
    return broke


async def _simple(stream: H2Stream, status: int, text: str, grpc: bool) -> None:
    """Our own answer on an h2 stream. A gRPC caller gets it as a gRPC status
    (UNAVAILABLE, or DEADLINE_EXCEEDED for a local timeout), which its client
    library shows, rather than an HTTP status it would turn into a vague one."""
    if grpc:
        code = b"4" if status == 504 else b"14"
        stream.send_headers(
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", code),
                (b"grpc-message", _grpc_message(text)),
                (b"x-offramp", b"error"),
            ],
            end_stream=True,
        )
        return
    body = (text + "\n").encode()
    stream.send_headers(
        [
            (b":status", str(status).encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"x-offramp", b"error"),
        ]
    )
    if await stream.send_data(body):
        stream.end()


def _grpc_message(text: str) -> bytes:
    """grpc-message as the gRPC spec has it: UTF-8, percent-encoding every byte
    outside printable ASCII, and "%" itself."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode()
    )


def why_broken(event: object, who: str) -> str:
    """What the caller is told when a handed-over stream ended before its answer."""
    if isinstance(event, Lost):
        return (
            f"offramp: this request was handed to {who}, but the tunnel to it closed before "
            f"it answered ({event.reason}). The local process may or may not have seen it."
        )
    if isinstance(event, ResetMsg):
        return f"offramp: {who} could not answer this request: {event.message or event.code.name}"
    return f"offramp: unexpected tunnel event {event!r}"
