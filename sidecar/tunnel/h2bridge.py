"""Bridge one HTTP/2 stream and one tunnel stream, both ways, with trailers.

Used by the sidecar's gateway (mitmproxy's h2 stream <-> tunnel) and by the
local proxy (tunnel <-> the local app's h2 stream). Heads are each side's own
business; these pumps move what follows them: DATA, trailers and the end of a
half. Each pump gives window back only once the bytes have been passed on.
"""

from __future__ import annotations

import h2.events

from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.h2conn import H2Closed, H2Stream
from sidecar.tunnel.protocol import HOP_BY_HOP, Data, End, Headers

__all__ = ["h2_fields", "h2_to_tunnel", "tunnel_to_h2"]


def h2_fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Headers as HTTP/2 allows them: lower-case names, no connection-specific
    fields (RFC 9113 8.2.2), `te` only as "trailers", no `host`."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"te":
            if value.strip().lower() == b"trailers":
                out.append((lower, b"trailers"))
        elif lower not in HOP_BY_HOP and lower != b"host":
            out.append((lower, value))
    return out


async def h2_to_tunnel(stream: H2Stream, handle: StreamHandle) -> str | None:
    """Pass the h2 half's DATA, trailers and end into the tunnel. Returns None
    once the half ended, or why it could not (the h2 stream was reset or its
    connection closed). If the tunnel stream ends first, the rest is drained."""
    sending = handle.active
    while True:
        event = await stream.next()
        if isinstance(event, h2.events.DataReceived):
            if sending and event.data:
                sending = await handle.send_body(event.data)
            stream.ack(event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.TrailersReceived):
            if sending:
                handle.send(End(handle.id, tuple(event.headers or ())))
                sending = False
        elif isinstance(event, h2.events.StreamEnded):
            if sending:
                handle.send(End(handle.id))
            return None
        elif isinstance(event, h2.events.StreamReset):
            return f"the HTTP/2 stream was reset (error code {event.error_code!r})"
        elif isinstance(event, H2Closed):
            return event.reason
        # Heads are read by the owner before it starts this pump; nothing else comes.


async def tunnel_to_h2(handle: StreamHandle, stream: H2Stream) -> object | None:
    """Pass the tunnel half's DATA and END (trailers too) onto the h2 stream.
    Returns None once the half ended; else the tunnel event that broke it off
    (Reset or Lost), or a string if the h2 stream went away."""
    while True:
        event = await handle.next()
        if isinstance(event, Data):
            sent = await stream.send_data(event.data)
            handle.ack(len(event.data))
            if not sent:
                return "the HTTP/2 stream went away"
        elif isinstance(event, End):
            if event.trailers:
                stream.send_headers(h2_fields(event.trailers), end_stream=True)
            else:
                stream.end()
            return None
        elif isinstance(event, Lost):
            return event
        else:
            return event  # Reset (a head here would be a protocol error upstream)
