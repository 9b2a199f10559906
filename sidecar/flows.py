"""What both proxy addons (the primary's and a worker's) read from a flow."""

from __future__ import annotations

from mitmproxy import http

from sidecar.filters import RequestView

__all__ = ["add_forwarded_for", "peer_of", "request_view"]


def peer_of(flow: http.HTTPFlow) -> str:
    """`ip:port` of the caller, or "" when mitmproxy does not know it."""
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else ""


def add_forwarded_for(request: http.Request, peer: str) -> None:
    """Append the caller's address (`peer` as from `peer_of`) to X-Forwarded-For."""
    client_ip = peer.rpartition(":")[0]
    if client_ip:
        previous = request.headers.get("x-forwarded-for")
        request.headers["x-forwarded-for"] = f"{previous}, {client_ip}" if previous else client_ip


def request_view(request: http.Request) -> RequestView:
    """The request head as the filters see it: each header as `Name: value`."""
    return RequestView(
        request.method,
        request.path,
        [f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in request.headers.fields],
    )
