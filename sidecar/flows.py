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
    """Append the caller's address (`peer` as from `peer_of`) to X-Forwarded-For.
    (Runs on every request: one pass over the raw fields, and appending the
    header where there was none, cost fewer calls than the mapping methods.)"""
    client_ip = peer.rpartition(":")[0]
    if not client_ip:
        return
    headers = request.headers
    if any(name.lower() == b"x-forwarded-for" for name, _ in headers.fields):
        headers["x-forwarded-for"] = f"{headers['x-forwarded-for']}, {client_ip}"
    else:
        headers.add("x-forwarded-for", client_ip)


def request_view(request: http.Request) -> RequestView:
    """The request head as the filters see it: each header as `Name: value`."""
    data = request.data
    return RequestView(
        data.method.decode("latin-1"),
        data.path.decode("latin-1"),
        [f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in data.headers.fields],
    )
